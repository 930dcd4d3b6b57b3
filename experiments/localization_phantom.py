"""Does Grad-CAM point at the phantom's lesions? Pointing game and box IoU, against a null map.

    python -m experiments.localization_phantom --out runs/localization      # ~15-20 min on 2 CPU cores
    python experiments/localization_phantom.py --out runs/loc --tb-epochs 10 --nih-epochs 5   # quicker

Two classifiers, each the small CNN at 128² on the classifier trainer, one seed:

- **TB** (the shipped ``classifier_tb`` config, ``--tb-epochs``) on the Shenzhen-like tree of a
  ``cxr phantom --preset nlm`` phantom (seed 0), explained on a *second* nlm phantom (seed 1: other
  subjects, never trained on), both its Shenzhen-like and its Montgomery-like tree, against the
  lesion masks of ``phantom_truth`` (TB-positive images only).
- **NIH-like** (the ``classifier_nih14`` config with the small CNN at 128², ``--nih-epochs``) on a
  ``--preset nih`` phantom (seed 0, ``--nih-n`` images), explained on a second nih phantom (seed 1)
  against its ``BBox_List_2017.csv`` (per finding) and its lesion masks.

Every map is scored by :func:`eval.localization.explain_tree` beside the two fixed null maps
(a Gaussian in each lung field; one at the image centre). Writes ``OUT/localization.json`` (every
figure, the classifiers' test AUROC, timings), the maps and overlays under ``OUT/explain/``, and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
# Idle OpenMP threads sleep instead of spinning (as the `cxr` command sets it): on a shared CPU,
# spinning threads made each training epoch here 20x slower. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from classifiers.config import ClassifierConfig  # noqa: E402
from classifiers.trainer import train  # noqa: E402
from cxr.configs import shipped_config  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.metrics.localization import IOU_THRESHOLDS, NULL_MAPS  # noqa: E402
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402
from eval.localization import ExplainOptions, explain_tree, format_summary  # noqa: E402


def _phantom(preset: str, out: Path, size: int, seed: int, n: int | None) -> Path:
    if not (out / "phantom_truth" / "manifest.csv").is_file():
        generate(PhantomConfig(preset=preset, out=out, size=size, seed=seed, n=n, overwrite=True, workers=0))
    return out


def _train(config: str, run: Path, overrides: list[str]) -> dict[str, Any]:
    if (run / "test.json").is_file():  # a finished run from an earlier call: reuse it
        return {"seconds": None, "test": json.loads((run / "test.json").read_text())["metrics"]}
    cfg = load_config(ClassifierConfig, shipped_config(config), overrides)
    t0 = time.perf_counter()
    result = train(cfg, run)
    return {"seconds": time.perf_counter() - t0, "test": result.results.get("test", {})}


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as a markdown table: per truth kind and class, the map's row and the null maps'."""
    cols = ["pointing (95 % CI)", "mean IoU"] + [f"IoU ≥ {t:g}" for t in IOU_THRESHOLDS]
    lines = [f"**{title}**", "", "| truth | finding | n | map | " + " | ".join(cols) + " |",
             "|---|---|---:|---|" + "---:|" * len(cols)]
    for kind, classes in summary.items():
        for c, scorers in classes.items():
            for name, s in scorers.items():
                label = {"map": "Grad-CAM", **{f"null_{n}": f"null ({n})" for n in NULL_MAPS}}[name]
                cells = [f"{s['pointing']:.3f} ({s['pointing_lo']:.2f}–{s['pointing_hi']:.2f})",
                         f"{s['mean_iou']:.3f}"]
                cells += [f"{s[f'iou>={t:g}']:.3f}" for t in IOU_THRESHOLDS]
                lines.append(f"| {kind} | {c} | {s['n']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--tb-epochs", type=int, default=30)
    ap.add_argument("--nih-n", type=int, default=1500, help="images of the NIH-like training phantom")
    ap.add_argument("--nih-epochs", type=int, default=15)
    ap.add_argument("--eval-n", type=int, default=300, help="images of each evaluation phantom")
    ap.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++", "scorecam"))
    ap.add_argument("--overlays", type=int, default=12, help="overlay PNGs per explained tree")
    ap.add_argument("--target-layer", default=None, help="the map's layer, instead of the architecture's default")
    ap.add_argument("--no-align", dest="align", action="store_false",
                    help="leave the maps where pytorch-grad-cam's upsampling puts them (docs/localization.md)")
    ap.add_argument("--tag", default="", help="suffix of the explain folders and result files (another layer "
                                                 "or method on the same runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    common = [f"data.size={args.size}", "device=cpu", "eval.n_boot=200"]
    doc: dict[str, Any] = {"command": " ".join(["python -m experiments.localization_phantom", *(argv or sys.argv[1:])]),
                           "threads": torch.get_num_threads(), "method": args.method,
                           "target_layer": args.target_layer, "align": args.align}

    # TB on the nlm phantom, explained against the lesion masks of unseen subjects
    nlm_train = _phantom("nlm", out / "nlm_train", args.size, 0, None)
    nlm_eval = _phantom("nlm", out / "nlm_eval", args.size, 1, args.eval_n)
    doc["tb_classifier"] = _train("classifier_tb", out / "runs" / "tb",
                                  [f"data.train={nlm_train / 'ChinaSet_AllFiles'}", f"train.epochs={args.tb_epochs}",
                                   *common])
    for site in ("ChinaSet_AllFiles", "MontgomerySet"):
        t0 = time.perf_counter()
        rep = explain_tree(ExplainOptions(checkpoint=out / "runs" / "tb", src=nlm_eval / site,
                                          out=out / "explain" / f"tb_{site}{args.tag}", method=args.method,
                                          truth=nlm_eval, target_layer=args.target_layer, align=args.align,
                                          scored_only=True, overlays=args.overlays, overwrite=True))
        doc[f"tb_{site}"] = {"summary": rep["summary"], "seconds": time.perf_counter() - t0, "notes": rep["notes"]}
        print(f"TB classifier, {site} of the evaluation phantom ({args.method}):")
        print(format_summary(rep["summary"]))

    # NIH-like on the nih phantom, explained against the box CSV and the lesion masks
    nih_train = _phantom("nih", out / "nih_train", args.size, 0, args.nih_n)
    nih_eval = _phantom("nih", out / "nih_eval", args.size, 1, args.eval_n)
    doc["nih_classifier"] = _train("classifier_nih14", out / "runs" / "nih",
                                   [f"data.train={nih_train}", "model.name=small_cnn",
                                    "model.options={width: 8, dropout: 0.2}", "optim.lr=0.003",
                                    f"train.epochs={args.nih_epochs}", "train.patience=0", *common])
    t0 = time.perf_counter()
    rep = explain_tree(ExplainOptions(checkpoint=out / "runs" / "nih", src=nih_eval,
                                      out=out / "explain" / f"nih{args.tag}", method=args.method,
                                      target_layer=args.target_layer, align=args.align,
                                      boxes=nih_eval / "BBox_List_2017.csv",
                                      truth=nih_eval,
                                      scored_only=True, overlays=args.overlays, overwrite=True))
    doc["nih"] = {"summary": rep["summary"], "seconds": time.perf_counter() - t0, "notes": rep["notes"]}
    print(f"NIH-like classifier, the evaluation phantom ({args.method}):")
    print(format_summary(rep["summary"]))

    doc["seconds"] = time.perf_counter() - t_start
    (out / f"localization{args.tag}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [markdown(doc["tb_ChinaSet_AllFiles"]["summary"], "TB, Shenzhen-like site"),
          markdown(doc["tb_MontgomerySet"]["summary"], "TB, Montgomery-like site"),
          markdown(doc["nih"]["summary"], "NIH-like")]
    (out / f"localization{args.tag}.md").write_text("\n\n".join(md) + "\n")
    print(f"{doc['seconds']:.0f} s in all; {out}/localization{args.tag}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
