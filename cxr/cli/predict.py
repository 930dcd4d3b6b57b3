"""``cxr predict``: a trained classifier's probabilities and decisions for every image of a tree.

    cxr predict --checkpoint runs/00004-classifier-tb --in data/phantom/MontgomerySet --out preds.csv
    cxr predict --checkpoint RUN --in TREE --out preds.csv --evaluate     # also the task's metrics

Uses the run's best checkpoint and the thresholds chosen on its validation set. The CSV has
``image, patient_id, origin, p_<label>…``, decisions (``pred_<label>…`` or ``pred``) and, when
the tree has the task's labels, ``true_<label>…``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxr.cli.common import add_workers_argument, check_out_file
from cxr.engine.distributed import resolve_device
from cxr.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="apply a trained classifier to a dataset tree (CSV of probabilities)",
                       description="Apply a classifier checkpoint to every image of a dataset tree and write one "
                                   "CSV row per image, with the operating thresholds chosen on the run's "
                                   "validation set.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="run folder (its best checkpoint) or one checkpoint folder")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="TREE",
                   help="dataset tree (folder or zip, any layout `cxr datasets inspect` reads)")
    p.add_argument("--out", required=True, type=Path, metavar="CSV", help="output CSV file")
    p.add_argument("--task", default=None, choices=("tb", "nih14", "nine"),
                   help="refuse a checkpoint trained for another task")
    p.add_argument("--evaluate", action="store_true",
                   help="also print the task's metrics (the tree must hold the task's labels)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    p.add_argument("--labels-csv", type=Path, default=None, metavar="CSV",
                   help="the label file when it is not in the tree (nih: a Data_Entry-style CSV); implies --layout nih")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    add_workers_argument(p, None, "up to 8", "decoding processes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # lazy: classifiers.predict imports torchvision (seconds), which `cxr --help` and the other
    # subcommands never need
    from classifiers.predict import predict_tree

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_out_file(args.out)
    report = predict_tree(args.checkpoint, args.src, args.out, device=resolve_device(args.device, what="--device"),
                          layout=args.layout, batch_size=args.batch_size, task=args.task,
                          evaluate=args.evaluate, skip_bad=args.skip_bad, workers=args.workers,
                          labels_csv=args.labels_csv)
    print(f"wrote {report.n} predictions ({report.layout}) to {report.out}; origin {report.origin}")
    for p in report.skipped:
        print(f"skipped: {p}")
    for note in report.notes:
        print(f"note: {note}")
    if report.metrics is not None:
        print(json.dumps({k: v for k, v in report.metrics.items() if "/" not in k}, indent=2))
    return 0
