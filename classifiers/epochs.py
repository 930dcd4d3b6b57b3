"""What the detector and the segmenter share as trainers: one network, one optimizer, an
epoch of ``spe`` steps, a validation score with early stopping, the best checkpoint scored per
set at the end; so their result, their family's bookkeeping and the call that runs it live here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cxr.engine.loop import Family, LoopResult, run_training


@dataclass(frozen=True)
class EpochResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    interrupted: bool
    stopped_early: bool
    best: Path | None
    seconds: float
    history: list[float]  # the validation score per validation (detector: mAP@0.4 with "No finding"; segmenter: Dice)
    results: dict[str, dict[str, Any]]  # set name -> scores of the best checkpoint


class EpochFamily(Family):
    """A family with one network saved as :attr:`module`; its ``setup`` sets ``net``, ``opt``,
    ``args`` (the network's ``model_args``) and ``spe`` (steps an epoch)."""

    module: str
    net: nn.Module
    opt: torch.optim.Optimizer
    args: dict[str, Any]

    def __init__(self, cfg: Any):
        t = cfg.train
        self.cfg = cfg
        self.log_every, self.patience = t.log_every, t.patience
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.history: list[float] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.best: Path | None = None
        self.spe = 1
        self._epoch = -1

    def modules(self) -> dict[str, nn.Module]:
        return {self.module: self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def model_args(self) -> dict[str, dict]:
        return {self.module: self.args}

    def final_row(self, result: LoopResult) -> dict[str, Any]:
        return {"epoch": result.steps_done // self.spe, "step": result.steps_done, "seconds": round(result.seconds, 2)}


def train_epochs(family: EpochFamily, run_dir: str | Path, resume: bool = False,
                 echo: Callable[[str], None] | None = None) -> EpochResult:
    """Run ``family`` in ``run_dir`` (or, with ``resume``, continue it) and sum it up."""
    loop = run_training(family.cfg, run_dir, family, resume=resume, echo=echo)
    return EpochResult(loop.run_dir, loop.steps_done // family.spe, loop.steps_done, loop.interrupted,
                       loop.stopped_early, family.best, loop.seconds, family.history, family.results)
