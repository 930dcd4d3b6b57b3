"""``cxr train-detector``: train a VinDr-CXR Faster R-CNN from a config.

    cxr train-detector --config detector_vindr data.train=data/vindr
    cxr train-detector --config detector_tiny data.train=TREE train.epochs=5
    cxr train-detector --run-dir runs/00007-detector --resume

Parse → check → frozen config → :func:`classifiers.detector.train`. A config typo, a missing
tree, a tree that is not VinDr-like or a box outside its image is one line and exit 2; Ctrl-C
saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
from typing import Any

from classifiers.detector import MODEL_FAMILY, DetectorConfig, train
from cxr.cli.common import run_epoch_trainer
from cxr.engine.cli import add_run_arguments

DEFAULT_CONFIG = "detector_vindr"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-detector", help="train a Faster R-CNN for the 14 VinDr-CXR findings (readers fused by WBF)",
        description="Train a torchvision Faster R-CNN (one-channel ResNet-50-FPN, or a tiny backbone for CPUs) "
                    "on a VinDr-CXR tree, the three readers' boxes fused by weighted boxes fusion, split by "
                    "patient like every trainer. Validation mAP@0.4 with 'No finding' scored the competition's "
                    "way chooses the best checkpoint; it is scored at the end into scores_<set>.json.",
        epilog=f"default config: {DEFAULT_CONFIG}. Common keys: data.train, data.val, data.test, data.size, "
               "fusion.method, fusion.iou_thr, model.backbone, model.anchor_sizes, model.pretrained, train.epochs, "
               "train.batch_size, train.patience, eval.no_finding_threshold, seed, device (docs/detection.md).")
    add_run_arguments(p, configs="detector_")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return run_epoch_trainer(args, DetectorConfig, DEFAULT_CONFIG, MODEL_FAMILY, train, "train-detector", _score_line)


def _score_line(cfg: DetectorConfig, name: str, m: dict[str, Any]) -> str:
    return (f"{name}: mAP@{cfg.eval.iou_threshold:g} {m['map']:.4f} with 'No finding', "
            f"{m['map_findings']:.4f} findings only; 'No finding'-only baseline {m['baseline_map']:.4f}")
