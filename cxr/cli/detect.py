"""``cxr detect``: a trained detector's submission file for a VinDr-CXR tree.

    cxr detect --checkpoint runs/00007-detector --in data/vindr --out submission.csv

Writes ``image_id,PredictionString`` (the competition's format: ``class score x_min y_min x_max
y_max ...``, ``14 1 0 0 1 1`` for an image called "No finding"), boxes in each image's original
pixels (through ``train_meta.csv`` for a resized PNG tree). The file is written atomically; an
existing ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifiers.detector import detect_tree
from cxr.cli.common import check_out_file
from cxr.errors import DataError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("detect", help="apply a trained VinDr detector to a tree (competition submission CSV)",
                       description="Apply a detector checkpoint to every image of a VinDr-CXR tree and write "
                                   "image_id,PredictionString rows with boxes in each image's original pixels; "
                                   "an image whose best box scores below the 'No finding' threshold gets the "
                                   "row '14 1 0 0 1 1'.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="run folder (its best checkpoint) or one checkpoint folder")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="TREE",
                   help="VinDr-CXR tree (train.csv + train/, DICOM or PNG with train_meta.csv; folder or zip)")
    p.add_argument("--out", required=True, type=Path, metavar="CSV", help="the submission file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-finding-threshold", type=float, default=None, metavar="T",
                   help="call an image 'No finding' when no box scores T or more (default: the threshold "
                        "stored with the checkpoint, tuned on validation)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    if not args.src.exists():
        raise DataError(args.src, "no such folder or archive")
    report = detect_tree(args.checkpoint, args.src, args.out, device=args.device, threshold=args.no_finding_threshold,
                         layout=args.layout, skip_bad=args.skip_bad, overwrite=args.overwrite,
                         echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {report['out']}: {report['images']} images, {report['no_finding']} called 'No finding' "
          f"(threshold {report['threshold']:g}; checkpoint {report['checkpoint']})")
    return 0
