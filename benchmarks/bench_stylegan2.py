"""StyleGAN2-ADA training speed: seconds per thousand images (s/kimg) and peak memory of our step.

Times :meth:`gan.stylegan2.trainer.StyleGAN2Family.train_step` -- the exact step ``cxr train-gan
stylegan2`` runs (G main, G reg when on, D main through the ADA pipe, lazy R1, the p update,
G_ema) -- on a small phantom tree rendered at the benchmark's size (``--phantom TREE`` to use
your own), with the preprocessed images on the device, as in training. The timed steps should
cover whole regularization intervals (R1 every 16 steps), so ``--steps`` defaults to 32.

Default setting: on CUDA, NVlabs' ``auto`` config at 256², batch 16 (``stylegan2_auto256``;
NVlabs publish 20.84 s/kimg on one V100 and 12.53 on one A100 for it); on a CPU, 64² with the
``stylegan2_nlm`` widths (``auto`` with z/w 128, channel base 2048, max 64), batch 16.
``--config stylegan2_tiny`` times the test/demo widths.

    python benchmarks/bench_stylegan2.py                                  # auto device, its default setting
    python benchmarks/bench_stylegan2.py --device cpu --threads 1 --steps 16
    python benchmarks/bench_stylegan2.py --device cpu --config stylegan2_tiny --batch-size 8
    python benchmarks/bench_stylegan2.py --device cuda --amp off          # fp32 on a bf16 GPU
    python benchmarks/bench_stylegan2.py --device cuda --compile          # torch.compile synthesis and D
    python benchmarks/bench_stylegan2.py --config stylegan2_auto256 --size 128 ada.mode=none

Prints one JSON line: device, setting, ``s_per_kimg``, ``images_per_s``, ``s_per_step`` (median
on a CPU) and ``peak_memory_mb`` (CUDA: max allocated; CPU: the process's max resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.configs import shipped_config  # noqa: E402  (after the checkout is on the path)
from cxr.engine.checkpoint import CheckpointManager  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.engine.distributed import DistInfo, resolve_device  # noqa: E402
from cxr.engine.logging import RunLogger  # noqa: E402
from cxr.engine.loop import Run  # noqa: E402
from cxr.engine.memory import peak_memory_mb  # noqa: E402
from cxr.engine.seed import seed_everything  # noqa: E402
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402
from gan.stylegan2.trainer import StyleGAN2Config, StyleGAN2Family  # noqa: E402

PHANTOM_IMAGES = 32  # the rendered tree: the step's speed does not depend on how many images there are


def default_setting(device: torch.device) -> tuple[str, int, int]:
    """(config, size, batch): NVlabs' auto at 256² on CUDA, the nlm widths at 64² on a CPU."""
    return ("stylegan2_auto256", 256, 16) if device.type == "cuda" else ("stylegan2_nlm", 64, 16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a shipped stylegan2_* config (default: by device, see above)")
    p.add_argument("--size", type=int, default=None, help="resolution (default: by device)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 16)")
    p.add_argument("--steps", type=int, default=32, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--compile", action="store_true", help="train.compile=true (synthesis and D, main phases)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="train.compile_mode (the CUDA-graph modes are refused by the stylegan2 trainer)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--phantom", type=Path, default=None, metavar="TREE",
                   help="a training tree (default: a phantom Shenzhen-like tree of 32 images, rendered now)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. ada.mode=none")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name, size, batch = default_setting(device)
    name, size, batch = args.config or name, args.size or size, args.batch_size or batch

    with tempfile.TemporaryDirectory(prefix="bench_stylegan2_") as tmp:
        tree = args.phantom
        if tree is None:
            generate(PhantomConfig(preset="nlm", out=Path(tmp) / "phantom", size=size, n=PHANTOM_IMAGES, workers=1,
                                   seed=0))
            tree = Path(tmp) / "phantom" / "ChinaSet_AllFiles"
        total = args.warmup + args.steps
        cfg = load_config(StyleGAN2Config, shipped_config(name), [
            f"data.train={tree}", f"data.size={size}", "data.split=all", f"data.cache_dir={tmp}/cache",
            "data.decode_workers=1", f"device={device}", f"train.batch_size={batch}", "train.kimg=null",
            f"train.steps={total}", f"train.amp={args.amp}",
            f"train.compile={str(args.compile).lower()}", f"train.compile_mode={args.compile_mode}", "train.fid_every=0", "train.fid_kimg=null",
            *args.overrides])
        seed_everything(0)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        run = Run(cfg, run_dir, DistInfo(device=device), RunLogger(run_dir, enabled=False),
                  CheckpointManager(run_dir), None)
        family = StyleGAN2Family(cfg)
        family.setup(run)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for i in range(args.warmup):
            family.train_step(i)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_step: list[float] = []  # CPU only: a GPU run is timed as a whole, without a sync per step
        t0 = time.perf_counter()
        for i in range(args.warmup, total):
            t_step = time.perf_counter()
            losses = family.train_step(i)
            if device.type == "cpu":
                per_step.append(time.perf_counter() - t_step)
        sync()
        seconds = time.perf_counter() - t0
        assert all(torch.isfinite(v).all() for v in losses.values()), "non-finite loss in the benchmark"
        r = family.resolved
        kimg = args.steps * batch / 1000
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "config": name, "size": size, "batch_size": batch, "preset": cfg.model.preset,
            "channel_base": r.g.channel_base, "channel_max": r.g.channel_max, "z_dim": r.g.z_dim,
            "mapping_layers": r.g.mapping_layers, "r1_gamma": r.loss.r1_gamma, "pl_weight": r.loss.pl_weight,
            "ada_mode": cfg.ada.mode, "amp": args.amp,
            "compile": args.compile, "compile_mode": args.compile_mode, "steps": args.steps, "seconds": round(seconds, 3),
            "s_per_kimg": round(seconds / kimg, 3), "images_per_s": round(args.steps * batch / seconds, 3),
            "s_per_step": round(statistics.median(per_step) if per_step else seconds / args.steps, 4),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
