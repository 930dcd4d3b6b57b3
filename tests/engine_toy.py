"""A tiny model family on ``cxr.engine``'s one training loop, for the engine's tests.

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

from cxr.engine.cli import add_run_arguments, prepare_run_dir, print_dry_run, resolve_run
from cxr.engine.config import StepTrainConfig
from cxr.engine.data import infinite_loader
from cxr.engine.distributed import cleanup, setup_distributed, wrap_ddp
from cxr.engine.guards import EXIT_INTERRUPTED
from cxr.engine.loop import Family, Run, run_training
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


class ToyFamily(Family):
    """The toy as a model family of the engine's one loop: a model, a step and a config.

    Also the smallest template for a new family. Test-only hooks: ``hang_at`` (write
    ``<run>/hanging`` and sleep, to be killed), ``nan_at`` (poison the loss), ``step_delay``.
    """

    name = "toy"

    def __init__(self, cfg: ToyConfig, hang_at: int | None = None, nan_at: int | None = None,
                 step_delay: float = 0.0):
        t = cfg.train
        self.cfg, self.hang_at, self.nan_at, self.step_delay = cfg, hang_at, nan_at, step_delay
        self.total_steps, self.log_every, self.ckpt_every = t.steps, t.log_every, t.ckpt_every
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.stream = None

    def setup(self, run: Run) -> dict:
        self.run = run
        self.net = ToyNet(self.cfg.channels).to(run.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.model = wrap_ddp(self.net, run.info)
        return {"note": "toy"}

    def modules(self) -> dict:
        return {"net": self.net}

    def optimizers(self) -> dict:
        return {"opt": self.opt}

    def schedulers(self) -> dict:
        return {"sched": self.sched}

    def model_args(self) -> dict:
        return {"net": self.net.model_args}

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if self.stream is None:  # first step of this process: the stream starts at the step reached
            self.stream = infinite_loader(ToyImages(cfg.data.n, cfg.data.size), cfg.train.batch_size,
                                          self.run.info, cfg.seed, cfg.train.num_workers, start_step=step)
        x = next(self.stream)["image"].to(self.run.device)
        noisy = x + cfg.noise * torch.randn_like(x) if cfg.noise else x
        # python and numpy RNGs are part of the state too
        jitter = 1.0 + 0.01 * (random.random() - float(np.random.rand())) if cfg.noise else 1.0
        loss = F.mse_loss(self.model(noisy), x) * jitter
        if self.nan_at == step + 1:
            loss = loss * float("nan")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": loss.detach()}

    def log_values(self, step: int, means: dict, seconds: float, steps_here: int) -> dict:
        return {"loss": means["loss"], "lr": self.sched.get_last_lr()[0]}

    def after_step(self, step: int, run: Run) -> None:
        if self.hang_at == step:
            (run.run_dir / "hanging").write_text(str(step))
            time.sleep(600)
        if self.step_delay:
            time.sleep(self.step_delay)


def train(cfg: ToyConfig, run_dir: Path, resume: bool, hang_at: int | None = None,
          nan_at: int | None = None, step_delay: float = 0.0) -> int:
    result = run_training(cfg, run_dir, ToyFamily(cfg, hang_at, nan_at, step_delay), resume=resume)
    return EXIT_INTERRUPTED if result.interrupted else 0


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
        return train(cfg, run_dir, args.resume, args.hang_at, args.nan_at, args.step_delay)
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
