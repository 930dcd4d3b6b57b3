"""``cxr train-gan <model>``: train a GAN from a YAML config plus ``key=value`` overrides.

    cxr train-gan cyclegan --config cyclegan_nlm data.a=PATH data.b=PATH
    cxr train-gan cyclegan --run-dir runs/00003-cyclegan --resume
    cxr train-gan cyclegan --config cyclegan_tiny --dry-run
    cxr train-gan cyclegan --list-configs
    cxr train-gan stylegan2 --config stylegan2_tiny data.train=TREE
    cxr train-gan cut --config cut_nlm data.a=PATH data.b=PATH       # fastcut_nlm, or model.mode=fastcut
    cxr train-gan stylegan2 --config stylegan2_nlm data.train=TREE train.fid_kimg=10   # FID snapshots, best/

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
from gan.cut import trainer as cut
from gan.cut.config import CUTConfig
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.trainer import MODEL_FAMILY, check_config, train
from gan.stylegan2 import trainer as stylegan2

DEFAULT_CYCLEGAN = "cyclegan_nlm"  # a shipped config (cxr.configs)
DEFAULT_STYLEGAN2 = "stylegan2_nlm"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train-gan", help="train a GAN (cyclegan, cut, stylegan2) from a config",
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
               "train.batch_size, train.fid_kimg (FID snapshots, best/ by the lowest FD), seed, device.")
    add_run_arguments(s, configs="stylegan2_")
    s.set_defaults(func=run_stylegan2)
    t = models.add_parser(
        "cut", help="CUT / FastCUT: unpaired translation A -> B with one generator and PatchNCE",
        description="Contrastive unpaired translation (Park et al. 2020) from data.a to data.b, two trees that "
                    "`cxr datasets inspect` reads; model.mode=cut (PatchNCE with its identity term) or fastcut "
                    "(without, lambda_NCE 10). Trains on each tree's patient-level training split only (the "
                    "CycleGAN's), unless data.split=all; the run folder lists those images in images_seen.txt.",
        epilog=f"default config: {cut.DEFAULT_CONFIG}. Options and KEY=VALUE overrides may come in any order. "
               "Common keys: data.a, data.b, data.size, model.mode, loss.lambda_nce, loss.num_patches, "
               "train.batch_size, train.steps, seed, device.")
    add_run_arguments(t, configs=("cut_", "fastcut_"))
    t.set_defaults(func=run_cut)
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


def run_cut(args: argparse.Namespace) -> int:
    cfg = resolve_run(args, CUTConfig, cut.DEFAULT_CONFIG, family=cut.MODEL_FAMILY)
    if print_dry_run(args, cfg):
        return 0
    cut.check_config(cfg)
    run_dir = prepare_checked_run_dir(args, cfg.model.mode,
                                      lambda: check_trainer_inputs(cfg, ("a", "b"), hinted=("a", "b")))
    with discard_failed_run(args, run_dir):
        result = cut.train(cfg, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{'interrupted' if result.interrupted else 'trained'} {cfg.model.mode} {result.steps_done}/"
              f"{cfg.train.steps} steps in {result.seconds:.0f} s ({result.images_per_second:.1f} images/s); "
              f"run folder {run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.interrupted:
            print(f"resume with: cxr train-gan cut --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0


def run_stylegan2(args: argparse.Namespace) -> int:
    cfg = resolve_run(args, stylegan2.StyleGAN2Config, DEFAULT_STYLEGAN2, family=stylegan2.MODEL_FAMILY)
    if print_dry_run(args, cfg):
        return 0
    stylegan2.check_config(cfg)

    metrics_fn = None
    if cfg.train.fid_interval:
        # lazy: the snapshots' feature extractors import torchvision and the classifier trainer,
        # which `cxr --help` and runs without snapshots never need
        from eval.gan_snapshots import fid_metrics

        metrics_fn = fid_metrics(cfg, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    run_dir = prepare_checked_run_dir(args, "stylegan2", lambda: check_trainer_inputs(cfg, ("train",)))
    with discard_failed_run(args, run_dir):
        result = stylegan2.train(cfg, run_dir, resume=args.resume, metrics_fn=metrics_fn)
    if int(os.environ.get("RANK", "0")) == 0:
        total = cfg.train.total_steps
        print(f"{'interrupted' if result.interrupted else 'trained'} {result.steps_done}/{total} steps "
              f"({result.kimg:g} kimg, ADA p {result.p:.3f}) in {result.seconds:.0f} s; run folder {run_dir}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.best_fd is not None:
            print(f"best FD {result.best_fd:.4g} ({result.fid_extractor}): {result.best}")
        if result.interrupted:
            print(f"resume with: cxr train-gan stylegan2 --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0
