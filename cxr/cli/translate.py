"""``cxr translate``: apply a trained CycleGAN generator to a whole dataset tree.

    cxr translate --checkpoint runs/00001-cyclegan --direction a2b --in data/phantom/MontgomerySet \\
        --out data/montgomery_as_shenzhen

Writes the same layout (file names, labels, readings, masks carried over; each image replaced
by its translation at its original size and format), so every loader reads the result.
Batched, on the GPU when there is one, written to a temporary folder and renamed when done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli.common import add_workers_argument, progress_bar
from cxr.engine.distributed import resolve_device
from cxr.errors import ConfigError
from gan.cyclegan.translate import load_translator, translate_tree


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("translate", help="translate a dataset tree with a trained CycleGAN generator",
                       description="Apply a CycleGAN generator (a2b: G_AB, b2a: G_BA) to every image "
                                   "of a dataset tree and write the same tree, translated.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--direction", required=True, choices=("a2b", "b2a"),
                   help="a2b: domain A → B with G_AB; b2a: B → A with G_BA")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="DIR",
                   help="dataset tree to translate (folder or zip, any layout `cxr datasets inspect` reads)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    add_workers_argument(p, 0, "0", "decoding processes")
    p.add_argument("--detail", choices=("keep", "none"), default="keep",
                   help="keep (default): add the generator's change, resized, to each original, so "
                        "images larger than the training size keep their own detail; none: write the "
                        "generator's image, resized")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="auto (default): the generator's weight average when the run kept one "
                        "(train.ema > 0), else its trained weights; ema: the average or an error; "
                        "raw: the trained weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new tree is complete")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device, what="--device")
    translator = load_translator(args.checkpoint, args.direction, device, detail=args.detail, weights=args.weights)
    with progress_bar(desc=f"translate {args.direction}", unit="img") as bar:
        report = translate_tree(args.src, args.out, translator, layout=args.layout, batch_size=args.batch_size,
                                workers=args.workers, overwrite=args.overwrite, progress=bar.update)
    print(f"translated {report.images} images ({report.layout}) and copied {report.copied} other files "
          f"to {report.out} with {translator.module} of {translator.checkpoint}")
    return 0
