"""``cxr evaluate``: judge what a model wrote. ``gan`` compares a generated tree with the real one;
``harmonization`` audits a harmonized tree (domain detectors, a fixed classifier's decisions,
lesions erased or invented, paired fidelity; :mod:`eval.harmonization`).

    cxr evaluate gan --real data/phantom/ChinaSet_AllFiles --fake data/synthetic_shenzhen \\
        --out results/gan_eval
    cxr evaluate harmonization --source data/phantom/MontgomerySet --harmonized data/mc_hist \\
        --reference data/phantom/ChinaSet_AllFiles --classifier runs/tb --truth data/phantom --out results/audit

Writes ``metrics.json``, ``metrics.csv`` (overall and per class), ``memorization.csv``,
``examples.png`` (real | generated per class) and ``closest_pairs.png`` into ``--out``, a
folder renamed into place when complete (see :mod:`eval.generative`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXTRACTORS = ("auto", "inception", "xrv", "trained")  # eval.gan_features.EXTRACTORS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="evaluate generated data (gan) or a harmonized tree (harmonization)",
                       description="Evaluate what a model wrote against real data.")
    inner = p.add_subparsers(dest="what", metavar="WHAT")
    g = inner.add_parser("gan", help="quality, diversity, memorization and usefulness of a generated tree",
                         description="Compare a generated tree with the real tree its generator was trained on: "
                                     "relative FD (headline), FD, KID, precision/recall/density/coverage, "
                                     "diversity within class, memorization and the classification accuracy "
                                     "score, overall and per class, in one feature extractor's space.")
    g.add_argument("--real", required=True, type=Path, metavar="TREE",
                   help="the real tree; its patient-level training split is the reference")
    g.add_argument("--fake", required=True, type=Path, metavar="TREE", help="the generated tree (any layout)")
    g.add_argument("--heldout", type=Path, metavar="TREE",
                   help="real images the generator never saw (default: the real tree's held-out test split)")
    g.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (new or empty)")
    g.add_argument("--extractor", default="auto", choices=EXTRACTORS,
                   help="feature space: inception (pytorch-fid weights), xrv (torchxrayvision DenseNet-121), both "
                        "only from the local cache, or trained (the small CNN trained on the real training split); "
                        "auto: the first available (default)")
    g.add_argument("--size", type=int, default=64, help="square side every image is resized to (default 64)")
    g.add_argument("--seed", type=int, default=0, help="split, subset and training seed (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--classifier-config", default="classifier_tiny", metavar="NAME",
                   help="classifier config for the trained extractor and CAS (default classifier_tiny)")
    g.add_argument("--no-cas", dest="cas", action="store_false",
                   help="skip the classification accuracy score (two classifier trainings)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    g.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size cap (default 1000)")
    g.add_argument("--ssim-images", type=int, default=None, metavar="N",
                   help="search at most N generated and N held-out images (a seeded random subset) for their "
                        "nearest training image by SSIM, about 0.2 s each on 2 CPU cores at 64² (default: all)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is complete")
    g.set_defaults(func=run_gan)
    h = inner.add_parser("harmonization", help="audit a harmonized tree: domain gap left, disease kept, none invented",
                         description="Audit a harmonized copy of a tree: (a) cross-validated AUROC of domain "
                                     "detectors (histogram, texture, small CNN) against the reference tree, before "
                                     "and after; (b) with --classifier, a fixed classifier's decision flips; (c) with "
                                     "--truth, true lesions erased and lesion-like changes invented; (d) with --truth, "
                                     "SSIM/PSNR (and LPIPS when its weights are local) to the true target renders.")
    h.add_argument("--source", required=True, type=Path, metavar="TREE", help="the tree before harmonization")
    h.add_argument("--harmonized", required=True, type=Path, metavar="TREE",
                   help="its harmonized copy (the same image files, new pixels)")
    h.add_argument("--reference", required=True, type=Path, metavar="TREE",
                   help="the target-site tree the harmonizer maps to (at least 2 images)")
    h.add_argument("--classifier", type=Path, metavar="RUN",
                   help="a trained single-label classifier run (e.g. TB); decisions at its validation threshold")
    h.add_argument("--truth", type=Path, metavar="PHANTOM_ROOT",
                   help="a phantom folder (cxr phantom) holding the source tree: lesion and lung masks, true renders")
    h.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (new or empty)")
    h.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                   help="audit only this patient-level split of the source (default all)")
    h.add_argument("--size", type=int, default=64, help="square side the domain detectors see (default 64)")
    h.add_argument("--folds", type=int, default=5, help="cross-validation folds, by patient (default 5)")
    h.add_argument("--detectors", default="histogram,texture,cnn", metavar="LIST",
                   help="comma-separated domain detectors (default histogram,texture,cnn)")
    h.add_argument("--cnn-epochs", type=int, default=8, help="epochs of the CNN detector per fold (default 8)")
    h.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of every interval (default 1000)")
    h.add_argument("--seed", type=int, default=0, help="folds, split and bootstrap seed (default 0)")
    h.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is complete")
    h.set_defaults(func=run_harmonization)
    p.set_defaults(func=lambda _args: _usage(p))
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_gan(args: argparse.Namespace) -> int:
    # lazy: the evaluation imports torchvision and the classifier trainer (seconds), which
    # `cxr --help` and the other subcommands never need
    from eval.generative import GanEvalOptions, evaluate_gan, format_report

    opts = GanEvalOptions(real=args.real, fake=args.fake, heldout=args.heldout, out=args.out,
                          extractor=args.extractor, size=args.size, seed=args.seed, device=args.device,
                          cas=args.cas, classifier_config=args.classifier_config, kid_subsets=args.kid_subsets,
                          kid_subset_size=args.kid_subset_size, ssim_images=args.ssim_images,
                          overwrite=args.overwrite)
    report = evaluate_gan(opts, echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


def run_harmonization(args: argparse.Namespace) -> int:
    # lazy: the audit imports the classifier code, scikit-learn and kornia (seconds)
    from eval.harmonization import AuditOptions, audit_harmonization, format_report

    opts = AuditOptions(source=args.source, harmonized=args.harmonized, reference=args.reference, out=args.out,
                        classifier=args.classifier, truth=args.truth, split=args.split, size=args.size,
                        folds=args.folds, seed=args.seed,
                        detectors=tuple(d.strip() for d in args.detectors.split(",") if d.strip()),
                        cnn_epochs=args.cnn_epochs, n_boot=args.n_boot, device=args.device, overwrite=args.overwrite)
    report = audit_harmonization(opts, echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0
