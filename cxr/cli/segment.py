"""``cxr segment``: a trained segmenter's lung masks for every image of a tree.

    cxr segment --checkpoint runs/00007-segmenter --in data/phantom/ChinaSet_AllFiles --out masks/

Writes ``DIR/ManualMask/leftMask/<image>.png`` and ``DIR/ManualMask/rightMask/<image>.png``
(0/255, at each image's own size: the Montgomery layout, so a folder holding ``CXR_png`` and
these masks reads as a Montgomery tree). The masks are written into a temporary folder renamed
to ``DIR`` at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifiers.segmenter import segment_trees


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("segment", help="apply a trained lung segmenter to a tree (Montgomery ManualMask layout)",
                       description="Apply a segmenter checkpoint to every image of a dataset tree and write its "
                                   "left and right lung masks in the Montgomery ManualMask/{leftMask,rightMask} "
                                   "layout, each at its image's own size.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="run folder (its best checkpoint) or one checkpoint folder")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="TREE",
                   help="dataset tree (folder or zip, any layout `cxr datasets inspect` reads)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (must not exist, or be empty)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    report = segment_trees(args.checkpoint, [str(args.src)], args.out, device=args.device, layout=args.layout,
                           skip_bad=args.skip_bad, echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote lung masks of {report['images']} images to {report['out']}/ManualMask "
          f"(checkpoint {report['checkpoint']})")
    return 0
