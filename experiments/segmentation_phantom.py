"""Lung segmentation across the phantom's two acquisition chains, and after each harmonizer.

The nlm phantom renders every subject through both chains, pixel-aligned, with one lung label
image (``phantom_truth/``). So each chain gives a segmentation set of the *same* subjects with
the *same* truth, and the only difference between the sets is the chain. The experiment:

1. writes each chain's renders as a Montgomery-layout tree (``CXR_png``, ``ClinicalReadings``,
   ``ManualMask/{leftMask,rightMask}`` from the truth lungs), the same file names in both, so
   every trainer's patient-level split puts the same subjects in the same part;
2. trains one U-Net per chain (:mod:`classifiers.segmenter`, the one loop) on its training part;
3. scores each on both chains' test part at each image's own size (Dice, IoU, HD95 per lung):
   in-chain, and across chains (the drop);
4. harmonizes the other chain's test images towards the training chain with each classical
   harmonizer (:mod:`harmonize.methods`, fitted on the training chain's training part, as
   ``cxr harmonize`` fits on the reference's training split; mask methods get the truth lungs)
   and scores again;
5. with ``--train-learned`` (or ``--learned METHOD=RUN``), does the same with learned
   translators: CycleGAN, CUT or FastCUT with the recipe of :mod:`experiments.harmonization_phantom`
   (the tiny configs, ``data.prematch=histogram``), trained from the other chain's tree to the
   training chain's (each trainer uses the training part of the same patient-level split only),
   applied to the other chain's test images with ``translate_run``.

``python -m experiments.segmentation_phantom --out DIR [--size 256]`` writes ``DIR/results.json``
and ``DIR/table.md``; figures: docs/results/segmentation.md. :func:`chain_dice` is the cheap
version for the demo: one small segmenter on one chain, Dice on both chains' test part.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from classifiers.segmenter import SegmenterConfig, load_segmenter, segment_image
from classifiers.segmenter import train as train_segmenter
from cxr.data.image import load_image
from cxr.data.io import atomic_write_text
from cxr.data.layouts import load_tree
from cxr.data.masks import IMAGE_LEFT, IMAGE_RIGHT, TRUTH_DIR, load_lung_mask, read_label_mask
from cxr.data.record import Sample
from cxr.data.splits import split_records
from cxr.engine.config import load_config
from cxr.errors import DataError
from cxr.metrics.segmentation import lung_scores, mean_scores
from cxr.phantom.generate import PhantomConfig, generate
from experiments.harmonization_phantom import CUT_CONFIG, CUT_OVERRIDES, CYCLEGAN_CONFIG, CYCLEGAN_OVERRIDES, LEARNED
from gan.cut.trainer import train_cut
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.trainer import train as train_cyclegan
from gan.cyclegan.translate import translate_run
from harmonize.methods import HARMONIZERS, create_harmonizer

CHAINS = ("shenzhen", "montgomery")
GIVEN_INTO = "shenzhen"  # --learned runs translate Montgomery-like images (domain A) into Shenzhen-like ones


# ----------------------------------------------------------------------------------------------
# The chains as trees


def truth_rows(phantom: str | Path) -> list[dict[str, str]]:
    """The phantom truth's subjects that have a lung label image and a render in every chain."""
    manifest = Path(phantom) / TRUTH_DIR / "manifest.csv"
    if not manifest.is_file():
        raise DataError(manifest, "missing: an nlm phantom (`cxr phantom --preset nlm`) is needed")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lung_mask") and all(r.get(f"render_{c}") for c in CHAINS)]
    if not rows:
        raise DataError(manifest, f"no subject with a lung mask and renders of {', '.join(CHAINS)}")
    return rows


def write_chain_trees(phantom: str | Path, out: str | Path, limit: int | None = None) -> dict[str, Path]:
    """``out/<chain>/`` for each chain: every subject's render in the Montgomery layout, its truth
    lungs as ``ManualMask``; the same names in both trees (``MCUCXR_<n>_<tb>.png``)."""
    phantom, out = Path(phantom), Path(out)
    rows = truth_rows(phantom)[:limit]
    trees = {}
    for chain in CHAINS:
        root = out / chain
        shutil.rmtree(root, ignore_errors=True)
        for d in ("CXR_png", "ClinicalReadings", "ManualMask/leftMask", "ManualMask/rightMask"):
            (root / d).mkdir(parents=True)
        for i, r in enumerate(rows):
            tb = int("Tuberculosis" in (r.get("findings") or ""))
            stem = f"MCUCXR_{i + 1:04d}_{tb}"
            shutil.copyfile(phantom / r[f"render_{chain}"], root / "CXR_png" / f"{stem}.png")
            age = int(float(r.get("age") or 40))
            (root / "ClinicalReadings" / f"{stem}.txt").write_text(
                f"Patient's Sex: {r.get('sex') or 'M'} \nPatient's Age: {age:03d}Y\n\n{'TB' if tb else 'normal'}\n")
            labels = read_label_mask(str(phantom / r["lung_mask"]))
            for side, value in (("leftMask", IMAGE_LEFT), ("rightMask", IMAGE_RIGHT)):
                Image.fromarray(((labels == value) * 255).astype(np.uint8)).save(root / "ManualMask" / side / f"{stem}.png")
        trees[chain] = root
    return trees


def split_of(tree: Path, part: str, cfg: SegmenterConfig) -> list[Sample]:
    return split_records(load_tree(tree).records, cfg.data.split_fractions, cfg.data.split_seed)[part]


# ----------------------------------------------------------------------------------------------
# Training and scoring


def segmenter_config(tree: Path, size: int, epochs: int, width: int, depth: int, batch: int, seed: int,
                     lr: float = 0.01, extra: Sequence[str] = ()) -> SegmenterConfig:
    return load_config(SegmenterConfig, None, [
        f"data.train={tree}", f"data.size={size}", "device=cpu", f"seed={seed}", f"model.width={width}",
        f"model.depth={depth}", f"train.batch_size={batch}", f"train.epochs={epochs}", f"optim.lr={lr}",
        "train.log_every=50", "train.keep_last=1", *extra])


def score(net: torch.nn.Module, records: Sequence[Sample], size: int,
          transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Mean Dice, IoU and HD95 (both lungs) of ``net`` on ``records`` at each image's own size;
    ``transform(image, truth_lungs)`` is applied to each image first (a harmonizer)."""
    rows = []
    device = torch.device("cpu")
    for r in records:
        img, truth = load_image(r.image), load_lung_mask(r)
        if transform is not None:
            img = np.clip(transform(img, truth != 0), 0.0, 1.0).astype(np.float32)
        rows.append(lung_scores(segment_image(net, img, size, device), truth))
    m = mean_scores(rows)
    missed = sum(not math.isfinite(r[f"hd95_{side}"]) for r in rows for side in ("left", "right"))
    return {"n": len(rows), "dice": m["dice"], "iou": m["iou"], "dice_left": m["dice_left"],
            "dice_right": m["dice_right"], "hd95": (m["hd95_left"] + m["hd95_right"]) / 2,
            "hd95_median": float(np.median([(r["hd95_left"] + r["hd95_right"]) / 2 for r in rows])),
            "lungs_missed": missed}


def fitted_harmonizer(method: str, reference: Sequence[Sample]):
    """``method`` fitted on the reference records (with their lungs when it uses masks)."""
    h = create_harmonizer(method)
    if h.fitted:
        images = [load_image(r.image) for r in reference]
        masks = [load_lung_mask(r) != 0 for r in reference] if h.uses_masks else None
        h.fit(images, masks)
    return h


def run(phantom: str | Path, out: str | Path, size: int, epochs: int, width: int = 8, depth: int = 4,
        batch: int = 8, seed: int = 0, methods: Sequence[str] | None = None, limit: int | None = None,
        echo: Callable[[str], None] = print, train_learned: Sequence[str] = (),
        learned_runs: Mapping[str, str | Path] | None = None, learned_into: Sequence[str] = (GIVEN_INTO,),
        gan_steps: int | None = None, gan_size: int | None = None) -> dict[str, Any]:
    """The whole experiment (module docstring); returns and writes ``results.json``.

    ``train_learned``: translators to train for each training chain in ``learned_into`` (from the
    other chain to it); ``learned_runs``: method -> an existing run translating Montgomery-like
    images into Shenzhen-like ones (rows of the Shenzhen-like model only)."""
    out = Path(out)
    t0 = time.perf_counter()
    learned_runs = {m: Path(r) for m, r in (learned_runs or {}).items()}
    for m in [*train_learned, *learned_runs]:
        if m not in LEARNED:
            raise DataError(m, f"not a learned harmonizer; one of {', '.join(LEARNED)}")
    if both := sorted(set(train_learned) & set(learned_runs)):
        raise DataError(",".join(both), "both given as a run and asked to be trained; choose one")
    for c in learned_into:
        if c not in CHAINS:
            raise DataError(c, f"not a chain; one of {', '.join(CHAINS)}")
    trees = write_chain_trees(phantom, out / "trees", limit)
    methods = list(HARMONIZERS) if methods is None else list(methods)
    results: dict[str, Any] = {"phantom": str(phantom), "size": size, "epochs": epochs, "width": width,
                               "depth": depth, "batch": batch, "seed": seed, "methods": methods,
                               "learned": {"trained": list(train_learned), "into": list(learned_into),
                                           "given": {m: str(r) for m, r in learned_runs.items()},
                                           "gan_steps": gan_steps, "gan_size": gan_size},
                               "train": {}}
    for train_chain in CHAINS:
        cfg = segmenter_config(trees[train_chain], size, epochs, width, depth, batch, seed)
        t = time.perf_counter()
        res = train_segmenter(cfg, out / f"run_{train_chain}", echo=lambda _s: None)
        net = _load_best(res.best, cfg)
        entry: dict[str, Any] = {"train_images": len(split_of(trees[train_chain], "train", cfg)),
                                 "epochs_done": res.epochs_done, "train_seconds": round(time.perf_counter() - t, 1),
                                 "val_dice_history": [round(v, 4) for v in res.history], "test": {}}
        reference = split_of(trees[train_chain], "train", cfg)
        results["train"][train_chain] = entry
        for test_chain in sorted(CHAINS, key=lambda c: c != train_chain):  # in-chain first
            test = split_of(trees[test_chain], "test", cfg)
            entry["test"][test_chain] = {"none": score(net, test, size)}
            echo(f"trained on {train_chain}, tested on {test_chain}: dice {entry['test'][test_chain]['none']['dice']:.4f}")
            _save(out, results)
            if test_chain == train_chain:
                continue
            for m in methods:
                h = fitted_harmonizer(m, reference)
                s = score(net, test, size, lambda img, lungs, h=h: h.apply(img, lungs if h.uses_masks else None))
                entry["test"][test_chain][m] = s
                echo(f"  after {m}: dice {s['dice']:.4f}")
                _save(out, results)
            runs = dict(learned_runs) if train_chain == GIVEN_INTO else {}
            if train_chain in learned_into:
                runs.update({m: out / "translators" / f"{test_chain}_to_{train_chain}_{m}" for m in train_learned})
            for m, run_dir in runs.items():
                t = time.perf_counter()
                if m in train_learned:
                    echo(f"  training {m}: {test_chain} -> {train_chain}")
                    train_translator(m, trees[test_chain], trees[train_chain], run_dir, seed, gan_steps, gan_size)
                moved = translated_records(run_dir, m, trees[test_chain], test,
                                           out / "translated" / f"{test_chain}_to_{train_chain}_{m}")
                entry.setdefault("translator_seconds", {})[m] = round(time.perf_counter() - t, 1)
                s = score(net, moved, size)
                entry["test"][test_chain][m] = s
                echo(f"  after {m}: dice {s['dice']:.4f} ({entry['translator_seconds'][m]:.0f} s)")
                _save(out, results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["complete"] = True
    _save(out, results)
    return results


def _save(out: Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``table.md`` as far as the run got (``complete`` is false until the end),
    so a run stopped for time keeps its finished rows."""
    results.setdefault("complete", False)
    atomic_write_text(out / "results.json", json.dumps(_finite(results), indent=2) + "\n")
    atomic_write_text(out / "table.md", table(results))


def train_translator(method: str, a_tree: Path, b_tree: Path, run_dir: Path, seed: int, steps: int | None = None,
                     size: int | None = None) -> Path:
    """Train ``method`` (cyclegan, cut, fastcut) from ``a_tree`` to ``b_tree`` into ``run_dir`` with the
    harmonization experiment's recipe (tiny config, histogram prematch); ``steps``/``size``: None keeps
    the config's (300 steps, 64²)."""
    if method not in LEARNED:
        raise DataError(method, f"not a learned harmonizer; one of {', '.join(LEARNED)}")
    overrides = [f"seed={seed}", "device=cpu"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.ckpt_every={steps}", f"train.image_every={steps}"]
    if size is not None:
        overrides.append(f"data.size={size}")
    shutil.rmtree(run_dir, ignore_errors=True)
    if method == "cyclegan":
        train_cyclegan(load_config(CycleGANConfig, CYCLEGAN_CONFIG, [f"data.a={a_tree}", f"data.b={b_tree}",
                                                                     *overrides, *CYCLEGAN_OVERRIDES]), run_dir)
    else:
        train_cut(a_tree, b_tree, run_dir, [*overrides, *CUT_OVERRIDES, f"model.mode={method}"], config=CUT_CONFIG)
    return run_dir


def translated_records(run_dir: Path, method: str, tree: Path, records: Sequence[Sample], out_tree: Path) -> list[Sample]:
    """``records`` (of ``tree``) with their images replaced by the translation of ``tree`` with the
    run's a2b generator (written to ``out_tree``); masks and names unchanged."""
    translate_run(run_dir, tree, out_tree, method=method, overwrite=True)
    moved = []
    for r in records:
        image = out_tree / Path(r.image).relative_to(tree)
        if not image.is_file():
            raise DataError(image, f"missing: the translation of {r.image} by {run_dir}")
        moved.append(replace(r, image=str(image)))
    return moved


def _load_best(best: Path | None, cfg: SegmenterConfig) -> torch.nn.Module:
    if best is None:
        raise DataError("segmenter run", "no checkpoint written")
    net, _args, _ckpt = load_segmenter(best, torch.device("cpu"))
    return net


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per (training chain, test chain, harmonizer)."""
    lines = ["| trained on | tested on | harmonizer | Dice | IoU | HD95 (px) | images |",
             "|---|---|---|---|---|---|---|"]
    for train_chain, entry in results["train"].items():
        for test_chain, by_method in entry["test"].items():
            for m, s in by_method.items():
                hd = s["hd95"]
                hd_text = "inf (a lung missed)" if hd is None or not math.isfinite(hd) else f"{hd:.2f}"
                lines.append(f"| {train_chain} | {test_chain} | {m} | {s['dice']:.4f} | {s['iou']:.4f} | "
                             f"{hd_text} | {s['n']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The cheap version (cxr demo)


def chain_dice(phantom: str | Path, work: str | Path, train_chain: str = "shenzhen", size: int = 128,
               epochs: int = 10, width: int = 8, depth: int = 4, batch: int = 4, seed: int = 0,
               limit: int | None = 120) -> dict[str, float]:
    """Train a small segmenter on ``train_chain``'s training part of the phantom's truth and return
    the mean Dice on each chain's test part (in-chain and cross-chain), at each image's own size.
    The defaults (the first ``limit`` subjects: 84 train, 24 test; 128², 10 epochs) took 21 s on
    2 idle CPU cores (docs/results/segmentation.md); ``size=64, depth=3, epochs=6`` took 6 s;
    ``work`` receives the trees and the run."""
    if train_chain not in CHAINS:
        raise DataError(train_chain, f"not a chain; one of {', '.join(CHAINS)}")
    work = Path(work)
    trees = write_chain_trees(phantom, work / "trees", limit)
    cfg = segmenter_config(trees[train_chain], size, epochs, width, depth, batch, seed)
    res = train_segmenter(cfg, work / f"run_{train_chain}", echo=lambda _s: None)
    net = _load_best(res.best, cfg)
    return {c: score(net, split_of(trees[c], "test", cfg), size)["dice"] for c in CHAINS}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the phantom, trees, runs and results")
    p.add_argument("--phantom", help="an existing nlm phantom (default: render one into OUT/phantom)")
    p.add_argument("--size", type=int, default=256, help="network input and phantom size (default 256)")
    p.add_argument("--n", type=int, default=200, help="phantom subjects to render (default 200)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--methods", default=",".join(HARMONIZERS), help="harmonizers, comma-separated")
    p.add_argument("--train-learned", default="", help=f"learned harmonizers to train ({', '.join(LEARNED)}), "
                   "comma-separated (default none)")
    p.add_argument("--learned-into", default=GIVEN_INTO, help="training chains that get learned rows: shenzhen "
                   "(Montgomery-like images translated into Shenzhen-like ones; default), montgomery, or both")
    p.add_argument("--learned", default="", help="existing Montgomery-like -> Shenzhen-like translator runs, "
                   "METHOD=RUN comma-separated (e.g. cyclegan=runs/cg,fastcut=runs/fc)")
    p.add_argument("--gan-steps", type=int, default=None, help="translator steps (default: the config's 300)")
    p.add_argument("--gan-size", type=int, default=None, help="translator image size (default: the config's 64)")
    args = p.parse_args(argv)
    train_learned = [m for m in args.train_learned.split(",") if m]
    into = list(CHAINS) if args.learned_into == "both" else [c for c in args.learned_into.split(",") if c]
    given: dict[str, str] = {}
    for item in (i for i in args.learned.split(",") if i):
        m, sep, run_dir = item.partition("=")
        if not sep or not run_dir:
            p.error(f"--learned {item}: expected METHOD=RUN")
        given[m] = run_dir
    for m in [*train_learned, *given]:
        if m not in LEARNED:
            p.error(f"--learned/--train-learned {m}: choose from {', '.join(LEARNED)}")
    for c in into:
        if c not in CHAINS:
            p.error(f"--learned-into {c}: choose from {', '.join(CHAINS)} or both")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    phantom = Path(args.phantom) if args.phantom else out / "phantom"
    if not args.phantom and not (phantom / TRUTH_DIR).is_dir():
        generate(PhantomConfig(preset="nlm", out=phantom, size=args.size, n=args.n, seed=args.seed, overwrite=True))
    t = time.perf_counter()
    results = run(phantom, out, args.size, args.epochs, args.width, args.depth, args.batch, args.seed,
                  [m for m in args.methods.split(",") if m], train_learned=train_learned, learned_runs=given,
                  learned_into=into, gan_steps=args.gan_steps, gan_size=args.gan_size)
    sys.stdout.write(table(results))
    print(f"{time.perf_counter() - t:.0f} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
