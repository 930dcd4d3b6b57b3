"""A tiny model and training loop built only from ``cxr.engine``, for the engine's tests.

It exercises every piece a real trainer uses (config + overrides, run folder, resumable data
stream, DDP, checkpoints, logging, NaN guard, graceful SIGINT) in well under a second per run.
Run as a script (``python tests/engine_toy.py --run-dir DIR train.steps=20``), also under
torchrun-style environment variables for the DDP test. Test-only hooks: ``--hang-at STEP``
(write ``<run>/hanging`` and sleep, to be killed), ``--nan-at STEP`` (poison the loss),
``--step-delay S`` (slow steps down so a signal lands mid-run).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cxr.engine.checkpoint import CheckpointManager, load
from cxr.engine.cli import add_run_arguments, prepare_run_dir, print_dry_run, resolve_run
from cxr.engine.config import StepTrainConfig
from cxr.engine.distributed import (DistInfo, all_reduce_mean, any_process, barrier, cleanup,
                                    setup_distributed, wrap_ddp)
from cxr.engine.data import infinite_loader
from cxr.engine.guards import EXIT_INTERRUPTED, GracefulInterrupt, check_finite
from cxr.engine.logging import RunLogger
from cxr.engine.rundir import write_run_info
from cxr.engine.seed import gather_rng_states, seed_everything
from cxr.errors import CxrError


@dataclass(frozen=True)
class ToyData:
    n: int = 40
    size: int = 8


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    device: str = "cpu"
    lr: float = 1e-2
    channels: int = 4
    noise: float = 0.1  # drawn from the global torch RNG: resume must restore it exactly
    data: ToyData = field(default_factory=ToyData)
    train: StepTrainConfig = field(default_factory=lambda: StepTrainConfig(
        batch_size=8, steps=20, log_every=1, image_every=0, ckpt_every=10, keep_last=2,
        amp="off", channels_last=False, deterministic=False))


class ToyNet(nn.Module):
    """A two-layer denoiser; ``model_args`` rebuilds it."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.model_args = {"channels": channels}
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ToyImages(Dataset):
    """Deterministic smooth images, a pure function of the index."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(1234)
        coarse = torch.rand(n, 1, 3, 3, generator=g)
        self.images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.05 * step)


def train(cfg: ToyConfig, run_dir: Path, resume: bool, info: DistInfo, hang_at: int | None = None,
          nan_at: int | None = None, step_delay: float = 0.0) -> int:
    seed_everything(cfg.seed + info.rank, cfg.train.deterministic)
    net = ToyNet(cfg.channels).to(info.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.train.keep_last)
    start = 0
    if resume:
        start = load(run_dir, {"net": net}, {"opt": opt}, {"sched": sched}, rank=info.rank)["step"]
    elif info.is_main:
        write_run_info(run_dir, cfg, info.device, {"world_size": info.world_size})
    model = wrap_ddp(net, info)
    log = RunLogger(run_dir, enabled=info.is_main, resume_step=start if resume else None,
                    tensorboard=False)
    stream = infinite_loader(ToyImages(cfg.data.n, cfg.data.size), cfg.train.batch_size, info,
                             cfg.seed, cfg.train.num_workers, start_step=start)
    t = cfg.train

    def save(step: int) -> None:
        rng = gather_rng_states(info)  # every rank's streams, so each resumes its own
        if info.is_main:
            ckpt.save(step, {"net": net}, {"opt": opt}, {"sched": sched},
                      model_args={"net": net.model_args}, extra={"note": "toy"}, rng=rng)
        barrier(info)

    with GracefulInterrupt(quiet=not info.is_main) as stop:
        for step in range(start + 1, t.steps + 1):  # ``step`` = optimizer steps done after this one
            x = next(stream)["image"].to(info.device)
            noisy = x + cfg.noise * torch.randn_like(x) if cfg.noise else x
            # python and numpy RNGs are part of the state too
            jitter = 1.0 + 0.01 * (random.random() - float(np.random.rand())) if cfg.noise else 1.0
            loss = F.mse_loss(model(noisy), x) * jitter
            if nan_at == step:
                loss = loss * float("nan")
            check_finite({"loss": loss}, step, ckpt.last_saved)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            mean_loss = all_reduce_mean(loss.detach(), info)
            if t.log_every and step % t.log_every == 0:
                log.scalars(step, {"loss": mean_loss, "lr": sched.get_last_lr()[0]})
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                save(step)
            if hang_at == step:
                (run_dir / "hanging").write_text(str(step))
                time.sleep(600)
            if step_delay:
                time.sleep(step_delay)
            if any_process(stop.requested, info):
                if ckpt.last_saved is None or ckpt.last_saved.name != f"step-{step:08d}":
                    save(step)
                log.text(f"interrupted at step {step}; checkpoint saved")
                log.close()
                return EXIT_INTERRUPTED
    log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    parser = add_run_arguments(argparse.ArgumentParser(prog="engine_toy"))
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    info = None
    try:
        cfg = resolve_run(args, ToyConfig, None)
        if print_dry_run(args, cfg):
            return 0
        info = setup_distributed(cfg.device)
        run_dir = prepare_run_dir(args, "toy", info=info)
        return train(cfg, run_dir, args.resume, info, args.hang_at, args.nan_at, args.step_delay)
    except CxrError as e:
        print(f"engine_toy: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())


def reset_compile_counters() -> None:
    """Start a compiled test from a clean slate: no graphs, recompile counts or counters left by
    an earlier test in the same process."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def assert_cuda_graphs_ran() -> None:
    """What was compiled since :func:`reset_compile_counters` really replays CUDA graphs.

    Without this a test of a CUDA-graph mode passes just as well when Inductor skipped the
    graphs ("skipping cudagraphs due to ...") or Dynamo fell back to eager.
    """
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0, "torch.compile compiled nothing"
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"Inductor skipped CUDA graphs {skips} time(s); its log says why"
