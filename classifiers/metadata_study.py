"""The metadata-only baseline on the real NIH ChestX-ray14 metadata: a real result, offline.

torchxrayvision ships the full NIH ``Data_Entry_2017_v2020.csv`` (112,120 images of 30,805
patients), so this study runs anywhere without a single image: an MLP on age, sex, view
position and follow-up number (:mod:`classifiers.metadata`) predicts the 14 findings. Any image
model's NIH AUROC should be read against it: whatever this reaches comes from who was imaged
and how, not from the pixels.

This module is the study's data; the training is the classifier trainer's
(:func:`classifiers.trainer.train` with prepared sets, ``model.name: metadata_mlp``), so the
protocol is a config: the shipped ``classifier_metadata`` (``cxr/configs/``). The CSV's rows
become metadata-only :class:`~cxr.data.record.Sample` records, split by patient (the official
``train_val_list.txt`` / ``test_list.txt`` when they sit next to a user-provided CSV, validation
carved by patient out of the official training part; otherwise
:func:`cxr.data.splits.split_records`, stratified, seeded with ``data.split_seed``) into
train/val/test sets without images. The trainer fits the feature statistics on train only,
trains on the NaN-masked BCE (AdamW at a constant ``optim.lr``), stops early on validation macro
AUROC, chooses per-label thresholds on validation (Youden) and reports test per-label and macro
AUROC with patient-level bootstrap 95 % CIs (a patient's follow-ups are resampled together).

Writes into ``run_dir`` what every classifier run writes (``config.yaml`` with ``data.train``
set to the CSV read, ``run.json``, ``log.txt``, ``stats.jsonl``/``summary.csv`` per epoch,
``checkpoints/`` whose ``model_args`` hold the fitted :class:`~classifiers.metadata.MetaStats`,
``val``/``test`` ``.json``+``.csv``, ``predictions_<set>.csv``, ``thresholds.json``);
``test.json`` also records the study's own facts (the CSV, official split or not, counts per
set, imputed ages, feature statistics, best epoch).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from classifiers.config import ClassifierConfig
from classifiers.data import ImageSet
from classifiers.metadata import META_FEATURES, metadata_matrix
from classifiers.trainer import train
from cxr.configs import shipped_config
from cxr.data.record import NIH14, Sample
from cxr.data.sources.nih import SITE, read_nih_metadata, shipped_nih_metadata_path
from cxr.data.splits import split_records
from cxr.data.tasks import Task, get_task
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.config import load_config
from cxr.engine.logging import RunLogger
from cxr.errors import ConfigError, DataError
from cxr.metrics.results import read_results, write_results

SPLIT_LISTS = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
STUDY_CONFIG = "classifier_metadata"  # the shipped config that holds the protocol
MODEL = "metadata_mlp"
STEPS_PER_EPOCH, MIN_BATCH, MAX_BATCH = 50, 64, 1024  # the batch size rule (batch_size_for)


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
# The run


def study_config(overrides: Sequence[str] = ()) -> ClassifierConfig:
    """The study's protocol (the shipped ``classifier_metadata`` config) with ``key=value`` overrides."""
    return load_config(ClassifierConfig, shipped_config(STUDY_CONFIG), list(overrides))


def batch_size_for(n_train: int) -> int:
    """About 50 steps an epoch, within 64..1024 (1024 on the full CSV); never more than the
    training rows, so a small CSV still trains (one batch of all its rows)."""
    return max(1, min(n_train, max(MIN_BATCH, min(MAX_BATCH, n_train // STEPS_PER_EPOCH))))


def metadata_set(name: str, records: list[Sample], task: Task, where: str) -> ImageSet:
    """A set without images (``images=None``): the records, their labels and the task's targets."""
    labels = (np.stack([r.labels for r in records]).astype(np.float32) if records
              else np.zeros((0, len(task.label_names)), np.float32))
    return ImageSet(name, records, None, labels, task.targets(labels, where=where))


def run_metadata_study(run_dir: str | Path, cfg: ClassifierConfig | None = None, *,
                       metadata_csv: str | Path | None = None, max_rows: int | None = None,
                       auto_batch: bool = True, resume: bool = False,
                       echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and test the metadata MLP on NIH metadata in ``run_dir``; return the test metrics.

    ``cfg``: a classifier config of task nih14 and model ``metadata_mlp`` (default:
    :func:`study_config`). ``metadata_csv``: a Data_Entry CSV (default: the copy torchxrayvision
    ships); ``max_rows``: its first N rows only (tests, quick looks). ``auto_batch`` replaces
    ``train.batch_size`` by :func:`batch_size_for` the training rows. ``resume`` and ``echo``
    as in :func:`classifiers.trainer.train`.

    The returned dict is the test metrics (``auroc`` = macro, ``auroc/<label>`` per label) with
    ``"intervals"`` (95 % CIs) and ``"extra"`` (``test.json``'s other fields: counts, imputation,
    best epoch, ...) added; an interrupted run returns no metrics and ``extra["interrupted"]``.
    """
    cfg = study_config() if cfg is None else cfg
    if cfg.task != "nih14":
        raise ConfigError(f"the metadata study predicts the NIH-14 findings: task must be nih14, got {cfg.task!r}")
    if cfg.model.name != MODEL:
        raise ConfigError(f"the metadata study trains model.name={MODEL}, got {cfg.model.name!r}")
    if max_rows is not None and max_rows < 10:
        raise ConfigError(f"metadata study: max_rows must be >= 10, got {max_rows}")
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    started = time.time()

    records, csv_path, official = load_metadata_records(metadata_csv, max_rows)
    parts = split_records(records, cfg.data.split_fractions, seed=cfg.data.split_seed, use_official=official)
    sets = {k: metadata_set(k, v, task, where=f"{csv_path} ({k})") for k, v in parts.items()}
    _, stats = metadata_matrix(parts["train"])  # as the trainer fits them: for the record
    imputed = {k: metadata_matrix(v, stats)[1].n_imputed_age for k, v in parts.items()}
    counts = {k: {"images": len(v), "patients": len({r.patient_id for r in v})} for k, v in parts.items()}
    batch = batch_size_for(len(parts["train"])) if auto_batch else cfg.train.batch_size
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, train=(str(csv_path),)),
                      train=dataclasses.replace(cfg.train, batch_size=batch))

    log = RunLogger(run_dir, tensorboard=False)

    def say(msg: str) -> None:
        log.text(msg, echo=echo is None)
        if echo is not None:
            echo(msg)

    say(f"NIH metadata {csv_path}: {len(records)} images; split "
        f"{'official lists' if official else 'patient-level, stratified'}: "
        + ", ".join(f"{k} {c['images']} images / {c['patients']} patients" for k, c in counts.items())
        + f"; ages imputed with the train median {stats.age_median:g}: "
        + ", ".join(f"{k} {n}" for k, n in imputed.items()) + f"; batch size {batch}")
    result = train(cfg, run_dir, resume=resume, echo=echo, sets=sets)
    extra: dict[str, Any] = {
        "model": MODEL, "features": list(META_FEATURES), "metadata_csv": str(csv_path),
        "official_split": official, "counts": counts, "imputed_age": imputed, "meta_stats": stats.to_dict(),
        "epochs_run": result.epochs_done, "n_boot": cfg.eval.n_boot,
    }
    if result.interrupted:
        return {"intervals": {}, "extra": {**extra, "interrupted": True}}
    best = ckpt_io.read_meta(result.best)
    extra.update(best_epoch=best["step"] // (len(parts["train"]) // batch), val_auroc=best["metric"],
                 seconds=round(time.time() - started, 1))
    # the trainer wrote test.json; the study's facts join its fields there
    metrics, intervals, written = read_results(run_dir / "test.json")
    extra = {**written, **extra}
    write_results(run_dir, "test", metrics, intervals, extra)
    say(f"test macro AUROC {metrics['auroc']:.4f} (best epoch {extra['best_epoch']}); results in {run_dir}")
    log.close()
    return {**metrics, "intervals": intervals, "extra": extra}
