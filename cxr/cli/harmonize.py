"""``cxr harmonize``: rewrite a dataset tree with a classical harmonization method.

    cxr harmonize --method histogram --reference data/phantom/ChinaSet_AllFiles \\
        --in data/phantom/MontgomerySet --out data/montgomery_histmatched

The output keeps the input's layout (file names, labels, readings, masks), so every loader
and ``cxr train-classifier`` read it; it is written to a temporary folder and renamed when done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli.common import add_workers_argument, progress_bar
from harmonize.trees import METHODS, SPLITS, harmonize_tree


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("harmonize", help="harmonize a dataset tree towards a reference tree (histogram matching)",
                       description="Rewrite every image of a dataset tree with a classical harmonization "
                                   "method fitted on a reference tree's patient-level training split.")
    p.add_argument("--method", default="histogram", choices=METHODS, help="harmonization method (default histogram)")
    p.add_argument("--reference", required=True, type=Path, metavar="DIR",
                   help="tree whose appearance is the target (e.g. the Shenzhen-like tree)")
    p.add_argument("--reference-split", default="train", choices=SPLITS,
                   help="which patient-level split of the reference fits the method (default train)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0, as the classifiers use)")
    p.add_argument("--field", type=float, default=1.0, metavar="F",
                   help="match the histograms of the central F of each side only, so that framing "
                        "(blades, markers, air and arms beside the body) does not shift the match; "
                        "the remapping applies to every pixel (default 1: whole images)")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="DIR", help="dataset tree to harmonize")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    add_workers_argument(p, 0, "0", "decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new tree is complete")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    with progress_bar(desc=f"harmonize ({args.method})", unit="img") as bar:
        report = harmonize_tree(args.src, args.out, args.reference, args.method, args.reference_split, args.seed,
                                layout=args.layout, overwrite=args.overwrite, workers=args.workers,
                                progress=bar.update, field=args.field)
    method = args.method if args.field >= 1 else f"{args.method}, central {args.field:g}"
    print(f"harmonized {report.images} images ({report.layout}, {method}) and copied {report.copied} "
          f"other files to {report.out}")
    return 0
