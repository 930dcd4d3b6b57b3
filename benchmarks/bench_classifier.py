"""Classifier training throughput: our data path versus a plain torchvision ImageFolder pipeline.

Both phases train the same DenseNet-121 (1-channel input, one logit, AdamW, BCE) on the same
images for the same number of steps; each phase runs in a fresh subprocess so its peak memory
is its own. What differs is everything around the network:

  plain  torchvision ``ImageFolder`` + PIL transforms per image per epoch (Grayscale, Resize,
         CenterCrop, RandomAffine, ColorJitter, ToTensor) in DataLoader workers, float32,
         as such a training script is usually written
  ours   the classifiers' path: images decoded and resized once into the preprocessed cache
         (:class:`cxr.data.cache.ImageCache`; its build time is reported apart), held as one
         tensor on the training device, augmented there with kornia (:func:`cxr.engine.data.gpu_augment`),
         bf16 autocast and channels_last on a GPU (the trainer's defaults)

The source images are NIH-like 1024² 8-bit PNGs (smooth anatomy-like field plus noise, so they
compress like radiographs), written once into an ImageFolder tree (two class folders).

    python benchmarks/bench_classifier.py --n 64 --size 224 --steps 5            # CPU
    python benchmarks/bench_classifier.py --n 256 --size 224 --steps 30 --batch-size 32   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_tree(root: Path, n: int, side: int) -> list[str]:
    """``n`` gray PNGs in ``root/{normal,tb}/`` (ImageFolder layout); existing files are kept."""
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)
    paths = []
    for i in range(n):
        p = root / ("tb" if i % 2 else "normal") / f"img_{i:04d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            img = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def plain_batches(root: Path, size: int, batch_size: int, workers: int, device):
    """An endless stream of (images, labels) from ImageFolder + PIL transforms."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Grayscale(1), transforms.Resize(size), transforms.CenterCrop(size),
        transforms.RandomAffine(5, translate=(0.05, 0.05), scale=(0.95, 1.05)),
        transforms.ColorJitter(brightness=0.1, contrast=0.1), transforms.ToTensor(),
    ])
    loader = DataLoader(datasets.ImageFolder(str(root), transform=tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.float().to(device, non_blocking=True)


def our_batches(paths: list[str], size: int, batch_size: int, cache_dir: Path, device, channels_last: bool,
                timings: dict):
    """An endless stream of (images, labels) from the preprocessed cache, augmented on ``device``."""
    # lazy: each phase runs in a fresh subprocess and imports only its own pipeline, so its peak
    # memory is its own (the plain phase never loads our modules, the parent loads neither)
    import torch

    from cxr.data.cache import ImageCache
    from cxr.data.preprocess import Preprocess
    from cxr.engine.data import gpu_augment

    t0 = time.perf_counter()
    cache = ImageCache(cache_dir, Preprocess(size=size))
    cache.build(paths, workers=min(8, os.cpu_count() or 1))
    images = torch.from_numpy(np.stack([cache.get(p) for p in paths]))[:, None].to(device)
    labels = torch.tensor([1.0 if "/tb/" in p else 0.0 for p in paths], device=device)
    timings["cache_build_s"] = time.perf_counter() - t0
    augment = gpu_augment().to(device)
    gen = torch.Generator().manual_seed(0)
    while True:
        for idx in torch.randperm(len(paths), generator=gen).split(batch_size):
            if len(idx) < batch_size:
                continue
            idx = idx.to(device)
            x = augment(images[idx])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[idx]


def run_phase(args: argparse.Namespace, paths: list[str]) -> dict:
    import torch
    from torch import nn

    from classifiers.models import build_classifier
    from cxr.engine.distributed import resolve_device
    from cxr.engine.memory import peak_memory_mb
    from cxr.engine.speed import autocast_context, fused_adam_kwargs

    device = resolve_device(args.device)
    torch.manual_seed(0)
    ours = args.phase == "ours"
    channels_last = ours and device.type == "cuda"
    model = build_classifier(args.model, 1).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused_adam_kwargs(device))
    loss_fn = nn.BCEWithLogitsLoss()
    timings: dict = {}
    batches = (our_batches(paths, args.size, args.batch_size, args.workdir / "cache", device, channels_last, timings)
               if ours else plain_batches(args.workdir / "tree", args.size, args.batch_size, args.workers, device))
    amp = "auto" if ours else "off"

    def step() -> None:
        x, y = next(batches)
        with autocast_context(device, amp):
            loss = loss_fn(model(x).float().squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    return {"phase": args.phase, "device": device_name, "model": args.model, "size": args.size,
            "batch_size": args.batch_size, "steps": args.steps, "seconds": round(seconds, 3),
            "images_per_s": round(args.steps * args.batch_size / seconds, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1), **{k: round(v, 2) for k, v in timings.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="source images (default 64)")
    ap.add_argument("--side", type=int, default=1024, help="source image side (default 1024, as NIH)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per phase (default 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="plain pipeline's DataLoader workers (default 2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxr_bench_classifier")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--phase", choices=("plain", "ours"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n < args.batch_size:
        ap.error("--n must be at least --batch-size")
    paths = make_tree(args.workdir / "tree", args.n, args.side)
    if args.phase:
        print(json.dumps(run_phase(args, paths)))
        return 0
    import shutil

    shutil.rmtree(args.workdir / "cache", ignore_errors=True)
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for phase in ("plain", "ours"):
        out = subprocess.run([sys.executable, __file__, *passthrough, "--phase", phase],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["images_per_s"]
    print(f"{args.model} {args.size}², batch {args.batch_size}, {args.steps} timed steps, {args.n} source "
          f"{args.side}² PNGs; {rows[0]['device']}")
    print(f"| {'pipeline':<38}| {'images/s':>9} | {'vs plain':>8} | {'peak memory MB':>14} |")
    print(f"|{'-' * 39}|{'-' * 11}|{'-' * 10}|{'-' * 16}|")
    names = {"plain": f"plain ImageFolder + PIL ({args.workers} workers)", "ours": "ours (cache + device aug)"}
    for r in rows:
        print(f"| {names[r['phase']]:<38}| {r['images_per_s']:>9.2f} | {r['images_per_s'] / base:>7.2f}x "
              f"| {r['peak_memory_mb']:>14.0f} |")
    if "cache_build_s" in rows[1]:
        print(f"(ours: building the cache once took {rows[1]['cache_build_s']:.1f} s, not in the rate)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
