"""``cxr phantom``: write a phantom dataset tree in a real dataset's layout.

    cxr phantom --preset nlm --out DIR --size 256 --seed 0

Parse → check → :func:`cxr.phantom.generate.generate`. Bad input (unknown preset or finding,
a size or count ≤ 0, a non-empty output folder, a bad chain YAML, an unreadable user CT or a
label map of another shape) is one line and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxr.cli.common import add_workers_argument, progress_bar
from cxr.phantom.generate import DEFAULT_N, FORMATS, PRESETS, PhantomConfig, check_config, generate
from cxr.phantom.types import DEFAULT_DIFFICULTY


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "phantom",
        help="write a phantom chest X-ray dataset (Shenzhen/Montgomery, NIH, VinDr or 9-class layout)",
        description=(
            "Render simulated chest X-rays from a real chest CT with inserted findings, through "
            "simulated acquisition chains (Shenzhen-like DR, Montgomery-like CR, or your own "
            "--chain-file), and write them in a real dataset's exact layout plus phantom_truth/ "
            "(every subject through every site, masks, boxes, manifest.csv). Same seed: "
            "byte-identical output, whatever --workers is."),
        epilog=("presets: nlm = ChinaSet_AllFiles/ (662: 336 TB, 326 normal) + MontgomerySet/ "
                "(138: 58 TB, 80 normal); nih = NIH ChestX-ray14 layout "
                f"({DEFAULT_N['nih']} images); vindr = VinDr-CXR layout ({DEFAULT_N['vindr']}); "
                f"nine = 9-class folder tree ({DEFAULT_N['nine']})."),
    )
    p.add_argument("--preset", required=True, metavar="NAME",
                   help=f"which tree to write: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="long side of every image in pixels; the short side follows the "
                        "site's frame aspect, except nih: square, as NIH's 1024 x 1024 PNGs "
                        "(default 256)")
    p.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="total number of images, split like the preset's class counts "
                        "(default: the preset's counts)")
    add_workers_argument(p, None, "all cores", "worker processes (the output does not depend on it)")
    p.add_argument("--bit-depth", type=int, default=8, choices=(8, 16), dest="bit_depth",
                   help="8 (site PNG modes; Shenzhen-like palette PNGs) or 16 (gray 16-bit PNGs "
                        "holding the acquisition's levels; no palette mode at 16 bits)")
    p.add_argument("--format", default="png", choices=tuple(FORMATS), dest="image_format",
                   help="png (default), or dicom for the vindr preset: train/<image_id>.dicom as "
                        "VinDr-CXR's official release (MONOCHROME1 and MONOCHROME2, the site's "
                        "bits stored, boxes in the DICOM's pixels, no train_meta.csv)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (only once the new tree is complete)")
    p.add_argument("--chain-file", action="append", type=Path, default=[], dest="chain_files",
                   metavar="YAML",
                   help="an acquisition chain YAML (repeatable): a new site, or a file named "
                        "like a built-in site (shenzhen, montgomery) to replace it")
    p.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                   help="lesion size and contrast: 0 = large, dense (easy) .. 1 = small, faint "
                        f"(hard); default {DEFAULT_DIFFICULTY}")
    p.add_argument("--findings", default=None, metavar="A,B",
                   help="comma-separated findings to draw (nih, vindr, nine presets)")
    p.add_argument("--ct", type=Path, default=None, metavar="NIFTI",
                   help="your own chest CT (NIfTI, Hounsfield units) instead of the bundled one; "
                        "needs --labels")
    p.add_argument("--labels", type=Path, default=None, metavar="NIFTI",
                   help="the CT's structure label map (NIfTI, same shape; TotalSegmentator "
                        "class ids unless --structures says otherwise)")
    p.add_argument("--structures", type=Path, default=None, metavar="CSV",
                   help="structure,id CSV naming the label map's ids (TotalSegmentator names, "
                        "e.g. lung_upper_lobe_left, heart)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    findings = None
    if args.findings is not None:
        findings = tuple(f.strip() for f in args.findings.split(",") if f.strip())
    cfg = check_config(PhantomConfig(
        preset=args.preset, out=args.out, size=args.size, seed=args.seed, n=args.n,
        workers=args.workers, bit_depth=args.bit_depth, overwrite=args.overwrite,
        chain_files=tuple(args.chain_files), difficulty=args.difficulty, findings=findings,
        ct=args.ct, labels=args.labels, structures=args.structures, image_format=args.image_format))
    with progress_bar(desc=f"phantom {cfg.preset}", unit="img") as bar:
        result = generate(cfg, progress=bar.update, on_plan=lambda total: bar.reset(total=total))
    for tree, counts in sorted(result.counts.items()):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{tree}: {sum(counts.values())} images ({parts})")
    print(f"wrote {result.images} images to {result.out}", file=sys.stdout)
    return 0
