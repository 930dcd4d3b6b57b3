"""Phantom throughput: images/s, CPU time per image and peak memory of ``cxr phantom``.

Each size runs the nlm preset through :func:`cxr.phantom.generate.generate`, exactly what
``cxr phantom --preset nlm`` does: render, both acquisition chains, every PNG of the tree and of
the paired truth (both sites' renders, lung and lesion masks, Montgomery's ManualMask), the
readings and the CSVs, then the atomic rename. Every size runs in a fresh subprocess, so its
peak memory is its own and ``RUSAGE_CHILDREN`` of that subprocess is exactly its workers.

Reported per size:

* ``img/s``: tree images (= subjects) per wall-clock second, setup included (reading the
  bundled CT's shipped projections, planning, CSVs). Each image also writes its
  paired-truth files.
* ``main CPU s`` and ``worker CPU ms/img``: CPU time (user + system) of the main process (the
  one-off set-up and the CSVs) and of all workers together, per image. On a machine shared
  with other work the wall clock suffers and CPU time much less, so the table also gives what
  two idle cores would do, *derived* from CPU time (not measured): main CPU as serial, worker
  CPU split over two cores, for the whole run and for the steady state after set-up.
* ``peak RSS``: maximum resident set of the main process and of the largest worker (forked
  workers share the CT copy-on-write, so the sum over-counts: it is an upper bound).

``--stages`` adds a single-process breakdown of where a subject's CPU time goes.

Before each size it syncs, times creating files in the output's folder (``file_create_ms``)
and, if that is slow, waits for it to settle (``--settle``, default up to 180 s): on this
machine's ext4 disk, creating a file costs 0.6-0.8 ms instead of 0.03 for one to three minutes
after a few thousand files were deleted (for instance the previous benchmark's tree), and a tree writes
6-8 files a subject. Nothing is deleted until the last size has run, and every table says what
a file cost and what share of the workers' CPU was the kernel's: 0.2-0.4 ms an image on a
settled disk or a tmpfs, 1-2 ms while ext4 still steps over the inodes of a recent deletion
(the probe does not always see that; a note under the table then says so).

    python benchmarks/bench_phantom.py                      # 128, 256, 512; 800 images; all cores
    python benchmarks/bench_phantom.py --sizes 256 --n 400 --workers 2 --stages
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_IMAGES_PER_S = 200  # at 256² on 2 cores (docs/results/phantom.md)
GOAL_PEAK_GB = 2.0
# settled: 0.02-0.04 ms here; 0.06-0.1 for tens of seconds after a deletion (the workers then
# spend 1-2 ms an image in the kernel instead of 0.3), 0.6-0.8 right after a large one
SETTLED_FILE_MS = 0.05
# workers' kernel CPU per image (at 256², scaled with the pixels above) beyond which the disk,
# not the phantom, set the pace: 0.2-0.4 ms settled, 0.9-2.3 while ext4 absorbs a deletion
BUSY_KERNEL_MS = 0.8
SETTLE_STEP_S = 10.0
SETTLE_COMMIT_S = 3.0  # after a sync, before the first probe: a deletion shows within ~2 s


def _cpu_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _maxrss_mb(usage: resource.struct_rusage) -> float:
    return usage.ru_maxrss / 1024.0  # Linux reports KiB


def run_one(size: int, n: int, workers: int, preset: str, seed: int, out: Path) -> dict:
    """One ``generate`` run in this process (called in a fresh subprocess by :func:`main`)."""
    # lazy: each run's subprocess imports only what it measures, and the parent, which starts the
    # runs and reads their resource usage, stays free of torch and the phantom
    from cxr.phantom.generate import PhantomConfig, generate

    done: list[float] = []
    cfg = PhantomConfig(preset=preset, out=out, size=size, seed=seed, n=n, workers=workers)
    before = _cpu_s(resource.getrusage(resource.RUSAGE_SELF))  # imports are not the phantom's
    t0 = time.perf_counter()
    result = generate(cfg, progress=lambda k: done.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "size": size, "images": result.images, "workers": workers, "wall_s": wall,
        # from the first finished image to the last: the rate once the CT is loaded and projected
        "steady_s": done[-1] - done[0] if len(done) > 1 else wall,
        "setup_s": done[0] - t0 if done else wall,
        "cpu_main_s": _cpu_s(me) - before, "cpu_workers_s": _cpu_s(kids),
        "sys_workers_s": kids.ru_stime,  # the kernel's share: file creation, page cache
        "rss_main_mb": _maxrss_mb(me), "rss_worker_mb": _maxrss_mb(kids) if workers > 1 else 0.0,
        "files": len(files), "bytes": sum(p.stat().st_size for p in files),
    }


def stages(size: int, n: int, seed: int) -> dict[str, float]:
    """CPU ms per subject of each stage, one process (the steps ``make_image`` runs)."""
    import torch

    from cxr.phantom import chains as C
    from cxr.phantom import writers as W
    from cxr.phantom.generate import PhantomConfig, default_backend, plan, resolve_chains
    from cxr.phantom.render import subject_params, warm_base_maps

    torch.set_num_threads(1)
    backend = default_backend()
    clock = time.process_time
    t = clock()
    anatomy = backend.load()
    chains = resolve_chains(())
    with tempfile.TemporaryDirectory() as tmp:
        jobs = plan(PhantomConfig(preset="nlm", out=Path(tmp) / "x", size=size, n=n, seed=seed),
                    chains, backend)
        warm_base_maps(anatomy, [subject_params(j.subject)["yaw_deg"] for j in jobs])
        setup = clock() - t
        acc: dict[str, float] = {}

        def lap(key: str, since: float) -> float:
            now = clock()
            acc[key] = acc.get(key, 0.0) + now - since
            return now

        for job in jobs:
            s = job.subject
            t = clock()
            proj = backend.render(s, anatomy, size)
            t = lap("render: warp CT projection, lesions", t)
            home = chains[job.home]
            geom = C.sample_geometry(home, size, size, C.stream(s.seed, "geometry", home.name))
            warped = C.warp_projection(proj, geom)
            t = lap("chain: geometry warp", t)
            for chain in chains.values():
                a = C.add_blocked_attenuation(C.attenuation(warped.soft, warped.bone, chain), geom, chain)
                img = C.develop(a, chain, C.stream(s.seed, "appearance", chain.name), C.binning(geom))
                t = lap("chain: develop (both sites)", t)
                data = W.image_png(img, chain.acquisition_bits, 8, chain.output_mode)
                t = lap("png: radiographs (both sites)", t)
                W.write_bytes(Path(tmp) / "img" / f"{chain.name}_{s.subject_id}.png", data)
                t = lap("files: write", t)
            masks = [W.png_bytes(warped.lung_mask, "L")] + [W.mask_png(les.mask) for les in warped.lesions]
            if job.tree == "montgomery":
                masks += [W.mask_png(warped.lung_mask == k) for k in (1, 2)]
            t = lap("png: masks", t)
            for k, data in enumerate(masks):
                W.write_bytes(Path(tmp) / "mask" / f"{s.subject_id}_{k}.png", data)
            t = lap("files: write", t)
    out = {k: 1000.0 * v / len(jobs) for k, v in acc.items()}
    out["setup (the CT's projections, the plan), ms once"] = 1000.0 * setup
    return out


def _child(args: argparse.Namespace) -> None:
    if args.stages_only:
        print(json.dumps(stages(args.sizes[0], args.n, args.seed)))
    else:
        print(json.dumps(run_one(args.sizes[0], args.n, args.workers, args.preset, args.seed, Path(args.out))))


def _spawn(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench_phantom: run {' '.join(argv)} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def file_create_ms(folder: Path, n: int = 200, size: int = 16384) -> float:
    """Milliseconds to create, write and close one ``size``-byte file in a fresh subfolder of
    ``folder`` (the phantom's own writer, mean of ``n``). The files are left for the caller to
    remove at the very end: deleting them now would itself slow the next files (see
    :func:`settle`)."""
    from cxr.phantom.writers import write_bytes

    probe = Path(tempfile.mkdtemp(prefix="probe_", dir=folder))
    data = bytes(size)
    t0 = time.perf_counter()
    for i in range(n):
        write_bytes(probe / f"{i}.png", data)
    return 1000.0 * (time.perf_counter() - t0) / n


def settle(folder: Path, limit_s: float) -> tuple[float, float]:
    """Wait (up to ``limit_s``) until creating a file in ``folder`` is cheap; returns (the last
    probe's ms per file, seconds waited beyond the first :data:`SETTLE_COMMIT_S`).

    Measured on this machine's ext4 disk (2026-12-05): once the deletion of a few thousand
    files reaches the journal (a few seconds after the ``rm``, or right after a ``sync``),
    creating a file costs 0.6-0.8 ms of CPU instead of 0.03 for one to three minutes (truncating
    and rewriting an existing file stays at 0.06), then drops back. A phantom tree writes 6-8 files
    a subject, so a run started within minutes of removing the previous run's tree measures
    the deletion (4-5 ms a subject), not the phantom. A probe taken right after the ``rm`` is
    still fast, so the journal is committed and given a moment first.

    The probe cannot see everything: a kernel profile of a slow run (2026-12-05) puts the time
    in ext4's inode allocator, which steps over every recently deleted inode of a block group
    (``find_inode_bit`` → ``recently_deleted``), and 200 probe files may find free inodes
    before reaching those a 5,000-file tree runs into. Hence the kernel column of the table and
    the note under it.
    """
    os.sync()
    time.sleep(SETTLE_COMMIT_S)
    waited = 0.0
    ms = file_create_ms(folder)
    while ms > SETTLED_FILE_MS and waited < limit_s:
        time.sleep(SETTLE_STEP_S)
        waited += SETTLE_STEP_S
        ms = file_create_ms(folder)
    return ms, waited


def estimate_2core(r: dict) -> tuple[float, float] | None:
    """(whole run, steady state) images/s two idle cores would give, derived from CPU time.

    The main process's CPU (reading the CT's projections, planning, CSVs, the rename) is
    counted as serial (a user's CT, projected at run time, is projected on one thread per
    worker, so this over-counts its set-up). The workers' CPU is
    split over two cores. Steady state leaves the
    one-off set-up out: 2 / worker CPU s per image. None for a one-process run (``--workers
    1`` renders in the main process, so set-up and images cannot be told apart).
    """
    if r["workers"] <= 1 or r["cpu_workers_s"] <= 0:
        return None
    run_s = r["cpu_main_s"] + r["cpu_workers_s"] / 2
    return r["images"] / run_s, 2 * r["images"] / r["cpu_workers_s"]


def busy_disk_note(r: dict) -> str | None:
    """A warning when the workers' kernel time says the disk, not the phantom, set the pace."""
    kernel_ms = 1000 * r.get("sys_workers_s", 0.0) / r["images"]
    if kernel_ms <= BUSY_KERNEL_MS * max(1.0, (r["size"] / 256) ** 2):  # 512²: 1.1 on a tmpfs
        return None
    return (f"  {r['size']}²: note: the workers spent {kernel_ms:.1f} ms an image in the kernel "
            f"(0.2-0.4 at 256² on a settled disk or a tmpfs here): file creation was slowed by "
            f"the disk's state, not the phantom (see settle); rerun later or with TMPDIR=/dev/shm")


def table(rows: list[dict]) -> str:
    lines = ["| size | images | workers | wall s | img/s (wall) | main CPU s "
             "| worker CPU ms/img (kernel) | est. img/s, 2 idle cores: run / steady "
             "| peak RSS main / worker MB |",
             "|" + "---|" * 9]
    for r in rows:
        est = estimate_2core(r)
        est_text = f"{est[0]:.0f} / {est[1]:.0f}" if est else "n/a (1 process)"
        lines.append(f"| {r['size']}² | {r['images']} | {r['workers']} | {r['wall_s']:.1f} "
                     f"| {r['images'] / r['wall_s']:.0f} | {r['cpu_main_s']:.1f} "
                     f"| {1000 * r['cpu_workers_s'] / r['images']:.1f} "
                     f"({1000 * r.get('sys_workers_s', 0.0) / r['images']:.1f}) | {est_text} "
                     f"| {r['rss_main_mb']:.0f} / {r['rss_worker_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--n", type=int, default=800, help="images per size (800 = the full nlm preset)")
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--preset", default="nlm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", action="store_true", help="also print a per-stage CPU breakdown")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--settle", type=float, default=180.0,
                    help="seconds to wait at most, before each size, for file creation to be cheap "
                         "again after a recent mass deletion (0: measure the disk as it is)")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return
    if args.n <= 0 or any(s <= 0 for s in args.sizes) or (args.workers is not None and args.workers <= 0):
        raise SystemExit("bench_phantom: --n, --sizes and --workers must be positive")
    from cxr.phantom.generate import available_cores

    workers = args.workers or available_cores()
    command = "python benchmarks/bench_phantom.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"# {command.strip()}")
    print(f"# {os.cpu_count()} CPUs visible, {workers} workers, preset {args.preset}, seed {args.seed}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    # Everything written stays until the end: removing a finished tree before the next size
    # would slow that size's file creation for minutes (see settle).
    with tempfile.TemporaryDirectory(prefix="bench_phantom_") as tmp:
        for size in args.sizes:
            disk_ms, waited = settle(Path(tmp), args.settle)
            note = f", after waiting {waited:.0f} s for it to settle" if waited else ""
            print(f"# {size}²: creating a 16 KiB file in the output's folder ({tmp}): {disk_ms:.3f} ms "
                  f"(this disk, now{note})", flush=True)
            out = Path(tmp) / f"s{size}"
            r = _spawn(["--child", "--sizes", str(size), "--n", str(args.n), "--workers", str(workers),
                        "--preset", args.preset, "--seed", str(args.seed), "--out", str(out)])
            r["file_create_ms"] = disk_ms
            rows.append(r)
            cpu = (r["cpu_main_s"] + r["cpu_workers_s"]) / r["images"]
            print(f"  {size}²: {r['images']} images in {r['wall_s']:.1f} s (setup {r['setup_s']:.1f} s), "
                  f"{1000 * cpu:.1f} CPU ms/image, {r['files']} files, {r['bytes'] / 2**20:.0f} MiB",
                  flush=True)
        stage_rows = {}
        if args.stages:
            for size in args.sizes:
                stage_rows[size] = _spawn(["--child", "--stages-only", "--sizes", str(size),
                                           "--n", str(min(args.n, 200)), "--seed", str(args.seed)])
    print()
    print(table(rows))
    print(f"\nimg/s counts tree images; each one also writes its paired truth (both sites' renders, "
          f"lung and lesion masks). The 2-core estimates are derived from CPU time, not measured: "
          f"main-process CPU counted as serial, worker CPU split over two cores (steady: workers "
          f"only). Goal: >= {GOAL_IMAGES_PER_S} img/s at 256² on 2 cores, peak <= {GOAL_PEAK_GB:g} GB. "
          f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    for r in rows:
        bound = r["rss_main_mb"] + r["workers"] * r["rss_worker_mb"]
        print(f"  {r['size']}²: peak memory, upper bound (main + workers x largest worker): {bound / 1024:.2f} GB")
        note = busy_disk_note(r)
        if note:
            print(note)
    if stage_rows:
        keys = list(next(iter(stage_rows.values())))
        print("\nCPU ms per subject by stage (one process, time.process_time):\n")
        print("| stage | " + " | ".join(f"{s}²" for s in stage_rows) + " |")
        print("|---|" + "---|" * len(stage_rows))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{v[k]:.2f}" for v in stage_rows.values()) + " |")
        print("| total per subject | " + " | ".join(
            f"{sum(x for key, x in v.items() if not key.startswith('setup')):.2f}" for v in stage_rows.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "runs": rows,
                                         "stages": stage_rows}, indent=2))


if __name__ == "__main__":
    main()
