"""Proof that the phantom is fit for purpose (docs/phantom.md): prints the numbers, writes JSON.

    python experiments/phantom_fitness.py --out runs/phantom_fitness            # generate + prove
    python experiments/phantom_fitness.py --data DIR --out runs/fit --overwrite # an existing nlm tree
    python -m experiments.phantom_fitness --out runs/phantom_fitness           # the same, as a module

Generates ``cxr phantom --preset nlm --size 128 --seed 0`` (or reads ``--data``) and, unless
``--other-n 0``, small nih / vindr / nine trees, then reports:

1. loaders: every tree is read by the foundation loaders with the truth's counts and labels;
2. domain gap: the 32-bin histogram site detector (5-fold CV) on the two trees, on the same
   subjects through both chains, and after histogram matching (with a texture detector too);
3. TB AUROC of :class:`classifiers.small_cnn.SmallCNN` trained on Shenzhen-like images
   (patient-level split of ChinaSet_AllFiles), on held-out Shenzhen-like images, on the
   MontgomerySet tree, and on the held-out subjects' own Montgomery renders from
   ``phantom_truth`` (same subjects: the drop is pure domain shift), bootstrap 95 % CIs, per seed;
4. what per-image histogram matching to the Shenzhen-like reference recovers of that drop, and
   what even an oracle match (each subject's own Shenzhen histogram) recovers;
5. every lesion box in its region, every box equal to its mask's box, over every tree.

A markdown table goes to stdout, everything to ``OUT/fitness.json``. Budget: ~3-5 minutes on
2 cores at the defaults (three seeds of ~50 s training on one thread, by the classifier
trainer: :func:`experiments.fitness.train_classifier`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cxr.data.image import load_image  # noqa: E402
from cxr.data.io import atomic_write_text  # noqa: E402
from cxr.data.layouts import load_tree  # noqa: E402
from cxr.data.splits import split_records  # noqa: E402
from cxr.errors import CxrError  # noqa: E402
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402
from eval.domain_gap import domain_gap_accuracy  # noqa: E402
from experiments import fitness as PF  # noqa: E402
from harmonize.histogram import fit_reference, match_histogram  # noqa: E402

GOAL_GAP = 0.95
GOAL_AUC = (0.85, 0.95)
GOAL_DROP = 0.10
SPLIT = (0.7, 0.0, 0.3)  # train / val / test fractions of Shenzhen-like patients
OTHER_PRESETS = ("nih", "vindr", "nine")
OTHER_SIZE = 64


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="an existing `cxr phantom --preset nlm` folder (default: generate one)")
    p.add_argument("--out", type=Path, default=Path("runs/phantom_fitness"), metavar="DIR",
                   help="where generated trees and fitness.json go (default runs/phantom_fitness)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out folder")
    p.add_argument("--size", type=int, default=128, help="long side of the generated nlm tree")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--difficulty", type=float, default=None,
                   help="lesion difficulty of the generated tree (default: the phantom's default)")
    p.add_argument("--seeds", default="0,1,2", metavar="A,B,C",
                   help="training seeds; each also seeds its patient split (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=PF.FitnessTrainConfig.epochs)
    p.add_argument("--lr", type=float, default=PF.FitnessTrainConfig.lr, help="the small CNN's AdamW learning rate")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    p.add_argument("--workers", type=int, default=None, help="phantom worker processes")
    p.add_argument("--other-n", type=int, default=60, dest="other_n", metavar="N",
                   help=f"images per extra preset ({', '.join(OTHER_PRESETS)}) for the loader and "
                        "box checks; 0 skips them (default 60)")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> tuple[int, ...]:
    """Raise :class:`CxrError` (one line) for a bad flag; return the training seeds."""
    try:
        seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
    except ValueError:
        raise CxrError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise CxrError(f"--seeds needs distinct non-negative integers, got {a.seeds!r}")
    for name in ("epochs", "lr", "boot", "threads", "size"):
        if getattr(a, name) <= 0:
            raise CxrError(f"--{name} must be positive, got {getattr(a, name)}")
    if a.other_n < 0:
        raise CxrError(f"--other-n must be zero or positive, got {a.other_n}")
    if a.data is not None and not (a.data / PF.TRUTH_MANIFEST).is_file():
        raise CxrError(f"{a.data}: no {PF.TRUTH_MANIFEST} (not a `cxr phantom --preset nlm` folder)")
    if a.out.exists() and (not a.out.is_dir() or (any(a.out.iterdir()) and not a.overwrite)):
        raise CxrError(f"{a.out}: exists and is not an empty folder (use --overwrite)")
    return seeds


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def generate_trees(a: argparse.Namespace) -> dict[str, Path]:
    trees: dict[str, Path] = {}
    kw = {} if a.difficulty is None else {"difficulty": a.difficulty}
    if a.data is None:
        trees["nlm"] = a.out / "nlm"
        generate(PhantomConfig(preset="nlm", out=trees["nlm"], size=a.size, seed=a.seed,
                               workers=a.workers, overwrite=True, **kw))
    else:
        trees["nlm"] = a.data
    if a.other_n:
        for preset in OTHER_PRESETS:
            trees[preset] = a.out / preset
            generate(PhantomConfig(preset=preset, out=trees[preset], size=OTHER_SIZE, seed=a.seed,
                                   n=a.other_n, workers=a.workers, overwrite=True, **kw))
    return trees


class NlmImages:
    """The nlm tree's images, decoded once: raw (stored size) and as network input."""

    def __init__(self, root: Path, rows: list[dict[str, Any]]):
        self.root = root
        self.sz = load_tree(root / "ChinaSet_AllFiles").records
        self.mg = load_tree(root / "MontgomerySet").records
        by_image = {r["image"]: r for r in rows}
        truth = [by_image[Path(r.image).resolve().relative_to(root.resolve()).as_posix()] for r in self.sz]
        self.subjects = [t["subject_id"] for t in truth]
        self.y_sz = np.array([r.labels[0] for r in self.sz], dtype=np.int64)
        self.y_mg = np.array([r.labels[0] for r in self.mg], dtype=np.int64)
        self.raw_sz = [load_image(r.image) for r in self.sz]
        self.raw_mg = [load_image(r.image) for r in self.mg]
        # the Shenzhen-tree subjects rendered by the Montgomery chain, same pose and frame
        self.raw_pair = [load_image(root / t["render_montgomery"]) for t in truth]
        self.x_sz = np.stack([PF.network_input(i) for i in self.raw_sz])
        self.x_mg = np.stack([PF.network_input(i) for i in self.raw_mg])
        self.x_pair = np.stack([PF.network_input(i) for i in self.raw_pair])


def domain_gaps(d: NlmImages, seed: int) -> dict[str, Any]:
    def gap(a, b):
        acc, sd = domain_gap_accuracy(a, b, seed=seed)
        return {"accuracy": acc, "std": sd}

    matched = PF.match_images(d.raw_pair, d.raw_sz)
    return {
        "trees": gap(list(d.x_sz), list(d.x_mg)),
        "paired": gap(d.raw_sz, d.raw_pair),
        "paired_matched": gap(d.raw_sz, matched),
        "paired_matched_texture": gap([PF.highpass(i) for i in d.raw_sz],
                                      [PF.highpass(i) for i in matched]),
    }


def auc_with_ci(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    lo, hi = PF.bootstrap_auroc(y, s, n_boot=n_boot, seed=seed)
    return {"auc": PF.auroc(y, s), "lo": lo, "hi": hi}


def tb_seed(d: NlmImages, seed: int, cfg: PF.FitnessTrainConfig, n_boot: int, t0: float) -> dict[str, Any]:
    """Train on one patient-level split of the Shenzhen-like tree; score every test set."""
    split = split_records(d.sz, SPLIT, seed=seed)
    test_refs = {r.image for r in split["test"]}
    test = np.array([r.image in test_refs for r in d.sz])
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    model, losses = PF.train_classifier(d.x_sz[tr], d.y_sz[tr], seed, cfg)
    log(f"seed {seed}: trained on {len(tr)} images, loss {losses[0]:.3f} -> {losses[-1]:.3f}", t0)

    y_te = d.y_sz[te]
    reference = fit_reference(d.raw_sz[i] for i in tr)

    def prep(ims):
        return np.stack([PF.network_input(i) for i in ims])

    s_home = PF.predict(model, d.x_sz[te])
    s_tree = PF.predict(model, d.x_mg)
    s_pair = PF.predict(model, d.x_pair[te])
    s_tree_m = PF.predict(model, prep(match_histogram(i, reference) for i in d.raw_mg))
    s_pair_m = PF.predict(model, prep(match_histogram(d.raw_pair[i], reference) for i in te))
    s_pair_o = PF.predict(model, prep(match_histogram(d.raw_pair[i], fit_reference([d.raw_sz[i]]))
                                      for i in te))

    out: dict[str, Any] = {"seed": seed, "n_train": int(len(tr)), "n_test": int(len(te)),
                           "n_montgomery": int(len(d.y_mg)), "losses": losses}
    b = dict(n_boot=n_boot, seed=seed)
    out["shenzhen"] = auc_with_ci(y_te, s_home, **b)
    out["montgomery_tree"] = auc_with_ci(d.y_mg, s_tree, **b)
    out["montgomery_paired"] = auc_with_ci(y_te, s_pair, **b)
    out["matched_tree"] = auc_with_ci(d.y_mg, s_tree_m, **b)
    out["matched_paired"] = auc_with_ci(y_te, s_pair_m, **b)
    out["oracle_matched_paired"] = auc_with_ci(y_te, s_pair_o, **b)
    drop, lo, hi = PF.unpaired_auroc_drop(y_te, s_home, d.y_mg, s_tree, **b)
    out["drop_tree"] = {"drop": drop, "lo": lo, "hi": hi}
    drop, lo, hi = PF.paired_auroc_drop(y_te, s_home, s_pair, **b)
    out["drop_paired"] = {"drop": drop, "lo": lo, "hi": hi}
    home = out["shenzhen"]["auc"]
    out["recovered_tree"] = PF.recovered_fraction(home, out["montgomery_tree"]["auc"],
                                                  out["matched_tree"]["auc"])
    out["recovered_paired"] = PF.recovered_fraction(home, out["montgomery_paired"]["auc"],
                                                    out["matched_paired"]["auc"])
    out["recovered_paired_oracle"] = PF.recovered_fraction(home, out["montgomery_paired"]["auc"],
                                                           out["oracle_matched_paired"]["auc"])
    log(f"seed {seed}: AUC Shenzhen {home:.3f}, Montgomery tree {out['montgomery_tree']['auc']:.3f}, "
        f"paired {out['montgomery_paired']['auc']:.3f}", t0)
    return out


TB_ROWS = (  # (key in a seed's result, label in the table)
    ("shenzhen", "Shenzhen-like, held-out patients (in-domain)"),
    ("montgomery_tree", "Montgomery-like tree (MontgomerySet)"),
    ("montgomery_paired", "held-out subjects' own Montgomery renders (paired)"),
    ("matched_tree", "MontgomerySet, histogram-matched to Shenzhen"),
    ("matched_paired", "paired renders, histogram-matched to Shenzhen"),
    ("oracle_matched_paired", "paired renders, oracle-matched (own Shenzhen histogram)"),
)


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every AUC, drop and recovered fraction."""
    def stats(values):
        v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
        return {"mean": float(v.mean()) if v.size else math.nan,
                "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0}

    out = {key: stats([s[key]["auc"] for s in seeds]) for key, _ in TB_ROWS}
    for key in ("drop_tree", "drop_paired"):
        out[key] = stats([s[key]["drop"] for s in seeds])
    # A ratio of per-seed ratios explodes when one seed's drop is near zero: recover from the
    # mean AUCs instead (sd: the per-seed spread, for reference).
    home = out["shenzhen"]["mean"]
    for key, away, fixed in (("recovered_tree", "montgomery_tree", "matched_tree"),
                             ("recovered_paired", "montgomery_paired", "matched_paired"),
                             ("recovered_paired_oracle", "montgomery_paired", "oracle_matched_paired")):
        out[key] = {"mean": PF.recovered_fraction(home, out[away]["mean"], out[fixed]["mean"]),
                    "sd": stats([s[key] for s in seeds])["sd"]}
    return out


def goals(loaders: dict[str, Any], gaps: dict[str, Any], tb: dict[str, Any],
          boxes: dict[str, Any]) -> list[dict[str, Any]]:
    m = tb["summary"]
    lo, hi = GOAL_AUC
    rows = [
        ("loaders read every tree with the truth's counts and labels",
         sum(t["read"] for p in loaders.values() for t in p.values()),
         "all ok", all(t["ok"] for p in loaders.values() for t in p.values())),
        ("site detector accuracy, the two trees (5-fold CV)", gaps["trees"]["accuracy"],
         f">= {GOAL_GAP}", gaps["trees"]["accuracy"] >= GOAL_GAP),
        ("TB AUC in-domain (Shenzhen-like), mean over seeds", m["shenzhen"]["mean"],
         f"{lo}-{hi}", lo <= m["shenzhen"]["mean"] <= hi),
        ("AUC drop to the Montgomery-like tree", m["drop_tree"]["mean"], f">= {GOAL_DROP}",
         m["drop_tree"]["mean"] >= GOAL_DROP),
        ("AUC drop to the same subjects' Montgomery renders", m["drop_paired"]["mean"],
         f">= {GOAL_DROP}", m["drop_paired"]["mean"] >= GOAL_DROP),
        ("share of the paired drop histogram matching recovers", m["recovered_paired"]["mean"],
         "< 1 (not removed)", m["recovered_paired"]["mean"] < 1.0),
        ("lesion boxes in their region, boxes = mask boxes",
         sum(b["boxes"] for b in boxes.values()), "0 problems",
         all(b["ok"] for b in boxes.values())),
    ]
    return [{"check": c, "value": v, "goal": g, "pass": bool(ok)} for c, v, g, ok in rows]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def report(result: dict[str, Any]) -> str:
    lines = ["## Phantom fitness", ""]
    lines += ["| check | value | goal | pass |", "|---|---|---|---|"]
    lines += [f"| {g['check']} | {_fmt(g['value'])} | {g['goal']} | {'yes' if g['pass'] else 'NO'} |"
              for g in result["goals"]]
    lines += ["", "### 1. Loaders", "", "| preset | tree | layout | expected | read | positives | problems |",
              "|---|---|---|---|---|---|---|"]
    for preset, trees in result["loaders"].items():
        for tree, t in trees.items():
            pos = ", ".join(f"{k} {v}" for k, v in t["positives"].items())
            bad = len(t["label_mismatches"]) + len(t["missing"]) + len(t["problems"]) + \
                len(t["demographic_mismatches"])
            lines.append(f"| {preset} | {tree} | {t['layout']} | {t['expected']} | {t['read']} | {pos} | {bad} |")
    g = result["domain_gap"]
    lines += ["", "### 2. Domain gap (site detector accuracy, 5-fold CV; 0.5 = no gap)", "",
              "| images | detector | accuracy |", "|---|---|---|",
              f"| ChinaSet_AllFiles vs MontgomerySet | 32-bin histogram | {g['trees']['accuracy']:.3f} ± {g['trees']['std']:.3f} |",
              f"| same subjects, both chains | 32-bin histogram | {g['paired']['accuracy']:.3f} ± {g['paired']['std']:.3f} |",
              f"| same subjects, Montgomery histogram-matched | 32-bin histogram | {g['paired_matched']['accuracy']:.3f} ± {g['paired_matched']['std']:.3f} |",
              f"| same subjects, Montgomery histogram-matched | histogram of the high-pass residual | {g['paired_matched_texture']['accuracy']:.3f} ± {g['paired_matched_texture']['std']:.3f} |"]
    tb = result["tb"]
    seeds = tb["seeds"]
    lines += ["", f"### 3-4. TB AUROC of the small CNN trained on Shenzhen-like images "
                  f"({seeds[0]['n_train']} train / {seeds[0]['n_test']} test images; bootstrap 95 % CI)", "",
              "| test set | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " | mean ± sd |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for key, label in TB_ROWS:
        cells = [f"{s[key]['auc']:.3f} [{s[key]['lo']:.3f}, {s[key]['hi']:.3f}]" for s in seeds]
        m = tb["summary"][key]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {m['mean']:.3f} ± {m['sd']:.3f} |")
    for key, label in (("drop_tree", "drop: in-domain − Montgomery tree"),
                       ("drop_paired", "drop: in-domain − paired renders (pure shift)")):
        cells = [f"{s[key]['drop']:.3f} [{s[key]['lo']:.3f}, {s[key]['hi']:.3f}]" for s in seeds]
        m = tb["summary"][key]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {m['mean']:.3f} ± {m['sd']:.3f} |")
    for key, label in (("recovered_tree", "share of the tree drop recovered by matching"),
                       ("recovered_paired", "share of the paired drop recovered by matching"),
                       ("recovered_paired_oracle", "share of the paired drop recovered by oracle matching")):
        cells = [_fmt(s[key]) for s in seeds]
        m = tb["summary"][key]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(m['mean'])} (of the mean AUCs) |")
    lines += ["", "### 5. Lesion boxes", "", "| preset | subjects | boxes | problems |", "|---|---|---|---|"]
    for preset, b in result["boxes"].items():
        lines.append(f"| {preset} | {b['subjects']} | {b['boxes']} | {len(b['problems'])} |")
    for preset, b in result["boxes"].items():
        lines += [f"- {preset}: {p}" for p in b["problems"][:10]]
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def run(a: argparse.Namespace, seeds: tuple[int, ...]) -> dict[str, Any]:

    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)  # the entry point owns the process's thread budget
    a.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    log("generating phantom trees" if a.data is None else "generating the extra trees", t0)
    trees = generate_trees(a)
    timings["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    manifests = {p: PF.read_manifest(root) for p, root in trees.items()}
    loaders = {p: PF.check_loaders(root, p, manifests[p]) for p, root in trees.items()}
    boxes = {p: PF.check_truth_boxes(root, manifests[p]) for p, root in trees.items()}
    timings["loaders_and_boxes"] = time.perf_counter() - t
    log("loaders and boxes checked", t0)

    t = time.perf_counter()
    d = NlmImages(trees["nlm"], manifests["nlm"])
    gaps = domain_gaps(d, a.seed)
    timings["domain_gap"] = time.perf_counter() - t
    log(f"domain gap {gaps['trees']['accuracy']:.3f}", t0)

    t = time.perf_counter()
    cfg = PF.FitnessTrainConfig(epochs=a.epochs, lr=a.lr)
    per_seed = [tb_seed(d, s, cfg, a.boot, t0) for s in seeds]
    timings["tb"] = time.perf_counter() - t
    tb = {"train_config": asdict(cfg), "split": SPLIT, "seeds": per_seed, "summary": summarize(per_seed)}

    result = {
        "config": {"data": trees["nlm"], "size": a.size, "seed": a.seed, "difficulty": a.difficulty,
                   "seeds": list(seeds), "boot": a.boot, "threads": a.threads,
                   "other_n": a.other_n, "trees": trees},
        "loaders": loaders, "domain_gap": gaps, "tb": tb, "boxes": boxes,
    }
    result["goals"] = goals(loaders, gaps, tb, boxes)
    timings["total"] = time.perf_counter() - t0
    result["seconds"] = timings
    path = atomic_write_text(a.out / "fitness.json", json.dumps(_jsonable(result), indent=1) + "\n")
    print(report(result))
    print(f"total {timings['total']:.0f} s; JSON: {path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        seeds = check_args(a)
        result = run(a, seeds)
    except CxrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(g["pass"] for g in result["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
