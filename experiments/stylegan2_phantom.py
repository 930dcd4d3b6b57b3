"""StyleGAN2 augmentation on the phantom: ADA, no augmentation and DiffAugment at one budget.

    python -m experiments.stylegan2_phantom --out runs/sg2_phantom                      # 64², 3 seeds
    python -m experiments.stylegan2_phantom --out DIR --size 64 --seeds 3 --kimg 1.25 --preset tiny
    python -m experiments.stylegan2_phantom --out DIR --data data/phantom --splits montgomery --no-cas
    python -m experiments.stylegan2_phantom --out DIR --merge DIR_A DIR_B   # one table from two processes

Writes (or reads with ``--data``) the phantom's nlm preset at ``--size``, then for each training
split (the Shenzhen-like tree's, about 463 images, and the Montgomery-like tree's, about 97; the
patient-level split every trainer uses), each mode (``ada``, ``none``, ``diffaugment``) and each
seed trains the StyleGAN2 (``stylegan2_tiny`` by default, ``--kimg`` thousand images, the same
budget for every mode), writes ``--fake`` images of the training split's class mix with
``cxr generate``'s code and judges them as ``cxr evaluate gan`` does, in one feature space per
split (built once: the small CNN trained on that training split, unless Inception or xrv weights
are local): relative FD, FD, KID, precision/recall/density/coverage, diversity, the memorized
share (generated images nearer a training image than the 1st percentile of the held-out images'
own nearest-training distances, in features; the SSIM variant is left out for time), and the
classification accuracy score (AUROC on the held-out real images of the small classifier trained
on generated images only, beside the same classifier trained on the real training images).

Per split and mode the seeds are aggregated as mean ± sd. The goals reported against: ADA's
relative FD below no augmentation's on the Montgomery-like split by more than the seeds' spread;
no generated image memorized; CAS within 0.10 AUROC of the real-trained classifier.
Outputs in ``--out``: ``runs/`` (GAN and classifier runs), ``fake/`` (generated trees),
``eval/<run>.json`` (one per run), ``results.json`` and ``results.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr.configs import shipped_config  # noqa: E402
from cxr.data.io import atomic_write_text  # noqa: E402
from cxr.data.layouts import load_tree  # noqa: E402
from cxr.data.splits import split_records  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.engine.distributed import resolve_device  # noqa: E402
from cxr.metrics import generative as gm  # noqa: E402
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402
from eval.gan_features import resolve_kind  # noqa: E402
from eval.generative import (  # noqa: E402
    MEMORIZATION_PERCENTILE,
    SPLIT_FRACTIONS,
    GanEvalOptions,
    ImageGroup,
    PairDissimilarity,
    build_extractor,
    classifier_config,
    diversity,
    quality,
    read_images,
    split_generated,
    task_for,
    train_classifier,
)
from gan.stylegan2.generate import generate_tree, load_generator, prevalence_of  # noqa: E402
from gan.stylegan2.trainer import StyleGAN2Config, train  # noqa: E402

SPLITS = {"shenzhen": ("ChinaSet_AllFiles", "Shenzhen-like"), "montgomery": ("MontgomerySet", "Montgomery-like")}
MODES = ("ada", "none", "diffaugment")
METRICS = ("relative_fd", "fd", "kid", "precision", "recall", "density", "coverage", "diversity_fake",
           "memorized_share", "cas_auroc")
CAS_GAP_GOAL = 0.10


@dataclass
class SplitContext:
    """One training split's evaluation pieces, built once for all its runs."""

    name: str
    tree: Path
    groups: dict[str, ImageGroup]
    extractor: Any
    task: Any
    real_auroc: float | None
    held_nn: np.ndarray  # held-out images' nearest-training distances in features


def _auroc(summary: dict[str, Any] | None) -> float | None:
    if not summary:
        return None
    value = summary.get("metrics", {}).get("auroc")
    return None if value is None or not math.isfinite(value) else float(value)


def prepare_split(name: str, tree: Path, out: Path, size: int, cas: bool, echo) -> SplitContext:
    """Read and split the real tree, build the feature extractor (and the real-trained CAS classifier)."""
    records = list(load_tree(tree).records)
    parts = split_records(records, SPLIT_FRACTIONS, seed=0)
    groups = {k: ImageGroup(str(tree), parts[src], read_images(parts[src], size))
              for k, src in (("train", "train"), ("val", "val"), ("heldout", "test"))}
    task = task_for(groups["train"].records, tree)
    device = resolve_device("auto")
    opts = GanEvalOptions(real=tree, fake=tree, out=out, size=size, cas=cas)
    kind = resolve_kind("auto")
    echo(f"{name}: {len(groups['train'])} training, {len(groups['heldout'])} held-out images; extractor {kind}")
    shutil.rmtree(out / "runs" / f"{name}-real", ignore_errors=True)  # a repeated experiment starts afresh
    ext, cas_real = build_extractor(kind, opts, task, device, groups, out / "runs" / f"{name}-real")
    if cas and cas_real is None:
        _, cas_real = train_classifier(classifier_config(opts, task, device.type), task, groups["train"],
                                       groups["val"], groups["heldout"], out / "runs" / f"{name}-real", "real")
    for g in groups.values():
        g.features = ext.embed(g.images)
    held_nn, _ = gm.nearest_neighbours(groups["heldout"].features, groups["train"].features)
    return SplitContext(name, tree, groups, ext, task, _auroc(cas_real), held_nn)


def train_run(ctx: SplitContext, mode: str, seed: int, args: argparse.Namespace) -> Path:
    """One StyleGAN2 run on the split's training images; its run folder."""
    run_dir = args.out / "runs" / f"{ctx.name}-{mode}-s{seed}"
    cfg = load_config(StyleGAN2Config, shipped_config(f"stylegan2_{args.preset}"), [
        f"data.train={ctx.tree}", f"data.size={args.size}", f"data.cache_dir={args.out / 'cache' / ctx.name}",
        "data.decode_workers=1", f"seed={seed}", f"ada.mode={mode}", f"ada.kimg={args.ada_kimg or args.kimg}",
        f"train.kimg={args.kimg}", f"train.batch_size={args.batch_size}", "train.steps=1", "train.log_every=50",
        "train.image_every=0", "train.ckpt_every=0", "train.fid_every=0", "train.keep_last=1", *args.overrides])
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(args.out / "runs" / f"{run_dir.name}-cas", ignore_errors=True)
    if train(cfg, run_dir).interrupted:
        raise KeyboardInterrupt  # Ctrl-C stopped the run: stop the experiment too, nothing aggregated
    return run_dir


def evaluate_run(ctx: SplitContext, run_dir: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The run's generated set, judged in the split's feature space."""
    gen = load_generator(run_dir)
    fake_dir = args.out / "fake" / run_dir.name
    generate_tree(gen, fake_dir, prevalence_of(ctx.tree, gen), args.fake, "shenzhen", seed=seed, overwrite=True)
    recs = list(load_tree(fake_dir).records)
    fake = ImageGroup(str(fake_dir), recs, read_images(recs, args.size))
    fake.features = ctx.extractor.embed(fake.images)
    train_g, held = ctx.groups["train"], ctx.groups["heldout"]
    opts = GanEvalOptions(real=ctx.tree, fake=fake_dir, out=args.out, size=args.size, seed=seed, cas=args.cas)
    notes: list[str] = []
    row = quality(train_g.features, fake.features, held.features, opts, "overall", notes)
    measure = PairDissimilarity(args.size, torch.device("cpu"))
    row["diversity_fake"] = diversity(fake.images, measure, seed)
    row["diversity_real"] = diversity(train_g.images, measure, seed)
    d_fake, _ = gm.nearest_neighbours(fake.features, train_g.features)
    share, threshold = gm.memorization_share(d_fake, ctx.held_nn, MEMORIZATION_PERCENTILE)
    row.update(memorized_share=share, memorization_threshold=threshold, min_nn_distance=float(d_fake.min()))
    row["cas_auroc"] = None
    if args.cas:
        cfg = classifier_config(opts, ctx.task, resolve_device("auto").type)
        fk_train, fk_val = split_generated(fake, seed)
        _, summary = train_classifier(cfg, ctx.task, fk_train, fk_val, held, args.out / "runs" / f"{run_dir.name}-cas",
                                      "synthetic")
        row["cas_auroc"] = _auroc(summary)
    row["cas_real_auroc"] = ctx.real_auroc
    row["notes"] = list(dict.fromkeys(notes + [measure.note] if measure.note else notes))
    return row


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """split → mode → metric → {mean, sd, n, values} over the seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["split"], {}).setdefault(r["mode"], {})
    for split, modes in out.items():
        for mode in modes:
            rows = [r for r in runs if r["split"] == split and r["mode"] == mode]
            for m in METRICS:
                values = [r["metrics"].get(m) for r in rows]
                mean, sd, n = _mean_sd(values)
                modes[mode][m] = {"mean": mean, "sd": sd, "n": n, "values": values}
    return out


def goals(agg: dict[str, Any], real_auroc: dict[str, float | None]) -> list[str]:
    """The three goals, each a line saying met or missed, with the numbers."""
    lines = []
    mc = agg.get("montgomery", {})
    if "ada" in mc and "none" in mc and mc["ada"]["relative_fd"]["mean"] is not None:
        a, n = mc["ada"]["relative_fd"], mc["none"]["relative_fd"]
        spread = max(a["sd"] or 0.0, n["sd"] or 0.0)
        gain = n["mean"] - a["mean"]
        met = gain > spread
        lines.append(f"ADA better than no augmentation on the Montgomery-like split (relative FD {a['mean']:.3f} vs "
                     f"{n['mean']:.3f}, gain {gain:+.3f}, larger seed sd {spread:.3f}): {'met' if met else 'MISSED'}")
    worst = max((m["memorized_share"]["mean"] or 0.0, s, k) for s, modes in agg.items() for k, m in modes.items())
    lines.append(f"no generated image nearer a training image than the 1st percentile of held-out distances "
                 f"(largest mean memorized share {worst[0]:.3f}, {worst[1]} {worst[2]}): "
                 f"{'met' if worst[0] == 0 else 'MISSED'}")
    for split, modes in agg.items():
        real = real_auroc.get(split)
        for mode, m in modes.items():
            cas = m["cas_auroc"]["mean"]
            if cas is None or real is None:
                continue
            gap = real - cas
            lines.append(f"CAS within {CAS_GAP_GOAL:.2f} AUROC of real ({split}, {mode}: {cas:.3f} vs {real:.3f}, "
                         f"gap {gap:+.3f}): {'met' if gap <= CAS_GAP_GOAL else 'MISSED'}")
    return lines


def _cell(stat: dict[str, Any], fmt: str = ".3f") -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}" if stat["n"] > 1 else f"{stat['mean']:{fmt}}"


def markdown(agg: dict[str, Any], real_auroc: dict[str, float | None], n_train: dict[str, int]) -> str:
    head = ["split", "mode", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split, modes in agg.items():
        for mode, m in modes.items():
            label = f"{SPLITS[split][1]} ({n_train[split]})"
            lines.append("| " + " | ".join([label, mode, *(_cell(m[k], ".4g" if k in ("fd", "kid") else ".3f")
                                                            for k in METRICS)]) + " |")
    real = ", ".join(f"{SPLITS[s][1]} {v:.3f}" for s, v in real_auroc.items() if v is not None)
    return "\n".join(lines) + (f"\n\nreal-trained classifier AUROC on the held-out images: {real}\n" if real else "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="an existing `cxr phantom --preset nlm` folder")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kimg", type=float, default=1.25, help="training length of every run, thousands of images")
    ap.add_argument("--ada-kimg", type=float, default=None, help="ADA's p speed (ada.kimg; default: --kimg)")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "nlm"), help="config stylegan2_<preset>")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fake", type=int, default=200, help="generated images per run")
    ap.add_argument("--splits", default="shenzhen,montgomery")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-cas", dest="cas", action="store_false", help="skip the classification accuracy score")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                    help="only aggregate the results.json of earlier runs (e.g. one split per process) into --out")
    ap.add_argument("overrides", nargs="*", help="StyleGAN2 config overrides, e.g. model.channel_base=512")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    splits = [s for s in args.splits.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    bad = [s for s in splits if s not in SPLITS] + [m for m in modes if m not in MODES]
    if bad or args.seeds < 1 or args.kimg <= 0:
        ap.error(f"unknown split or mode {bad}, or --seeds < 1, or --kimg <= 0")
    torch.set_num_threads(args.threads)

    def echo(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    phantom = args.data
    if phantom is None:
        phantom = args.out / "phantom"
        if not (phantom / "phantom_truth").is_dir():
            generate(PhantomConfig(preset="nlm", out=phantom, size=args.size, seed=0, overwrite=True, workers=1))
    (args.out / "eval").mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    real_auroc: dict[str, float | None] = {}
    n_train: dict[str, int] = {}
    for split in splits:
        ctx = prepare_split(split, phantom / SPLITS[split][0], args.out, args.size, args.cas, echo)
        real_auroc[split], n_train[split] = ctx.real_auroc, len(ctx.groups["train"])
        for mode in modes:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                run_dir = train_run(ctx, mode, seed, args)
                t_train = time.perf_counter() - t0
                metrics = evaluate_run(ctx, run_dir, seed, args)
                record = {"split": split, "mode": mode, "seed": seed, "run": str(run_dir),
                          "train_seconds": round(t_train, 1), "eval_seconds": round(time.perf_counter() - t0 - t_train, 1),
                          "extractor": ctx.extractor.name, "metrics": metrics}
                atomic_write_text(args.out / "eval" / f"{run_dir.name}.json", json.dumps(record, indent=2) + "\n")
                runs.append(record)
                echo(f"{split} {mode} seed {seed}: relative FD {metrics['relative_fd']}, CAS {metrics['cas_auroc']}, "
                     f"memorized {metrics['memorized_share']:.3f} ({t_train:.0f} s training)")
    seconds = time.perf_counter() - t_start
    budget = (f"{args.size}², stylegan2_{args.preset} widths, batch {args.batch_size}, {args.kimg:g} kimg per run "
              f"(ada.kimg {args.ada_kimg or args.kimg:g}), {args.seeds} seeds, {args.fake} generated images per run, "
              f"{args.threads} thread(s); {seconds / 60:.1f} min in all")
    print(write_results(args.out, runs, real_auroc, n_train, [budget], seconds))
    return 0


def write_results(out: Path, runs: list[dict[str, Any]], real_auroc: dict[str, float | None], n_train: dict[str, int],
                  budgets: list[str], seconds: float) -> str:
    """``results.md`` and ``results.json`` in ``out``: the table, the goals, the budget; the text."""
    agg = aggregate(runs)
    lines = goals(agg, real_auroc)
    table = markdown(agg, real_auroc, n_train)
    extractors = sorted({r["extractor"] for r in runs})
    text = ("".join(f"budget: {b}\n" for b in budgets) + f"feature extractors: {', '.join(extractors)}\n\n{table}\n"
            + "\n".join(f"- {x}" for x in lines) + "\n")
    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps(
        {"budget": budgets, "seconds": seconds, "extractors": extractors, "real_auroc": real_auroc,
         "n_train": n_train, "aggregate": agg, "goals": lines, "runs": runs}, indent=2) + "\n")
    return text


def merge(dirs: list[Path], out: Path) -> int:
    """One table from several experiments' ``results.json`` (e.g. each split run as its own process)."""
    runs: list[dict[str, Any]] = []
    real_auroc: dict[str, float | None] = {}
    n_train: dict[str, int] = {}
    budgets: list[str] = []
    seconds = 0.0
    for d in dirs:
        res = json.loads((d / "results.json").read_text(encoding="utf-8"))
        runs += res["runs"]
        real_auroc.update(res["real_auroc"])
        n_train.update(res["n_train"])
        given = res["budget"]
        budgets += [f"{d.name}: {b}" for b in (given if isinstance(given, list) else [given])]
        seconds = max(seconds, float(res["seconds"]))
    out.mkdir(parents=True, exist_ok=True)
    print(write_results(out, runs, real_auroc, n_train, budgets, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
