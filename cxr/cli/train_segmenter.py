"""``cxr train-segmenter``: train a lung-segmentation U-Net from a config.

    cxr train-segmenter --config segmenter_nlm data.train=data/phantom/MontgomerySet
    cxr train-segmenter --config segmenter_tiny data.train=TREE train.epochs=5
    cxr train-segmenter --run-dir runs/00007-segmenter --resume

Parse → check → frozen config → :func:`classifiers.segmenter.train`. A config typo, a missing
tree or a tree without lung masks is one line and exit 2; Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
from typing import Any

from classifiers.segmenter import MODEL_FAMILY, SegmenterConfig, train
from cxr.cli.common import run_epoch_trainer
from cxr.engine.cli import add_run_arguments

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
    return run_epoch_trainer(args, SegmenterConfig, DEFAULT_CONFIG, MODEL_FAMILY, train, "train-segmenter", _score_line)


def _score_line(cfg: SegmenterConfig, name: str, m: dict[str, Any]) -> str:
    return (f"{name}: dice {m['dice']:.4f} (left {m['dice_left']:.4f}, right {m['dice_right']:.4f}), "
            f"iou {m['iou']:.4f}, hd95 left {m['hd95_left']:.2f} px, right {m['hd95_right']:.2f} px")
