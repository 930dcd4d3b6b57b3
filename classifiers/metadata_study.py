"""The metadata-only baseline on the real NIH ChestX-ray14 metadata: a real result, offline.

torchxrayvision ships the full NIH ``Data_Entry_2017_v2020.csv`` (112,120 images of 30,805
patients), so this study runs anywhere without a single image: an MLP on age, sex, view
position and follow-up number (:mod:`classifiers.metadata`) predicts the 14 findings. Any image
model's NIH AUROC should be read against it: whatever this reaches comes from who was imaged
and how, not from the pixels.

Protocol: patient-level split (the official ``train_val_list.txt`` / ``test_list.txt`` when they
sit next to a user-provided CSV, validation carved by patient out of the official training
part; otherwise :func:`cxr.data.splits.split_records`, stratified, seeded); feature statistics
fitted on train only; Adam on mini-batches of the NaN-masked BCE; early stopping on validation
macro AUROC; per-label thresholds chosen on validation (Youden); test per-label and macro
AUROC with patient-level bootstrap 95 % CIs (a patient's follow-ups are resampled together).

Writes into ``run_dir``: ``config.yaml`` + ``run.json``, ``stats.jsonl``/``summary.csv`` per
epoch, ``checkpoints/`` (safetensors; ``model_args`` holds the fitted :class:`MetaStats`),
and ``test.json``/``test.csv`` (see :mod:`cxr.metrics.results`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from classifiers.metadata import META_FEATURES, metadata_matrix
from classifiers.models import build_classifier, model_args
from classifiers.trainer import masked_bce
from cxr.data.record import NIH14, Sample
from cxr.data.sources.nih import SITE, read_nih_metadata, shipped_nih_metadata_path
from cxr.data.splits import split_records
from cxr.data.tasks import get_task
from cxr.engine.checkpoint import CheckpointManager
from cxr.engine.logging import RunLogger
from cxr.engine.rundir import write_run_info
from cxr.engine.seed import seed_everything
from cxr.errors import ConfigError, DataError
from cxr.metrics.classification import choose_thresholds, task_metrics
from cxr.metrics.intervals import bootstrap_task_metrics
from cxr.metrics.results import write_results

SPLIT_LISTS = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
MODULE = "model"  # the checkpoint's module name


@dataclass(frozen=True)
class MetadataStudyConfig:
    """Everything the study depends on; saved as the run's ``config.yaml``."""

    seed: int = 0
    metadata_csv: str | None = None  # None: the copy torchxrayvision ships
    max_rows: int | None = None  # first N rows of the CSV (tests, quick looks)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0  # the image classifiers' default (data.split_seed): same test patients
    hidden: tuple[int, ...] = (64, 64)
    dropout: float = 0.1
    epochs: int = 40  # upper bound; early stopping usually ends sooner
    patience: int = 5  # epochs without a better validation macro AUROC before stopping
    batch_size: int | None = None  # None: about 50 steps an epoch, within 64..1024 (small trees still train)
    lr: float = 2e-3
    weight_decay: float = 1e-5
    n_boot: int = 1000  # patient-level bootstrap resamples for the test CIs (0: none)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or (self.batch_size is not None and self.batch_size < 1) or self.lr <= 0:
            raise ConfigError("metadata study: epochs, patience and batch_size must be >= 1 and lr > 0")
        if self.n_boot < 0:
            raise ConfigError(f"metadata study: n_boot must be >= 0, got {self.n_boot}")
        if self.max_rows is not None and self.max_rows < 10:
            raise ConfigError(f"metadata study: max_rows must be >= 10, got {self.max_rows}")


# ----------------------------------------------------------------------------------------------
# Data


def official_splits(folder: Path) -> dict[str, str]:
    """Image name → ``"train"``/``"test"`` from NIH's split lists in ``folder`` ({} if absent)."""
    split: dict[str, str] = {}
    for name, which in SPLIT_LISTS:
        path = folder / name
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            image = line.strip()
            if not image:
                continue
            if split.get(image, which) != which:
                raise DataError(f"{path}:{n}", f"image {image!r} is in both split lists")
            split[image] = which
    return split


def records_from_frame(frame: pd.DataFrame, splits: dict[str, str] | None = None) -> list[Sample]:
    """One metadata-only :class:`Sample` per row of :func:`read_nih_metadata`'s frame."""
    labels = frame[list(NIH14)].to_numpy(dtype=np.float32)
    splits = splits or {}
    ages = frame["age"].to_numpy(dtype=np.float64)
    follow = frame["follow_up"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    out = []
    for k, (image, pid, sex, view) in enumerate(zip(frame["image"], frame["patient_id"],
                                                    frame["sex"], frame["view"])):
        out.append(Sample(
            image=image, patient_id=pid, site=SITE, labels=labels[k], label_names=NIH14,
            age=None if math.isnan(ages[k]) else float(ages[k]),
            sex=sex if isinstance(sex, str) else None, view=view if isinstance(view, str) else None,
            follow_up=None if math.isnan(follow[k]) else int(follow[k]),
            split=splits.get(image), source="real",
        ))
    return out


def load_metadata_records(metadata_csv: Path | None = None, max_rows: int | None = None
                          ) -> tuple[list[Sample], Path, bool]:
    """The NIH rows as samples, the CSV they came from, and whether an official split applies."""
    path = Path(metadata_csv) if metadata_csv is not None else shipped_nih_metadata_path()
    if not path.is_file():
        raise DataError(path, "no such NIH metadata file")
    frame = read_nih_metadata(path)
    if max_rows is not None:
        frame = frame.iloc[:max_rows]  # file order keeps each patient's films together
    splits = official_splits(path.parent) if metadata_csv is not None else {}
    records = records_from_frame(frame, splits)
    official = bool(splits) and all(r.split in ("train", "test") for r in records) \
        and any(r.split == "test" for r in records)
    if not records:
        raise DataError(path, "holds no metadata rows")
    return records, path, official


# ----------------------------------------------------------------------------------------------
# Training


def _probs(model: nn.Module, x: torch.Tensor, batch: int = 65536) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()


def run_metadata_study(run_dir: Path, seed: int = 0, epochs: int = 40, metadata_csv: Path | None = None,
                       n_boot: int = 1000, max_rows: int | None = None, progress: bool = True,
                       **overrides: Any) -> dict[str, Any]:
    """Train and test the metadata MLP on NIH metadata; return the test metrics.

    ``overrides`` are further :class:`MetadataStudyConfig` fields (``lr``, ``batch_size``,
    ``hidden``, ``patience``, ...). The returned dict is the test metrics (``auroc`` = macro,
    ``auroc/<label>`` per label) with ``"intervals"`` (95 % CIs) and ``"extra"`` (counts,
    imputation, training history) added.
    """
    try:
        cfg = MetadataStudyConfig(seed=seed, epochs=epochs, n_boot=n_boot, max_rows=max_rows,
                                  metadata_csv=None if metadata_csv is None else str(metadata_csv),
                                  **overrides)
    except TypeError as e:
        raise ConfigError(f"metadata study: {e}") from None
    run_dir = Path(run_dir)
    task = get_task("nih14")
    started = time.time()
    seed_everything(cfg.seed)
    log = RunLogger(run_dir, tensorboard=False)

    def say(msg: str) -> None:
        log.text(msg, echo=progress)

    records, csv_path, official = load_metadata_records(metadata_csv, cfg.max_rows)
    parts = split_records(records, cfg.split_fractions, seed=cfg.split_seed, use_official=official)
    x_train, stats = metadata_matrix(parts["train"])
    x_val, val_stats = metadata_matrix(parts["val"], stats)
    x_test, test_stats = metadata_matrix(parts["test"], stats)
    y = {k: task.targets(np.stack([r.labels for r in v]), where=f"{csv_path} ({k})") for k, v in parts.items()}
    counts = {k: {"images": len(v), "patients": len({r.patient_id for r in v})} for k, v in parts.items()}
    imputed = {"train": stats.n_imputed_age, "val": val_stats.n_imputed_age, "test": test_stats.n_imputed_age}
    write_run_info(run_dir, cfg, "cpu", extra={"task": "nih14", "model": "metadata_mlp",
                                               "metadata_csv": str(csv_path), "official_split": official,
                                               "counts": counts})
    say(f"NIH metadata {csv_path}: {len(records)} images; split "
        f"{'official lists' if official else 'patient-level, stratified'}: "
        + ", ".join(f"{k} {c['images']} images / {c['patients']} patients" for k, c in counts.items())
        + f"; ages imputed with the train median {stats.age_median:g}: "
        + ", ".join(f"{k} {n}" for k, n in imputed.items()))

    model = build_classifier("metadata_mlp", task.num_outputs, meta_features=len(META_FEATURES),
                             hidden=cfg.hidden, dropout=cfg.dropout, meta_stats=stats.to_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y["train"])
    xv = torch.from_numpy(x_val)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch_size = cfg.batch_size or min(1024, max(64, len(xt) // 50))
    ckpt = CheckpointManager(run_dir, keep_last=1)
    best_auc, best_epoch, best_state, stale = -math.inf, 0, None, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total, n_seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = masked_bce(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n_seen += len(idx)
        val_auc = task_metrics(task, y["val"], _probs(model, xv), keys=("auroc",))["auroc"]
        row = {"epoch": epoch, "train_loss": total / max(n_seen, 1), "val_auroc": val_auc}
        history.append(row)
        log.scalars(epoch, row)
        log.summary(row)
        improved = math.isfinite(val_auc) and val_auc > best_auc
        say(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val macro AUROC {val_auc:.4f}"
            + (" (best)" if improved else ""))
        if improved:
            best_auc, best_epoch, stale = val_auc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            ckpt.save(epoch, {MODULE: model}, optimizers={"adam": opt}, metric=val_auc,
                      model_args={MODULE: model_args(model)},
                      extra={"task": task.name, "meta_stats": stats.to_dict(), "epoch": epoch})
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)

    p_val = _probs(model, xv)
    p_test = _probs(model, torch.from_numpy(x_test))
    thresholds = choose_thresholds(task, y["val"], p_val)
    metrics = task_metrics(task, y["test"], p_test, thresholds)
    intervals = {}
    if cfg.n_boot:
        say(f"bootstrapping {cfg.n_boot} patient-level resamples of the test set")
        intervals = bootstrap_task_metrics(task, y["test"], p_test, thresholds,
                                           [r.patient_id for r in parts["test"]], n_boot=cfg.n_boot,
                                           seed=cfg.seed, keys=("auroc",))
    extra = {
        "task": task.name, "model": "metadata_mlp", "features": list(META_FEATURES),
        "metadata_csv": str(csv_path), "official_split": official, "counts": counts,
        "imputed_age": imputed, "meta_stats": stats.to_dict(), "best_epoch": best_epoch,
        "val_auroc": best_auc, "epochs_run": len(history), "n_boot": cfg.n_boot,
        "seconds": round(time.time() - started, 1),
    }
    write_results(run_dir, "test", metrics, intervals, extra)
    say(f"test macro AUROC {metrics['auroc']:.4f} (best epoch {best_epoch}); results in {run_dir}")
    log.close()
    return {**metrics, "intervals": intervals, "extra": extra}
