"""``cxr train-gan <model>``: train a GAN from a YAML config plus ``key=value`` overrides.

    cxr train-gan cyclegan --config cyclegan_nlm data.a=PATH data.b=PATH
    cxr train-gan cyclegan --run-dir runs/00003-cyclegan --resume
    cxr train-gan cyclegan --config cyclegan_tiny --dry-run
    cxr train-gan cyclegan --list-configs
    cxr train-gan stylegan2 --config stylegan2_tiny data.train=TREE

Parse → check → frozen config → :func:`gan.cyclegan.trainer.train`. A config typo, a missing
dataset folder or a tree without images is one line and exit 2; Ctrl-C saves a checkpoint and
exits 130. Multi-GPU: ``torchrun --nproc_per_node N -m cxr.cli.main train-gan cyclegan
--run-dir DIR ...`` (every process must be given the same run folder).
"""

from __future__ import annotations

import argparse
import os
import sys

from cxr.cli.common import check_trainer_inputs
from cxr.engine.cli import add_run_arguments, discard_failed_run, prepare_checked_run_dir, print_dry_run, resolve_run
from cxr.engine.guards import EXIT_INTERRUPTED
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.trainer import MODEL_FAMILY, check_config, train
from gan.stylegan2 import trainer as stylegan2

DEFAULT_CYCLEGAN = "cyclegan_nlm"  # a shipped config (cxr.configs)
DEFAULT_STYLEGAN2 = "stylegan2_nlm"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train-gan", help="train a GAN (cyclegan, stylegan2) from a config",
                       description="Train a GAN; every run writes a numbered folder under runs/ "
                                   "(config.yaml, run.json, stats.jsonl, TensorBoard, checkpoints).")
    models = p.add_subparsers(dest="gan_model", metavar="MODEL", required=True)
    c = models.add_parser(
        "cyclegan", help="unpaired translation between two dataset trees (domain A <-> B)",
        description="CycleGAN (Zhu et al. 2017) between two dataset trees that `cxr datasets "
                    "inspect` reads: data.a (default: the phantom's Montgomery-like tree) and data.b "
                    "(default: its Shenzhen-like tree). Trains on each tree's patient-level training "
                    "split only, unless data.split=all; the run folder lists those images in "
                    "images_seen.txt.",
        epilog=f"default config: {DEFAULT_CYCLEGAN}. Options and KEY=VALUE overrides may come in any order. "
               "Common keys: data.a, data.b, data.size, data.prematch, train.batch_size, train.steps, seed, "
               "device.")
    add_run_arguments(c, configs="cyclegan_")
    c.set_defaults(func=run_cyclegan)
    s = models.add_parser(
        "stylegan2", help="class-conditional StyleGAN2-ADA on one dataset tree (synthetic images)",
        description="StyleGAN2 with adaptive discriminator augmentation (Karras et al. 2020) on data.train, "
                    "a tree that `cxr datasets inspect` reads, conditioned on its labels (TB / normal, the "
                    "nine classes, NIH 14 multi-hot; model.conditional=false: none). Trains on the tree's "
                    "patient-level training split only, unless data.split=all; the run folder lists those "
                    "images in images_seen.txt.",
        epilog=f"default config: {DEFAULT_STYLEGAN2}. Options and KEY=VALUE overrides may come in any order. "
               "Common keys: data.train, data.size, model.preset, model.conditional, ada.mode, train.kimg, "
               "train.batch_size, seed, device.")
    add_run_arguments(s, configs="stylegan2_")
    s.set_defaults(func=run_stylegan2)
    return p


def run_cyclegan(args: argparse.Namespace) -> int:
    cfg = resolve_run(args, CycleGANConfig, DEFAULT_CYCLEGAN, family=MODEL_FAMILY)
    if print_dry_run(args, cfg):
        return 0
    check_config(cfg)
    run_dir = prepare_checked_run_dir(args, "cyclegan",
                                      lambda: check_trainer_inputs(cfg, ("a", "b"), hinted=("a", "b")))

    with discard_failed_run(args, run_dir):
        result = train(cfg, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{'interrupted' if result.interrupted else 'trained'} {result.steps_done}/{cfg.train.steps} steps "
              f"in {result.seconds:.0f} s ({result.images_per_second:.1f} images/s); run folder {run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.interrupted:
            print(f"resume with: cxr train-gan cyclegan --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0


def run_stylegan2(args: argparse.Namespace) -> int:
    cfg = resolve_run(args, stylegan2.StyleGAN2Config, DEFAULT_STYLEGAN2, family=stylegan2.MODEL_FAMILY)
    if print_dry_run(args, cfg):
        return 0
    stylegan2.check_config(cfg)

    run_dir = prepare_checked_run_dir(args, "stylegan2", lambda: check_trainer_inputs(cfg, ("train",)))
    with discard_failed_run(args, run_dir):
        result = stylegan2.train(cfg, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        total = cfg.train.total_steps
        print(f"{'interrupted' if result.interrupted else 'trained'} {result.steps_done}/{total} steps "
              f"({result.kimg:g} kimg, ADA p {result.p:.3f}) in {result.seconds:.0f} s; run folder {run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.interrupted:
            print(f"resume with: cxr train-gan stylegan2 --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0
