"""``cxr generate``: write a synthetic dataset from a trained StyleGAN2 run, in a real layout.

    cxr generate --checkpoint runs/00001-stylegan2 --n 1000 --class Tuberculosis=0.5,normal=0.5 \\
        --truncation 0.7 --seed 0 --layout shenzhen --out data/synthetic_shenzhen

Every loader reads the tree like real data; ``cxr_generation.json`` (checkpoint hash, seed per
image, truncation, class per image, code version) marks its origin as synthetic. The same seed
gives the same bytes, whatever the batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli.common import check_out_file, progress_bar
from cxr.engine.distributed import resolve_device
from cxr.errors import ConfigError
from gan.stylegan2.generate import (
    LAYOUTS,
    check_out,
    check_truncation,
    class_counts,
    generate_tree,
    image_paths,
    load_generator,
    parse_class_mix,
    prevalence_of,
    write_grid,
    write_interpolation,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="write a synthetic dataset tree with a trained StyleGAN2 generator",
                       description="Sample a class-conditional StyleGAN2 run (G_ema when kept, else G) and "
                                   "write the images in a real dataset layout, with a labels CSV and a "
                                   "manifest, or a contact sheet (--grid) / latent walk (--interpolate).")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--n", type=int, default=None, help="images to write (with --out)")
    mix = p.add_mutually_exclusive_group()
    mix.add_argument("--class", dest="classes", metavar="MIX",
                     help="class proportions, e.g. Tuberculosis=0.5,normal=0.5 (default: equal shares of "
                          "every class of the checkpoint)")
    mix.add_argument("--match-prevalence", type=Path, metavar="TREE",
                     help="copy the class mix of this dataset tree")
    p.add_argument("--truncation", type=float, default=1.0,
                   help="ψ in [0, 1]: pull each latent toward its class's mean (1: none; default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses SeedSequence([seed, i])")
    p.add_argument("--layout", choices=LAYOUTS, default="folders", help="tree layout to write (default folders)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new tree is complete")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--grid", type=Path, metavar="PNG",
                   help="also write a class x seed contact sheet (rows: classes, columns: seeds)")
    p.add_argument("--grid-columns", type=int, default=8, help="seeds per row of --grid (default 8)")
    p.add_argument("--interpolate", type=Path, metavar="PNG",
                   help="also write a latent walk strip per class (seed 0's latent to seed 1's, in w)")
    p.add_argument("--interpolate-steps", type=int, default=8, help="images per walk (default 8)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.grid is None and args.interpolate is None:
        raise ConfigError("nothing to write: give --out DIR (with --n), --grid PNG or --interpolate PNG")
    if args.out is not None and args.n is None:
        raise ConfigError("--out needs --n, the number of images to write")
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n must be > 0, got {args.n}")
    check_truncation(args.truncation)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grid_columns < 1:
        raise ConfigError(f"--grid-columns must be >= 1, got {args.grid_columns}")
    if args.interpolate_steps < 2:
        raise ConfigError(f"--interpolate-steps must be >= 2, got {args.interpolate_steps}")
    for option, path in (("--grid", args.grid), ("--interpolate", args.interpolate)):
        if path is not None:
            check_out_file(path, option)
    if args.out is not None:
        check_out(args.out, args.overwrite)
    device = resolve_device(args.device, what="--device")
    gen = load_generator(args.checkpoint, device)
    if args.match_prevalence is not None:
        mix = prevalence_of(args.match_prevalence, gen)
    elif args.classes is not None:
        mix = parse_class_mix(args.classes, gen)
    else:
        mix = {c: 1.0 / len(gen.classes) for c in gen.classes}
    if args.out is not None:
        # every class must fit the layout before anything is drawn or written
        image_paths(args.layout, [c for c, k in class_counts(mix, args.n).items() if k])
        with progress_bar(total=args.n, desc="generate", unit="img") as bar:
            report = generate_tree(gen, args.out, mix, args.n, args.layout, truncation=args.truncation,
                                   seed=args.seed, batch_size=args.batch_size, overwrite=args.overwrite,
                                   progress=bar.update)
        counts = ", ".join(f"{c} {k}" for c, k in report.counts.items())
        print(f"generated {args.n} images ({counts}) as a {report.layout} tree in {report.out} "
              f"with {gen.module} of {gen.checkpoint}")
    classes = list(mix)
    if args.grid is not None:
        write_grid(gen, args.grid, classes, args.grid_columns, args.truncation, args.seed)
        print(f"wrote the class x seed sheet {args.grid} (rows: {', '.join(classes)})")
    if args.interpolate is not None:
        write_interpolation(gen, args.interpolate, classes, args.interpolate_steps, args.truncation, args.seed)
        print(f"wrote the latent walk {args.interpolate} (rows: {', '.join(classes)})")
    return 0
