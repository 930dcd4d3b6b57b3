"""The one training loop (cxr/engine/loop.py) with a family whose validation is scripted.

The engine toy (tests/engine_toy.py) covers the guards, resume and DDP through subprocesses;
these check evaluation points, the best checkpoint, early stopping and the loop state that a
resume must carry, in-process.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from cxr.engine.checkpoint import load_state, read_meta
from cxr.engine.config import StepTrainConfig
from cxr.engine.distributed import DistInfo
from cxr.engine.loop import Evaluation, Family, main_first, run_training
from cxr.errors import ConfigError


@dataclass(frozen=True)
class Cfg:
    seed: int = 0
    device: str = "cpu"
    train: StepTrainConfig = field(default_factory=lambda: StepTrainConfig(keep_last=0, log_every=1))


class Scripted(Family):
    """A one-weight model; evaluation every ``every`` steps returns the next scripted metric."""

    name = "scripted"

    def __init__(self, metrics: list[float], every: int = 2, patience: int = 0, higher: bool = True):
        self.metrics, self.every, self.patience, self.higher = list(metrics), every, patience, higher
        self.total_steps = every * len(metrics)
        self.log_every = 1
        self.seen_train_means: list[dict[str, float]] = []
        self.finished = None

    def setup(self, run):
        self.w = nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.w.parameters(), lr=0.1)
        return {"scripted": True}

    def modules(self):
        return {"w": self.w}

    def optimizers(self):
        return {"sgd": self.opt}

    def model_args(self):
        return {"w": {"in": 1}}

    def train_step(self, step):
        loss = (self.w(torch.ones(1, 1)) - 1).pow(2).mean() * 0 + step  # the loss is the step index
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def evaluation_due(self, step):
        return step % self.every == 0

    def evaluate(self, step, train_means):
        self.seen_train_means.append(train_means)
        value = self.metrics[step // self.every - 1]
        return Evaluation(value, self.higher, scalars={"val/metric": value}, row={"step": step, "metric": value},
                          message=f"step {step}: metric {value}")

    def finish(self, result, run):
        self.finished = result


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_best_checkpoint_and_early_stopping(tmp_path):
    fam = Scripted([0.5, 0.7, 0.6, 0.65, 0.9], every=2, patience=2)
    result = run_training(Cfg(), tmp_path, fam)
    # 0.7 at step 4 is best; 0.6 and 0.65 are two evaluations without improvement: stop at step 8
    assert result.stopped_early and result.steps_done == 8 and not result.interrupted
    assert fam.finished is result
    best = read_meta(tmp_path / "checkpoints" / "best")
    assert best["step"] == 4 and best["metric"] == pytest.approx(0.7)
    log = (tmp_path / "log.txt").read_text()
    assert "step 4: metric 0.7 (best)" in log and "step 6: metric 0.6\n" in log
    assert "early stop: no improvement for 2 evaluations" in log
    # every evaluation saw the mean training loss of its own steps, and only those
    assert [m["loss"] for m in fam.seen_train_means] == [0.5, 2.5, 4.5, 6.5]
    assert [r["metric"] for r in _rows(tmp_path / "summary.csv") if r.get("metric")] == ["0.5", "0.7", "0.6", "0.65"]


def test_lower_is_better_and_loop_state_in_checkpoints(tmp_path):
    fam = Scripted([3.0, 2.0, 2.5], every=1, higher=False)
    result = run_training(Cfg(), tmp_path, fam)
    assert result.steps_done == 3 and not result.stopped_early
    assert read_meta(tmp_path / "checkpoints" / "best")["step"] == 2
    extra = load_state(result.last_checkpoint)["extra"]  # the loop's own state, for a resume
    assert extra["best"] == pytest.approx(2.0) and extra["bad_epochs"] == 1 and extra["family"] == "scripted"


def test_main_first_in_one_process_builds_and_passes_errors_through():
    calls = []
    assert main_first(DistInfo(device=torch.device("cpu")), lambda build: calls.append(build) or 7) == 7
    assert calls == [True]

    def bad(build):
        raise ConfigError("data.a: no such folder")

    with pytest.raises(ConfigError, match="no such folder"):
        main_first(DistInfo(device=torch.device("cpu")), bad)
