"""``cxr datasets``: inspect a tree, preview it, build the 9-class set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxr.cli.common import add_workers_argument, check_out_file, progress_bar
from cxr.data.cache import ImageCache
from cxr.data.inspect import format_summary, inspect_tree
from cxr.data.io import claim_output, naming
from cxr.data.layouts import load_tree
from cxr.data.nine import CONFOUNDING_CAVEAT, build_nine
from cxr.data.preprocess import Preprocess
from cxr.data.preview import DISPLAY_WINDOW, contact_sheet, pick
from cxr.data.problems import Problems
from cxr.errors import CxrError

LABELS_CSV_HELP = ("the label file when it is not in the tree (nih: a Data_Entry-style CSV, any name); "
                   "implies --layout nih")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="inspect, preview and build dataset trees",
                       description="Inspect, preview and build dataset trees.")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)

    i = dsub.add_parser("inspect", help="layout, counts, sizes and every problem of a tree")
    i.add_argument("path", type=Path)
    i.add_argument("--layout", help="skip auto-detection and use this layout")
    i.add_argument("--labels-csv", type=Path, default=None, help=LABELS_CSV_HELP)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--max-images", type=int, default=None,
                   help="check the pixels of at most this many images (default: all)")
    i.set_defaults(func=run_inspect)

    v = dsub.add_parser("preview", help="contact sheet of images as the pipeline sees them")
    v.add_argument("path", type=Path)
    v.add_argument("--out", type=Path, required=True, help="PNG file to write")
    v.add_argument("--layout")
    v.add_argument("--labels-csv", type=Path, default=None, help=LABELS_CSV_HELP)
    v.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    v.add_argument("--size", type=int, default=192, help="tile size in pixels (default 192)")
    v.add_argument("--fit", choices=("pad", "crop"), default="pad")
    v.add_argument("--clahe", action="store_true", help="apply CLAHE as the pipeline would")
    v.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="percentiles of each image stretched to black..white, the preprocessing's "
                        f"window (default {DISPLAY_WINDOW[0]:g} {DISPLAY_WINDOW[1]:g})")
    v.add_argument("--no-window", action="store_true",
                   help="no window: the decoded range, as the trainers' default preprocessing feeds it")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=run_preview)

    c = dsub.add_parser("cache", help="decode and resize every image once into the preprocessed cache")
    c.add_argument("path", type=Path)
    c.add_argument("--cache-dir", type=Path, required=True)
    c.add_argument("--layout")
    c.add_argument("--labels-csv", type=Path, default=None, help=LABELS_CSV_HELP)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--fit", choices=("pad", "crop"), default="pad")
    c.add_argument("--clahe", action="store_true")
    add_workers_argument(c, None, "all cores", "decoding processes")
    c.add_argument("--skip-bad", action="store_true",
                   help="skip bad files and write a report of them instead of stopping")
    c.add_argument("--report", type=Path, default=None,
                   help="where --skip-bad writes its CSV report (default: skipped.csv in the folder of "
                        "these preprocessing settings, <cache-dir>/<settings hash>/; the path is printed)")
    c.set_defaults(func=run_cache)

    b = dsub.add_parser("build-nine", help="merge NIH, Covid, pneumonia and TB sources into the 9-class tree")
    b.add_argument("--nih", type=Path, required=True)
    b.add_argument("--covid", type=Path, required=True)
    b.add_argument("--pneumonia", type=Path, required=True)
    b.add_argument("--tb", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    b.set_defaults(func=run_build_nine)


def run_inspect(args: argparse.Namespace) -> int:
    if args.max_images is not None and args.max_images < 0:
        raise CxrError(f"--max-images must be >= 0, got {args.max_images}")
    with progress_bar(desc="checking images", unit="img") as bar:
        summary = inspect_tree(args.path, layout=args.layout, max_images=args.max_images,
                               progress=bar.update, labels_csv=args.labels_csv)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 1 if summary["problems"] else 0


def run_preview(args: argparse.Namespace) -> int:
    if args.n <= 0 or args.size <= 0:
        raise CxrError(f"--n and --size must be positive, got {args.n} and {args.size}")
    if args.no_window and args.window is not None:
        raise CxrError("--window and --no-window exclude each other")
    window = None if args.no_window else tuple(args.window or DISPLAY_WINDOW)
    pre = Preprocess(size=args.size, fit=args.fit, window=window, clahe=args.clahe)
    ds = load_tree(args.path, layout=args.layout, labels_csv=args.labels_csv)
    if not ds.records:
        raise CxrError(f"{args.path}: no images to preview")
    check_out_file(args.out, "--out")
    records = pick(ds.records, args.n, seed=args.seed)
    out = contact_sheet(records, args.out, pre)
    if pre.window is None:
        print("window: none (the decoded range, as the trainers' default preprocessing feeds it)")
    else:
        lo, hi = pre.window
        print(f"window: percentiles {lo:g}-{hi:g} of each image stretched to black..white "
              f"(preprocessing window=({lo:g}, {hi:g}); the trainers' default has none: --no-window shows it)")
    print(f"wrote {out} ({len(records)} images)")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    problems = Problems(skip_bad=args.skip_bad)
    ds = load_tree(args.path, layout=args.layout, problems=problems, labels_csv=args.labels_csv)
    if args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise CxrError(f"{args.cache_dir}: --cache-dir exists and is not a folder")
    cache = ImageCache(args.cache_dir, Preprocess(size=args.size, fit=args.fit, clahe=args.clahe))
    with claim_output(cache.dir), naming(cache.dir), \
            progress_bar(total=len(ds.records), desc="caching", unit="img") as bar:
        report = cache.build([r.image for r in ds.records], workers=args.workers, problems=problems,
                             progress=bar.update)
    print(f"cache {cache.dir}: {report.built} built, {report.reused} reused, {report.failed} failed")
    if problems.items:
        out = problems.write(args.report or cache.dir / "skipped.csv")
        print(f"skipped {len(problems.items)} bad item(s); report: {out}")
    return 0


def run_build_nine(args: argparse.Namespace) -> int:
    with claim_output(args.out), naming(args.out):
        counts = build_nine(args.nih, args.covid, args.pneumonia, args.tb, args.out, link=not args.copy)
    width = max(len(k) for k in counts)
    for name, n in counts.items():
        print(f"{name:<{width}} {n:>7}")
    print(f"{'total':<{width}} {sum(counts.values()):>7}")
    print(f"wrote {args.out}")
    print(CONFOUNDING_CAVEAT, file=sys.stderr)
    return 0
