"""``cxr train-segmenter``: train a lung-segmentation U-Net from a config.

    cxr train-segmenter --config segmenter_nlm data.train=data/phantom/MontgomerySet
    cxr train-segmenter --config segmenter_tiny data.train=TREE train.epochs=5
    cxr train-segmenter --run-dir runs/00007-segmenter --resume

Parse → check → frozen config → :func:`classifiers.segmenter.train`. A config typo, a missing
tree or a tree without lung masks is one line and exit 2; Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from classifiers.segmenter import MODEL_FAMILY, SegmenterConfig, train
from cxr.cli.common import check_trainer_inputs
from cxr.engine.cli import add_run_arguments, discard_failed_run, prepare_checked_run_dir, print_dry_run, resolve_run
from cxr.engine.guards import EXIT_INTERRUPTED

DEFAULT_CONFIG = "segmenter_nlm"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-segmenter", help="train a lung-segmentation U-Net on trees with lung masks (Montgomery, phantom)",
        description="Train a U-Net for the left and right lungs (Dice + BCE) on every image with lung masks of "
                    "the training trees, split by patient like every trainer. Each epoch ends with validation "
                    "Dice (best checkpoint, early stopping); the best checkpoint is scored at the end (Dice, IoU, "
                    "HD95 per lung) into scores_<set>.json.",
        epilog=f"default config: {DEFAULT_CONFIG}. Common keys: data.train, data.val, data.test, data.size, "
               "model.depth, model.width, train.epochs, train.batch_size, train.patience, augment.enabled, seed, "
               "device.")
    add_run_arguments(p, configs="segmenter_")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = resolve_run(args, SegmenterConfig, DEFAULT_CONFIG, family=MODEL_FAMILY)
    if print_dry_run(args, cfg):
        return 0
    run_dir = prepare_checked_run_dir(args, MODEL_FAMILY, lambda: check_trainer_inputs(cfg, ("train", "val", "test")))
    main = int(os.environ.get("RANK", "0")) == 0
    with discard_failed_run(args, run_dir):
        result = train(cfg, run_dir, resume=args.resume, echo=lambda m: print(m, file=sys.stderr, flush=True))
    if main:
        state = "interrupted" if result.interrupted else "stopped early" if result.stopped_early else "trained"
        print(f"{state} after {result.epochs_done}/{cfg.train.epochs} epochs ({result.steps_done} steps) "
              f"in {result.seconds:.0f} s; run folder {run_dir}")
        for name, m in result.results.items():
            print(f"{name}: dice {m['dice']:.4f} (left {m['dice_left']:.4f}, right {m['dice_right']:.4f}), "
                  f"iou {m['iou']:.4f}, hd95 left {m['hd95_left']:.2f} px, right {m['hd95_right']:.2f} px")
        if result.interrupted:
            print(f"resume with: cxr train-segmenter --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0
