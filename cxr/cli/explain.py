"""``cxr explain``: class activation maps of a trained classifier, scored against boxes or masks.

    cxr explain --checkpoint runs/00004-classifier-tb --in data/phantom/MontgomerySet --out cams/ \\
        --truth data/phantom
    cxr explain --checkpoint RUN --in /data/nih --out cams/ --boxes /data/nih/BBox_List_2017.csv --scored-only

Writes ``DIR/maps/<image>.npz`` (one float32 map per class, at the image's size),
``DIR/overlays/<image>__<class>.png``, and with truth ``scores.csv`` / ``scores.json``
(pointing game, box IoU hit rates, the null maps'); see :mod:`eval.localization`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxr.cli.common import progress_bar
from cxr.engine.distributed import resolve_device
from cxr.errors import ConfigError

METHODS = ("gradcam", "gradcam++", "scorecam")


def _frame(text: str) -> int | None:
    if text == "image":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count or 'image', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("explain",
                       help="class activation maps of a classifier (Grad-CAM), scored against boxes or masks",
                       description="Write a class activation map (pytorch-grad-cam) of a classifier checkpoint for "
                                   "every image of a tree, as raw maps and overlays, and score them against NIH "
                                   "boxes or a phantom's lesion masks: pointing game and box IoU hit rates, beside "
                                   "a fixed null map.")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="RUN",
                   help="classifier run folder (its best checkpoint) or one checkpoint folder")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="TREE",
                   help="dataset tree (folder or zip, any layout `cxr datasets inspect` reads)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (must be absent or empty unless --overwrite)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="map (default gradcam)")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="explain this class only (default: a binary task's class; else each class the image "
                        "has truth for; else its top-scoring class)")
    p.add_argument("--boxes", type=Path, default=None, metavar="CSV",
                   help="boxes in the NIH BBox_List_2017.csv format, scored by image file name")
    p.add_argument("--box-frame", type=_frame, default=1024, metavar="N|image",
                   help="the square the --boxes coordinates are in, scaled to each image's size (default 1024, "
                        "NIH's release); 'image': already in the images' pixels")
    p.add_argument("--truth", type=Path, default=None, metavar="PHANTOM_ROOT",
                   help="a `cxr phantom` folder: its lesion masks (phantom_truth/manifest.csv) are the truth")
    p.add_argument("--threshold", type=float, default=0.5, metavar="R",
                   help="the map's box: pixels >= R x its maximum, the peak's component (default 0.5)")
    p.add_argument("--target-layer", default=None, metavar="MODULE",
                   help="take the map at this module of the network (e.g. net.features.2) instead of the "
                        "architecture's default (docs/localization.md)")
    p.add_argument("--no-align", dest="align", action="store_false",
                   help="leave the maps where pytorch-grad-cam's upsampling puts them, half a stride below and "
                        "right of the cells' centres (docs/localization.md)")
    p.add_argument("--scored-only", action="store_true", help="explain only images with truth for a class")
    p.add_argument("--overlays", type=int, default=None, metavar="N",
                   help="write at most N overlay PNGs (default: one per map)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    p.add_argument("--labels-csv", type=Path, default=None, metavar="CSV",
                   help="the label file when it is not in the tree (nih: a Data_Entry-style CSV)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is complete")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # lazy: eval.localization imports torchvision and pytorch-grad-cam (seconds), which `cxr --help`
    # and the other subcommands never need
    from eval.localization import ExplainOptions, explain_tree, format_summary

    if args.overlays is not None and args.overlays < 0:
        raise ConfigError(f"--overlays must be >= 0, got {args.overlays}")
    opts = ExplainOptions(checkpoint=args.checkpoint, src=args.src, out=args.out, method=args.method,
                          class_name=args.class_name, boxes=args.boxes, truth=args.truth, box_frame=args.box_frame,
                          relative=args.threshold, target_layer=args.target_layer, align=args.align,
                          scored_only=args.scored_only,
                          overlays=args.overlays,
                          layout=args.layout, labels_csv=args.labels_csv,
                          device=resolve_device(args.device, what="--device"), batch_size=args.batch_size,
                          overwrite=args.overwrite, skip_bad=args.skip_bad)
    with progress_bar(desc="explain", unit="map") as bar:
        report = explain_tree(opts, echo=lambda m: print(m, file=sys.stderr, flush=True), progress=bar.update)
    s = report["settings"]
    print(f"wrote {s['maps']} {s['method']} map(s) of {s['images']} image(s) and {s['overlays']} overlay(s) "
          f"to {report['out']} (layer {s['target_layer']})")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["summary"]:
        print(format_summary(report["summary"]))
    return 0
