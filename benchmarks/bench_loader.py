"""Loader throughput: a plain PIL + torchvision pipeline versus our preprocessed cache.

Writes N synthetic 3000×3000 16-bit PNGs (smooth anatomy-like field + noise, so they compress
like radiographs rather than like pure noise), then times one epoch of each pipeline at the
target size, each phase in a fresh subprocess so its peak memory (max RSS of the process and
its workers) is its own:

  plain    PIL.Image.open → 16-bit to float → torchvision Resize + CenterCrop, DataLoader with
           its defaults (num_workers=0), as an ImageFolder-style script is usually written
  plain-2  the same with DataLoader(num_workers=2), the best a plain pipeline does on 2 cores
  cold     ours, building the cache (hash + decode + resize in 2 processes), then reading it
  warm     ours, a second epoch: cached arrays only

    python benchmarks/bench_loader.py --n 48 --size 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, side: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:04d}.png"
        if not p.exists():
            rng = np.random.default_rng(i)
            img = np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1)
            Image.fromarray((img * 65535).astype(np.uint16)).save(p)
        paths.append(str(p))
    return paths


class PlainDataset:
    """What an ImageFolder-style pipeline does: open, convert, resize, crop, every epoch."""

    def __init__(self, paths: list[str], size: int):
        from torchvision import transforms

        self.paths = paths
        self.tf = transforms.Compose([transforms.Resize(size, antialias=True), transforms.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            arr = np.asarray(im, dtype=np.float32) / 65535.0
        return self.tf(torch.from_numpy(arr)[None])


def run_phase(phase: str, paths: list[str], size: int, cache_dir: str) -> dict:
    # lazy: each phase runs in a fresh subprocess and imports only what it uses, so its peak memory
    # is its own (the parent, which only writes the images and starts the phases, imports none)
    import torch
    from torch.utils.data import DataLoader

    from cxr.data.cache import ImageCache
    from cxr.data.dataset import CXRDataset
    from cxr.data.preprocess import Preprocess
    from cxr.data.record import Sample

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if phase.startswith("plain"):
        workers = 2 if phase == "plain-2" else 0
        for _ in DataLoader(PlainDataset(paths, size), batch_size=16, num_workers=workers):
            pass
    else:
        pre = Preprocess(size=size)
        cache = ImageCache(cache_dir, pre)
        if phase == "cold":
            cache.build(paths, workers=2)
        recs = [Sample(image=p, patient_id=str(i), site="bench", labels=[0.0], label_names=("x",))
                for i, p in enumerate(paths)]
        for _ in DataLoader(CXRDataset(recs, pre, cache=cache), batch_size=16, num_workers=0):
            pass
    dt = time.perf_counter() - t0
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return {"phase": phase, "seconds": dt, "images_per_s": len(paths) / dt, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--side", type=int, default=3000, help="source image side (default 3000)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxr_bench_loader")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    paths = make_images(args.workdir / f"png{args.side}", args.n, args.side)
    cache_dir = str(args.workdir / "cache")
    if args.phase:
        print(json.dumps(run_phase(args.phase, paths, args.size, cache_dir)))
        return
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    rows = []
    for phase in ("plain", "plain-2", "cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--n", str(args.n), "--size",
                              str(args.size), "--side", str(args.side), "--workdir", str(args.workdir)],
                             check=True, capture_output=True, text=True, env={**os.environ})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["images_per_s"]
    print(f"{args.n} images {args.side}x{args.side} 16-bit PNG -> {args.size}x{args.size}, {os.cpu_count()} cores")
    print(f"| {'pipeline':<28}| {'images/s':>9} | {'vs plain':>8} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 29}|{'-' * 11}|{'-' * 10}|{'-' * 13}|")
    names = {"plain": "plain PIL + torchvision", "plain-2": "plain, 2 loader workers",
             "cold": "ours, cold (build cache)", "warm": "ours, warm (cached)"}
    for r in rows:
        print(f"| {names[r['phase']]:<28}| {r['images_per_s']:>9.1f} | {r['images_per_s'] / base:>7.1f}x "
              f"| {r['peak_rss_mb']:>11.0f} |")


if __name__ == "__main__":
    main()
