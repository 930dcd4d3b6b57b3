"""``cxr train-classifier``: train a TB, NIH-14 or 9-class classifier from a config.

    cxr train-classifier --task tb --config classifier_tb data.train=PATH data.test=PATH
    cxr train-classifier --task nih14 --config classifier_nih14 data.train=[A,B]
    cxr train-classifier --run-dir runs/00004-classifier-tb --resume
    cxr train-classifier --task nih14 --model metadata_mlp        # the metadata-only study (classifier_metadata)

Parse → check → frozen config → :func:`classifiers.trainer.train`. ``--task`` and ``--model``
are shortcuts for the ``task=`` and ``model.name=`` keys. A config typo, a missing tree, a tree
without images or without the task's labels is one line and exit 2; Ctrl-C saves a checkpoint
and exits 130. Multi-GPU: ``torchrun --nproc_per_node N -m cxr.cli.main train-classifier
--run-dir DIR ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from classifiers.config import ClassifierConfig
from cxr.cli.common import check_trainer_inputs, train_and_report
from cxr.data.tasks import get_task
from cxr.engine.cli import (
    add_run_arguments,
    discard_failed_run,
    prepare_checked_run_dir,
    prepare_run_dir,
    print_dry_run,
    resolve_run,
)
from cxr.engine.guards import EXIT_INTERRUPTED
from cxr.errors import ConfigError, DataError

# The shipped config (cxr.configs) each task starts from.
FAMILY = "classifier"  # classifiers.trainer.MODEL_FAMILY, which loads torchvision (imported lazily)
DEFAULT_CONFIGS = {"tb": "classifier_tb", "nih14": "classifier_nih14", "nine": "classifier_nine"}
METADATA_MODEL, METADATA_CONFIG = "metadata_mlp", "classifier_metadata"  # the metadata study and its protocol

INPUT_KEYS = ("train", "val", "test", "synthetic", "harmonized")  # data keys naming trees to check


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-classifier", help="train a classifier (tb, nih14, nine) on real, synthetic and harmonized trees",
        description="Train a classifier; every run writes a numbered folder under runs/ (config.yaml, run.json, "
                    "stats.jsonl, summary.csv, TensorBoard, checkpoints, and at the end val/test/heldout .json+.csv "
                    "results with patient-bootstrap 95% CIs, predictions_<set>.csv and thresholds.json). "
                    "Without data.val a patient-level stratified validation split is carved from the training "
                    "trees; without data.test their held-out test split is the test set.",
        epilog="default config: classifier_<task> (classifier_metadata for --model metadata_mlp). "
               "Options and KEY=VALUE overrides may come in any order. "
               "Common keys: data.train, data.val, data.test "
               "(one path or [A,B]), data.synthetic + data.synthetic_ratio, data.harmonized, data.size, "
               "model.name, train.epochs, train.batch_size, seed, device.")
    p.add_argument("--task", choices=tuple(DEFAULT_CONFIGS), default=None,
                   help="tb (binary), nih14 (multi-label) or nine (single-label); same as task=NAME")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="network (same as model.name=NAME): small_cnn, densenet121, resnet18, resnet50, fusion; "
                        "metadata_mlp runs the metadata-only study (task nih14, config classifier_metadata)")
    add_run_arguments(p, configs="classifier_")
    p.set_defaults(func=run)
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.task:
        extra.append(f"task={args.task}")
    if args.model:
        extra.append(f"model.name={args.model}")
    return extra + list(args.overrides or ())


def _default_config(args: argparse.Namespace) -> str:
    task, model = args.task, args.model
    for item in args.overrides or ():
        key, _, value = item.partition("=")
        if key.strip() == "task":
            task = value.strip()
        elif key.strip() == "model.name":
            model = value.strip()
    if model == METADATA_MODEL:
        return METADATA_CONFIG
    return DEFAULT_CONFIGS.get(task or "tb", DEFAULT_CONFIGS["tb"])


def run(args: argparse.Namespace) -> int:
    args.overrides = _overrides(args)
    cfg = resolve_run(args, ClassifierConfig, _default_config(args), family=FAMILY)
    task = get_task(cfg.task)
    if cfg.model.name == METADATA_MODEL:  # also a resumed study, or one from a config naming it
        return _metadata_study(args, cfg, task)
    if print_dry_run(args, cfg):
        return 0
    # lazy: the classifier modules import torchvision (seconds), which `cxr --help` and the other
    # subcommands never need; they load once a run is really starting
    from classifiers.trainer import build_model, train

    with torch.device("meta"):  # unknown network or option: one line before any work (no weights)
        build_model(cfg.replace(model=dataclasses.replace(cfg.model, pretrained=None)), task)
    run_dir = prepare_checked_run_dir(args, f"classifier-{task.name}", lambda: check_trainer_inputs(cfg, INPUT_KEYS))
    return train_and_report(args, cfg, run_dir, train, "train-classifier", _result_lines)


def _result_lines(result: Any) -> list[str]:
    """Each scored set's metrics, then each distinct note of the run."""
    lines = []
    for name, m in result.results.items():
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("auroc", "cross_entropy", "accuracy", "sensitivity",
                                                      "specificity") if k in m)
        lines.append(f"{name}: {shown}")
    return lines + [f"note: {note}" for note in dict.fromkeys(result.notes)]


def _metadata_study(args: argparse.Namespace, cfg, task) -> int:
    """``--model metadata_mlp``: the NIH metadata-only study (:mod:`classifiers.metadata_study`)."""
    if task.name != "nih14":
        raise ConfigError(f"--model metadata_mlp: the metadata study predicts the NIH-14 findings; "
                          f"use --task nih14 (got task {task.name!r})")
    if print_dry_run(args, cfg):
        return 0
    from classifiers.metadata_study import run_metadata_study

    # data.train given on the command line names the metadata: a Data_Entry CSV, or an NIH tree
    # (its Data_Entry CSV); otherwise the NIH metadata torchxrayvision ships. A resumed study
    # reads the CSV its config.yaml names. The batch size follows the study's rule unless
    # train.batch_size is given here (or the run resumes with its own).
    keys = {o.split("=", 1)[0].strip() for o in (args.overrides or ())}
    csv_path = None
    if args.resume or "data.train" in keys:
        first = Path(cfg.data.train[0])
        if first.is_dir():  # the v2020 CSV when both are there
            entries = sorted(first.glob("Data_Entry_2017*.csv"), reverse=True)
            if not entries:
                raise DataError(first, "no Data_Entry_2017*.csv in this folder (the metadata study needs "
                                       "the NIH metadata CSV)")
            first = entries[0]
        if not first.is_file():
            raise DataError(f"data.train={first}", "no such metadata CSV or NIH folder")
        csv_path = first
    run_dir = prepare_run_dir(args, "metadata-nih14")
    with discard_failed_run(args, run_dir):
        result = run_metadata_study(run_dir, cfg, metadata_csv=csv_path, resume=args.resume,
                                    auto_batch=not args.resume and "train.batch_size" not in keys,
                                    echo=None if sys.stderr.isatty() else (lambda m: None))
    if result["extra"].get("interrupted"):
        print(f"resume with: cxr train-classifier --run-dir {run_dir} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"metadata study written to {run_dir}")
    if isinstance(result.get("auroc"), (int, float)):
        print(f"test macro AUROC (metadata only): {result['auroc']:.3f}")
    return 0
