"""The one training loop: every model family runs on it with its model, its step and its config.

A family (:class:`Family`) builds its networks, optimizers and data in :meth:`Family.setup`
and performs one optimizer step in :meth:`Family.train_step`; it may evaluate at points it
chooses (:meth:`Family.evaluation_due`, :meth:`Family.evaluate`) and finish the run
(:meth:`Family.finish`). :func:`run_training` owns everything they share, in this order:

1. processes and devices (:func:`cxr.engine.distributed.setup_distributed`), one seed per rank;
2. the run folder: checkpoints, ``run.json``, ``log.txt``, ``stats.jsonl``/TensorBoard;
3. the family's set-up, then, on resume, its modules, optimizers and state, the loop's own
   state (best metric, patience, running loss sums) and every RNG of every rank;
4. the steps, with the losses of a window of steps checked for NaN/Inf at each flush (one
   device sync; a bad value stops the run naming the step and keeps the last good checkpoint),
   out-of-memory turned into a one-line hint, a progress bar, periodic checkpoints;
5. at each evaluation point: the family's validation, the best checkpoint kept, early
   stopping after ``patience`` evaluations without improvement;
6. Ctrl-C or SIGTERM: a checkpoint at the step reached, then a clean exit (resume with
   ``--resume`` continues the same trajectory).

Stats a family logs go through :meth:`Family.log_values`; its images through
:meth:`Family.after_step`. Nothing here knows what a generator or a classifier is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from cxr.engine import checkpoint as ckpt_io
from cxr.engine.checkpoint import CheckpointManager
from cxr.engine.config import config_to_dict
from cxr.engine.distributed import DistInfo, all_reduce_mean, any_process, barrier, cleanup, setup_distributed
from cxr.engine.guards import GracefulInterrupt, OutOfMemory, check_finite, is_oom, oom_message
from cxr.engine.logging import RunLogger
from cxr.engine.rundir import write_run_info
from cxr.engine.seed import gather_rng_states, seed_everything
from cxr.errors import CxrError

T = TypeVar("T")


@dataclass
class Run:
    """What the loop hands a family: the run folder, the processes, the logger."""

    cfg: Any
    run_dir: Path
    info: DistInfo
    log: RunLogger
    checkpoints: CheckpointManager
    resume_from: Path | None
    echo: Callable[[str], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.info.device

    def say(self, msg: str) -> None:
        """A line in ``log.txt``, also shown to the user (the caller's ``echo``, else stderr)."""
        self.log.text(msg, echo=self.echo is None and self.info.is_main)
        if self.echo is not None and self.info.is_main:
            self.echo(msg)


@dataclass(frozen=True)
class Evaluation:
    """What a family's validation returns to the loop."""

    metric: float  # the value the best checkpoint and early stopping follow
    higher_is_better: bool
    scalars: dict[str, float] = field(default_factory=dict)  # to stats.jsonl / TensorBoard
    row: dict[str, Any] = field(default_factory=dict)  # a summary.csv row
    message: str = ""  # one line for the log; the loop appends " (best)"


@dataclass(frozen=True)
class LoopResult:
    run_dir: Path
    start_step: int  # where this process started (0, or the resumed checkpoint's step)
    steps_done: int
    interrupted: bool
    stopped_early: bool
    last_checkpoint: Path | None
    seconds: float


class Family:
    """A model family's part of a run. Subclasses set :attr:`name` and implement the first six
    methods; the hooks below them default to doing nothing.

    Construction order is the family's own business (it decides which RNG draws come first);
    the loop restores the checkpoint only after :meth:`setup` has built everything.
    """

    name: str = "model"
    total_steps: int = 0  # set by setup()
    log_every: int = 100
    ckpt_every: int = 0  # periodic checkpoints (0: only at evaluations, the end and interrupts)
    patience: int = 0  # evaluations without improvement before stopping; 0: never
    batch_size: int = 1  # for the out-of-memory hint
    image_size: int | None = None

    def setup(self, run: Run) -> dict[str, Any]:
        """Build data, networks and optimizers; return extra ``run.json`` fields."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def model_args(self) -> dict[str, dict]:
        """Per module: what rebuilds it (network description, input contract)."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step (``step`` counts from 0); detached scalar losses."""
        raise NotImplementedError

    # -- optional hooks -----------------------------------------------------------------------

    def schedulers(self) -> dict[str, Any]:
        """Learning-rate schedulers with a ``state_dict`` (a pure schedule function needs none)."""
        return {}

    def state(self) -> dict[str, Any]:
        """What else a checkpoint must hold to resume exactly (pools, private RNGs, EMA)."""
        return {}

    def load_state(self, extra: dict[str, Any]) -> None:
        pass

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        """Scalars to log at a flush, from the window's mean losses."""
        return means

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        """Progress-bar figures at a flush."""
        return {}

    def after_step(self, step: int, run: Run) -> None:
        """After step ``step`` (counted from 1): e.g. image grids."""

    def evaluation_due(self, step: int) -> bool:
        return False

    def evaluate(self, step: int, train_means: dict[str, float]) -> Evaluation:
        raise NotImplementedError

    def early_stop_message(self) -> str:
        return f"early stop: no improvement for {self.patience} evaluations"

    def checkpoint_extra(self) -> dict[str, Any]:
        """Plain fields stored beside the state (e.g. the selection metric's name)."""
        return {}

    def finish(self, result: LoopResult, run: Run) -> None:
        """After the last step, on every process (e.g. test-set evaluation on the main one)."""

    def final_row(self, result: LoopResult) -> dict[str, Any]:
        """The run's last ``summary.csv`` row."""
        return {"step": result.steps_done, "seconds": round(result.seconds, 2), "interrupted": result.interrupted,
                "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else ""}


def main_first(info: DistInfo, load: Callable[[bool], T]) -> T:
    """``load(build)`` on the main process first (``build=True``: fill caches), then on the
    others (``build=False``: read them), so a DDP run decodes each image once. A user error on
    the main process still meets the others at the barrier, then stops every process."""
    if not info.distributed:
        return load(True)
    failure: CxrError | None = None
    result: T | None = None
    if info.is_main:
        try:
            result = load(True)
        except CxrError as e:
            failure = e
    barrier(info)
    if failure is not None:
        raise failure
    if not info.is_main:
        result = load(False)
    return result  # type: ignore[return-value]


class _Window:
    """Losses of the steps since the last flush; checked and averaged in one device sync."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.items: list[tuple[int, dict[str, torch.Tensor]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def flush(self, last_good: Path | None) -> dict[str, float]:
        if not self.items:
            return {}
        names = list(self.items[0][1])
        device = self.items[0][1][names[0]].device
        table = torch.stack([torch.stack([ls[n].to(device).float() for n in names]) for _, ls in self.items])
        rows = all_reduce_mean(table, self.info).cpu()  # a NaN on any rank stops every rank
        for (step, _), row in zip(self.items, rows):
            check_finite(dict(zip(names, row.tolist())), step, last_good)
        self.items.clear()
        return dict(zip(names, rows.mean(0).tolist()))


def run_training(cfg: Any, run_dir: str | Path, family: Family, resume: bool = False,
                 echo: Callable[[str], None] | None = None) -> LoopResult:
    """Train ``family`` in ``run_dir`` (or, with ``resume``, continue it); see the module docstring.

    ``cfg`` needs ``seed``, ``device`` and ``train.deterministic``; it is saved with every
    checkpoint. After the loop the caller may read ``family`` for its results.
    """
    info = setup_distributed(cfg.device)
    try:
        return _run(cfg, Path(run_dir), family, resume, echo, info)
    finally:
        cleanup()


def _run(cfg: Any, run_dir: Path, family: Family, resume: bool, echo: Callable[[str], None] | None,
         info: DistInfo) -> LoopResult:
    # One random stream per rank (augmentation draws differ between the ranks' shares of a
    # batch); rank 0 seeds as a single process does, and DDP gives every rank rank 0's weights.
    seed_everything(cfg.seed + info.rank, cfg.train.deterministic)
    ckpts = CheckpointManager(run_dir, keep_last=cfg.train.keep_last)
    resume_from, resume_step = ckpt_io.resume_point(run_dir, resume)
    log = RunLogger(run_dir, enabled=info.is_main, resume_step=resume_step)
    run = Run(cfg, run_dir, info, log, ckpts, resume_from, echo)

    extra_info = family.setup(run)

    # Loop state that survives a resume: best metric, patience, loss sums since the last evaluation.
    state: dict[str, Any] = {"best": None, "bad_epochs": 0, "stopped": False, "train_sums": {}, "train_seen": 0}
    start = 0
    if resume_from is not None:
        # before run.json and config.yaml are rewritten: a checkpoint that does not fit the
        # networks (another config) stops the resume with the run folder as it was
        loaded = ckpt_io.load(resume_from, family.modules(), family.optimizers(), family.schedulers(),
                              rank=info.rank)
        family.load_state(loaded["extra"].get("family_state", {}))
        state.update({k: loaded["extra"][k] for k in state if k in loaded["extra"]})
        start = loaded["step"]
    if info.is_main:
        write_run_info(run_dir, cfg, info.device, extra={
            "family": family.name, "world_size": info.world_size, **extra_info,
            "resumed_from": str(resume_from) if resume_from else None})
    if resume_from is not None:
        run.say(f"resumed from {resume_from} at step {start}")
    args = family.model_args()
    window = _Window(info)

    def flush() -> dict[str, float]:
        n = len(window)
        means = window.flush(ckpts.last_saved)
        for k, v in means.items():
            state["train_sums"][k] = state["train_sums"].get(k, 0.0) + v * n
        state["train_seen"] += n
        return means

    def save(step: int, metric: float | None = None, higher: bool = True) -> Path | None:
        """Checkpoint after ``step`` steps (written by the main process); never saves unchecked losses."""
        flush()
        rng = gather_rng_states(info)  # every rank's streams, so each resumes its own
        path = None
        if info.is_main:
            path = ckpts.save(step, family.modules(), family.optimizers(), family.schedulers(), model_args=args, rng=rng,
                              extra={**state, "family_state": family.state(), "family": family.name,
                                     "config": config_to_dict(cfg), **family.checkpoint_extra()},
                              metric=metric, higher_is_better=higher)
            log.text(f"checkpoint {path}")
        barrier(info)
        return path

    total = family.total_steps
    interrupted = False
    last_ckpt = resume_from
    done = start
    bar = log.progress(total=total, initial=start, desc=family.name)
    t0 = time.perf_counter()
    with GracefulInterrupt() as stop:
        for step in range(start, total):
            if state["stopped"]:
                break
            try:
                losses = family.train_step(step)
            except RuntimeError as e:
                if is_oom(e):
                    raise OutOfMemory(oom_message(e, family.batch_size, family.image_size)) from None
                raise
            done = step + 1
            window.items.append((done, losses))
            evaluating = family.evaluation_due(done)
            if done % family.log_every == 0 or evaluating or done == total:
                means = flush()
                log.scalars(done, family.log_values(done, means, time.perf_counter() - t0, done - start))
                if post := family.postfix(means):
                    bar.set_postfix(post, refresh=False)
            family.after_step(done, run)
            bar.update(1)
            saved = False
            if evaluating:
                flush()
                seen = max(state["train_seen"], 1)
                train_means = {k: v / seen for k, v in state["train_sums"].items()}
                state["train_sums"], state["train_seen"] = {}, 0
                ev = family.evaluate(done, train_means)
                best = state["best"]
                improved = best is None or (math.isfinite(ev.metric) and
                                            (ev.metric > best if ev.higher_is_better else ev.metric < best))
                if improved:
                    state["best"], state["bad_epochs"] = ev.metric, 0
                else:
                    state["bad_epochs"] += 1
                if family.patience and state["bad_epochs"] >= family.patience and done < total:
                    state["stopped"] = True
                if ev.scalars:
                    log.scalars(done, ev.scalars)
                if ev.row:
                    log.summary(ev.row)
                if ev.message:
                    run.say(ev.message + (" (best)" if improved else ""))
                last_ckpt = save(done, ev.metric, ev.higher_is_better) or last_ckpt
                saved = True
                if state["stopped"]:
                    run.say(family.early_stop_message())
            periodic = family.ckpt_every > 0 and done % family.ckpt_every == 0
            if not saved and (periodic or done == total):
                last_ckpt = save(done) or last_ckpt
                saved = True
            if any_process(stop.requested, info) and done < total and not state["stopped"]:
                interrupted = True
                if not saved:
                    last_ckpt = save(done) or last_ckpt
                run.say(f"interrupted at step {done}; resume with --resume")
                break
    bar.close()
    result = LoopResult(run_dir, start, done, interrupted, bool(state["stopped"]), last_ckpt,
                        time.perf_counter() - t0)
    family.finish(result, run)
    barrier(info)
    log.summary(family.final_row(result))
    log.close()
    return result


def best_or_latest(ckpts: CheckpointManager) -> Path | None:
    """The best checkpoint when one was kept, else the latest."""
    return ckpts.best_path if ckpt_io.is_complete(ckpts.best_path) else ckpts.latest()


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a run folder stands for (:func:`best_or_latest`), or the checkpoint folder
    given (:func:`cxr.engine.checkpoint.resolve_checkpoint`): what a trained model is loaded from."""
    path = Path(path)
    if path.is_dir() and (path / ckpt_io.CKPT_DIR).is_dir():
        ckpt = best_or_latest(CheckpointManager(path, keep_last=0))
        if ckpt is None:
            raise ckpt_io.CheckpointError(f"{path}: the run folder holds no complete checkpoint")
        return ckpt
    return ckpt_io.resolve_checkpoint(path)
