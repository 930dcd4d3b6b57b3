"""``cxr harmonize``: rewrite a dataset tree with a classical or a learned harmonization method.

    cxr harmonize --method histogram --reference data/phantom/ChinaSet_AllFiles \\
        --in data/phantom/MontgomerySet --out data/montgomery_histmatched
    cxr harmonize --method fda --beta 0.03 --reference data/phantom/ChinaSet_AllFiles \\
        --in data/phantom/MontgomerySet --out data/montgomery_fda --fitted fda.safetensors

Methods (``harmonize/methods.py``): histogram, lung-histogram, percentile, zscore, clahe, fda.
Learned methods, applied from a trained run (``--checkpoint RUN``, its A → B generator):
cyclegan, cut, fastcut (``gan/``; they sit above ``harmonize/``, so they are dispatched here)::

    cxr harmonize --method cut --checkpoint runs/00004-cut --in data/phantom/MontgomerySet --out data/mc_cut
The fitted state is saved inside the output (``cxr_harmonizer.safetensors``) and, with
``--fitted FILE``, to FILE; ``--fitted FILE`` without ``--reference`` loads it instead of fitting.

The output keeps the input's layout (file names, labels, readings, masks), so every loader
and ``cxr train-classifier`` read it; it is written to a temporary folder and renamed when done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli.common import add_workers_argument, progress_bar
from cxr.engine.distributed import resolve_device
from cxr.errors import ConfigError
from gan.cyclegan.translate import METHODS as LEARNED
from gan.cyclegan.translate import translate_run
from harmonize.methods import HARMONIZERS
from harmonize.trees import METHODS, SPLITS, harmonize_tree


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("harmonize", help="harmonize a dataset tree towards a reference tree (classical or learned methods)",
                       description="Rewrite every image of a dataset tree with a classical harmonization "
                                   "method fitted on a reference tree's patient-level training split, or with "
                                   "the generator of a trained CycleGAN, CUT or FastCUT run (--checkpoint).")
    p.add_argument("--method", default="histogram", choices=METHODS + tuple(LEARNED),
                   help="harmonization method (default histogram); cyclegan, cut and fastcut are learned: "
                        "they apply the A -> B generator of --checkpoint RUN")
    p.add_argument("--checkpoint", type=Path, metavar="RUN",
                   help="learned methods: the run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--device", default="auto", help="learned methods: auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="tree whose appearance is the target (e.g. the Shenzhen-like tree); needed unless "
                        "--fitted loads a saved state or the method is not fitted (clahe)")
    p.add_argument("--fitted", type=Path, metavar="FILE",
                   help="with --reference: also save the fitted state to FILE; without: load it from FILE")
    p.add_argument("--reference-split", default="train", choices=SPLITS,
                   help="which patient-level split of the reference fits the method (default train)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0, as the classifiers use)")
    p.add_argument("--field", type=float, default=None, metavar="F",
                   help="match the histograms of the central F of each side only, so that framing "
                        "(blades, markers, air and arms beside the body) does not shift the match; "
                        "the remapping applies to every pixel (histogram; default 1: whole images)")
    p.add_argument("--percentiles", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="percentile: the percentiles mapped onto the reference's (default 1 99)")
    p.add_argument("--region", choices=("image", "lungs"), default=None,
                   help="zscore: statistics over the whole image or inside the lung masks (default image)")
    p.add_argument("--clip-limit", type=float, default=None, help="clahe: histogram clip limit (default 2)")
    p.add_argument("--grid", type=int, default=None, help="clahe: tiles per side (default 8)")
    p.add_argument("--beta", type=float, default=None,
                   help="fda: half-size of the low-frequency square swapped, relative to the side (default 0.03)")
    p.add_argument("--size", type=int, default=None, help="fda: working size of the spectra (default 256)")
    p.add_argument("--in", dest="src", required=True, type=Path, metavar="DIR", help="dataset tree to harmonize")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--layout", default=None, help="skip auto-detection and use this layout")
    add_workers_argument(p, 0, "0", "decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new tree is complete")
    p.set_defaults(func=run)
    return p


FLAGS = {"clip_limit": "--clip-limit", "grid": "--grid", "beta": "--beta", "size": "--size", "region": "--region"}


def method_options(args: argparse.Namespace) -> dict:
    """The method options the command line set (``--field`` travels apart); a flag of another
    method is an error."""
    options = {key: getattr(args, key) for key in FLAGS if getattr(args, key) is not None}
    if args.percentiles is not None:
        options["low"], options["high"] = args.percentiles
    takes = HARMONIZERS[args.method].defaults
    for key in options:
        if key not in takes:
            flag = FLAGS.get(key, "--percentiles")
            raise ConfigError(f"{flag} does not apply to --method {args.method}")
    return options


def run_learned(args: argparse.Namespace) -> int:
    """A learned method: the run's generator over the tree (:func:`gan.cyclegan.translate.translate_run`)."""
    if args.checkpoint is None:
        raise ConfigError(f"--method {args.method} needs --checkpoint RUN (a trained {args.method} run)")
    given = [flag for flag, value in (("--reference", args.reference), ("--fitted", args.fitted),
                                      ("--field", args.field), ("--percentiles", args.percentiles),
                                      *((FLAGS[k], getattr(args, k)) for k in FLAGS)) if value is not None]
    if given:
        raise ConfigError(f"{given[0]} does not apply to --method {args.method} (a learned method: --checkpoint RUN)")
    device = resolve_device(args.device, what="--device")
    with progress_bar(desc=f"harmonize ({args.method})", unit="img") as bar:
        report = translate_run(args.checkpoint, args.src, args.out, method=args.method, device=device,
                               workers=args.workers, overwrite=args.overwrite, layout=args.layout, progress=bar.update,
                               command=f"cxr harmonize --method {args.method}")
    print(f"harmonized {report.images} images ({report.layout}, {args.method} of {args.checkpoint}) and copied "
          f"{report.copied} other files to {report.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.method in LEARNED:
        return run_learned(args)
    if args.checkpoint is not None:
        raise ConfigError(f"--checkpoint applies to the learned methods ({', '.join(LEARNED)}), not {args.method}")
    options = method_options(args)
    with progress_bar(desc=f"harmonize ({args.method})", unit="img") as bar:
        fit_from = args.fitted if args.reference is None else None
        report = harmonize_tree(args.src, args.out, args.reference, args.method, args.reference_split, args.seed,
                                layout=args.layout, overwrite=args.overwrite, workers=args.workers,
                                progress=bar.update, field=args.field, options=options, fitted=fit_from,
                                save_fitted=args.fitted if args.reference is not None else None)
    method = args.method if args.field is None or args.field >= 1 else f"{args.method}, central {args.field:g}"
    print(f"harmonized {report.images} images ({report.layout}, {method}) and copied {report.copied} "
          f"other files to {report.out}")
    return 0
