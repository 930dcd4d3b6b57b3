"""CUT and FastCUT training speed against our CycleGAN: images per second and peak memory.

Times :class:`gan.cut.trainer.CUTSteps` -- the exact step ``cxr train-gan cut`` runs (G and
heads phase with PatchNCE, D phase, LR schedule, Adam) -- and our CycleGAN's
:class:`gan.cyclegan.trainer.CycleGANSteps` set up as ``bench_cyclegan.py`` sets it up, through
one timing loop, at the paper's setting: ResNet-9 generators, 70×70 PatchGANs, instance norm,
LSGAN, batch size 1, 256², one channel, PatchNCE on layers 0, 4, 8, 12, 16 with 256 patches.
Each model runs in its own process, so each peak memory is its own (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the process's max resident set, reported also net of
a process that imports the same modules and holds the same data but trains nothing). On a CPU
the ratios use each step's CPU time of the process (``time.process_time``), which other jobs on
a shared machine do not inflate as they do wall time; the models run in turn, ``--rounds``
times, and each figure is the median over its rounds. Park et al. report 0.24 s (CUT) and
0.15 s (FastCUT) per iteration against the CycleGAN's 0.40 s, at about 70 % and 45 % of its
memory.

    python benchmarks/bench_cut.py --device cpu --size 256 --steps 2 --warmup 1 --threads 1 --rounds 2   # ratios
    python benchmarks/bench_cut.py --model fastcut --device cpu --size 128 --steps 5          # one model, JSON line
    python benchmarks/bench_cut.py --size 256 --steps 50 --warmup 5                           # on a GPU

Goal: FastCUT >= 2x and CUT >= 1.5x the CycleGAN's images/s, each at <= 70 % of its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cyclegan import data_pools, time_steps  # noqa: E402  (after the checkout is on the path)
from cxr.engine.config import load_config  # noqa: E402
from cxr.engine.distributed import resolve_device  # noqa: E402
from cxr.engine.memory import peak_memory_mb  # noqa: E402
from cxr.engine.seed import seed_everything  # noqa: E402
from gan.cut.config import CUTConfig  # noqa: E402
from gan.cut.trainer import CUTSteps  # noqa: E402
from gan.cyclegan.config import CycleGANConfig  # noqa: E402
from gan.cyclegan.trainer import CycleGANSteps  # noqa: E402

MODELS = ("cyclegan", "cut", "fastcut")
GOALS = {"cut": (1.5, 0.70), "fastcut": (2.0, 0.70)}  # (images/s ratio at least, memory ratio at most)


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def time_model(args: argparse.Namespace, model: str, overrides: list[str]) -> dict:
    """One run of ``args.warmup`` + ``args.steps`` steps of ``model`` in this process."""
    device = resolve_device(args.device)
    total = args.warmup + args.steps
    keys = [f"data.size={args.size}", f"train.batch_size={args.batch_size}", f"train.steps={total}",
            f"train.amp={args.amp}", *overrides]
    seed_everything(0)
    if model == "cyclegan":  # as bench_cyclegan.py builds it
        cfg = load_config(CycleGANConfig, None, ["model.generator=resnet9", *keys])
        steps = CycleGANSteps(cfg, device)
    else:
        cfg = load_config(CUTConfig, None, [f"model.mode={model}", *keys])
        steps = CUTSteps(cfg, device)
    timing = time_steps(steps, data_pools(args.size, device), args.batch_size, args.warmup, args.steps, device)
    seconds, cpu_seconds, per_step = timing.seconds, timing.cpu_seconds, timing.per_step
    pairs_per_s = args.steps * args.batch_size / seconds
    return {"model": model, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "size": args.size, "generator": cfg.model.generator, "batch_size": args.batch_size, "amp": args.amp,
            "winograd": cfg.model.winograd, "steps": args.steps, "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs_per_s, 3), "images_per_s": round(2 * pairs_per_s, 3),
            "s_per_pair": round(1 / pairs_per_s, 4), "cpu_s_per_pair": round(cpu_seconds / (args.steps * args.batch_size), 4),
            "images_per_cpu_s": round(2 * args.steps * args.batch_size / cpu_seconds, 4),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            **({"median_s": round(statistics.median(per_step), 4)} if per_step else {}),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def baseline(args: argparse.Namespace) -> dict:
    """What a benchmark process holds before training: the imports and the data pools."""
    device = resolve_device(args.device)
    data_pools(args.size, device)
    return {"model": "none", "peak_memory_mb": round(peak_memory_mb(device), 1)}


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    """All three models, in turn, each in a fresh process, ``args.rounds`` times; the median
    round of each and their ratios to the CycleGAN."""
    shared = ["--size", str(args.size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--device", args.device, "--amp", args.amp,
              *(["--threads", str(args.threads)] if args.threads else [])]
    me = [sys.executable, str(Path(__file__).resolve())]
    rounds: dict[str, list[dict]] = {m: [] for m in MODELS}
    for _ in range(args.rounds):
        for model in MODELS:
            rounds[model].append(_run([*me, "--model", model, *shared, *args.overrides]))
    on_cpu = "cpu" in rounds["cut"][0]["device"]
    rate = "images_per_cpu_s" if on_cpu else "images_per_s"

    def median_round(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda r: r[rate])[(len(runs) - 1) // 2] | {"rounds": [r[rate] for r in runs]}

    results = {m: median_round(runs) for m, runs in rounds.items()}
    base = _run([*me, "--model", "none", *shared])["peak_memory_mb"]
    cg = results["cyclegan"]
    rows = {}
    for mode in ("cut", "fastcut"):
        r = results[mode]
        speed = r[rate] / cg[rate]
        memory = r["peak_memory_mb"] / cg["peak_memory_mb"]
        net = ((r["peak_memory_mb"] - base) / max(cg["peak_memory_mb"] - base, 1e-9)) if on_cpu else memory
        need_speed, need_memory = GOALS[mode]
        rows[mode] = {"speed_ratio": round(speed, 3), "memory_ratio": round(memory, 3), "net_memory_ratio": round(net, 3),
                      "speed_goal_met": speed >= need_speed, "memory_goal_met": net <= need_memory}
    return {"results": results, "rate": rate, "baseline_memory_mb": base if on_cpu else None, "ratios": rows,
            "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p)
    p.add_argument("--model", choices=(*MODELS, "none"), default=None,
                   help="time one model in this process (none: the baseline process); default: compare all three")
    p.add_argument("--rounds", type=int, default=1, help="comparison: times each model runs, in turn (median kept)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every model, e.g. model.ngf=32")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "none":
        out = baseline(args)
    elif args.model is not None:
        out = time_model(args, args.model, args.overrides)
    else:
        out = compare(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
