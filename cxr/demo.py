"""``cxr demo``: the whole study on the built-in phantom, end to end, in one command.

Each capability of the codebase adds one stage here and one line to the summary, so the demo
is always the study as far as it has been built. Stages run in order on a shared
:class:`DemoState`; each returns the summary lines it contributes. Budget: the whole demo
stays within 10 minutes on 2 CPU cores (docs/results/demo.md lists measured stage times).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cxr.configs import shipped_config
from cxr.data.image import load_image
from cxr.data.inspect import inspect_tree
from cxr.data.io import atomic_write_text
from cxr.data.layouts import load_tree
from cxr.data.preprocess import Preprocess, apply
from cxr.data.splits import split_records
from cxr.engine.config import load_config
from cxr.errors import CxrError
from cxr.metrics.cross_domain import format_table
from cxr.phantom.generate import PhantomConfig, generate
from cxr.phantom.sheet import choose_subjects, paired_sheet
from eval import paired
from eval.domain_gap import domain_gap_accuracy
from eval.generative import GanEvalOptions, evaluate_gan, ssim_searched
from eval.harmonization import quick_audit
from eval.localization import phantom_pointing_game
from eval.paired import format_factors, format_gains, format_scores
from eval.study import cross_domain_study
from experiments.segmentation_phantom import chain_dice
from gan.cut.trainer import train_cut
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.trainer import train
from gan.cyclegan.translate import load_translator, translate_run, translate_tree
from gan.stylegan2 import trainer as stylegan2
from gan.stylegan2.generate import generate_tree, load_generator
from harmonize.histogram import CENTRAL_FIELD
from harmonize.trees import harmonize_tree

CYCLEGAN_CONFIG = shipped_config("cyclegan_tiny")
# The demo's CycleGAN runs the recipe of the paired proof: it translates the histogram-matched
# Montgomery-like tree, so matching puts the gray levels close and the generator learns what
# matching cannot do, while the border outside the judged field stays tied to the matched input
# (loss.lambda_border). Without the matching first the tie hurts (docs/cyclegan.md); with it,
# the demo's 300 steps score 0.864 on the test split instead of 0.829 (docs/notebook/cyclegan.md).
CYCLEGAN_OVERRIDES = ("loss.lambda_border=10",)
# The second learned translator: FastCUT (no identity pass, so the cheaper of CUT's two modes) on
# the same histogram-matched tree, at the tiny CUT config's size.
FASTCUT_CONFIG = "cut_tiny"
FASTCUT_OVERRIDES = ("model.mode=fastcut",)
# The classical harmonizers of harmonize.methods, each fitted on the Shenzhen-like training
# split and applied to the whole Montgomery-like tree: (folder, method, options).
CLASSICAL = (("histogram", "histogram", {}), ("histogram_centre", "histogram", {"field": CENTRAL_FIELD}),
             ("lung-histogram", "lung-histogram", {}), ("percentile", "percentile", {}),
             ("zscore", "zscore", {}), ("clahe", "clahe", {}), ("fda", "fda", {}))
LEARNED = ("cyclegan", "fastcut")  # folders under harmonized/, written by their stages
HARMONIZED_NAMES = {"histogram": "histogram-matched", "histogram_centre": "histogram-matched (centre)",
                    "cyclegan": "histogram-matched + CycleGAN", "fastcut": "histogram-matched + FastCUT"}
STYLEGAN2_CONFIG = shipped_config("stylegan2_tiny")
# The tiny config's 300 steps (2,400 images shown) train in about 90 s on 2 loaded CPU cores
# (docs/results/demo.md): the augmentation pipeline end to end, not a useful generator.
STYLEGAN2_OVERRIDES: tuple[str, ...] = ()
STYLEGAN2_STEPS = 300
# The SSIM nearest-training-image search takes about 0.2 s per image on 2 CPU cores: the demo
# searches a seeded 100 of the synthetic and of the held-out images (the feature search covers all).
DEMO_SSIM_IMAGES = 100
# The localization stage's lung segmenter: 64², depth 3, 6 epochs on the first 120 subjects, about
# 6 s on 2 idle cores (in-chain Dice 0.93; chain_dice's own 128² defaults reach 0.95 in 21 s;
# docs/results/segmentation.md).
SEGMENTER_SETTINGS = {"size": 64, "depth": 3, "epochs": 6}
# The augmented classifiers (one seed, half the classifier stage's epochs, at the generator's size,
# to keep the demo within budget): real only, synthetic images per real training image, and the
# control that adds as many copies of real training images as the larger synthetic share
# (data.duplicate_ratio).
AUGMENTATION = (("real only", "real", "data.synthetic_ratio=0"),
                ("real + synthetic 0.5", "synthetic-0.5", "data.synthetic_ratio=0.5"),
                ("real + synthetic 1", "synthetic-1", "data.synthetic_ratio=1"),
                ("real + duplicated real 1", "duplicated-1", "data.duplicate_ratio=1"))


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    size: int = 128
    seed: int = 0
    workers: int | None = None
    overwrite: bool = False
    n: int | None = None  # phantom images (None: the real NLM sets' 662 + 138)
    gan_steps: int | None = None  # CycleGAN steps (None: the cyclegan_tiny config's)
    seeds: int = 3  # classifier training seeds
    clf_epochs: int | None = 20  # classifier epochs (None: the classifier_tb config's 30; 20 keeps the demo short)
    stylegan_steps: int | None = None  # StyleGAN2-ADA steps (None: STYLEGAN2_STEPS)
    aug_seeds: int = 1  # training seeds of each augmentation-stage classifier condition


@dataclass
class DemoState:
    cfg: DemoConfig
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def phantom(self) -> Path:
        return self.cfg.out / "phantom"

    @property
    def harmonized(self) -> Path:
        """Harmonized copies of the Montgomery-like tree, one folder per method."""
        return self.cfg.out / "harmonized"


def stage_phantom(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    res = generate(PhantomConfig(preset="nlm", out=st.phantom, size=st.cfg.size, seed=st.cfg.seed,
                                 n=st.cfg.n, workers=st.cfg.workers, overwrite=True), progress=progress)
    counts = "; ".join(f"{tree} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})"
                       for tree, c in sorted(res.counts.items()))
    return [f"phantom (nlm preset, {st.cfg.size} px): {counts} -> {st.phantom}"]


def stage_inspect(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    lines = []
    for name in ("ChinaSet_AllFiles", "MontgomerySet"):
        s = inspect_tree(st.phantom / name, progress=progress)
        st.results[f"inspect_{name}"] = s
        tb = s["labels"]["Tuberculosis"]
        lines.append(f"datasets inspect {name}: layout {s['layout']}, {s['images']} images, "
                     f"{s['patients']} patients, TB {tb['positive']} / normal {tb['negative']}, "
                     f"{len(s['problems'])} problems")
    return lines


def stage_contact_sheet(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    out = paired_sheet(choose_subjects(st.phantom, max_rows=4), st.cfg.out / "contact_sheet.png", tile=st.cfg.size)
    return [f"contact sheet (same subjects through both chains): {out}"]


def stage_domain_gap(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    pre = Preprocess(size=st.cfg.size)
    images = {}
    for name in ("ChinaSet_AllFiles", "MontgomerySet"):
        recs = load_tree(st.phantom / name).records
        images[name] = [apply(load_image(r.image), pre) for r in recs]
        progress(len(recs))
    acc, sd = domain_gap_accuracy(images["ChinaSet_AllFiles"], images["MontgomerySet"], seed=st.cfg.seed)
    st.results["domain_gap_accuracy"] = acc
    return [f"domain gap: logistic regression on 32-bin histograms tells the sites apart with "
            f"accuracy {acc:.3f} ± {sd:.3f} (5-fold CV; 0.5 = no gap)"]


def stage_harmonize(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """Every classical harmonizer, fitted on the Shenzhen-like training split, applied to the
    Montgomery-like tree (``cxr harmonize --method M``); the learned ones follow."""
    montgomery, shenzhen = st.phantom / "MontgomerySet", st.phantom / "ChinaSet_AllFiles"
    t0 = time.perf_counter()
    for folder, method, options in CLASSICAL:
        harmonize_tree(montgomery, st.harmonized / folder, shenzhen, method=method, seed=st.cfg.seed,
                       overwrite=True, progress=progress, options=options)
    return [f"classical harmonizers ({', '.join(f for f, _, _ in CLASSICAL)}; {time.perf_counter() - t0:.0f} s): "
            f"the Montgomery-like tree towards the Shenzhen-like training split -> {st.harmonized}"]


def stage_cyclegan(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """Train the tiny CycleGAN from the histogram-matched Montgomery-like tree A ↔ Shenzhen-like
    B (training splits only), translate the matched tree A → B, and score it and the matching
    against the phantom's paired truth (the same subjects rendered by the Shenzhen-like chain)."""
    shenzhen = st.phantom / "ChinaSet_AllFiles"
    matched = st.harmonized / "histogram"
    overrides = [f"data.a={matched}", f"data.b={shenzhen}", f"seed={st.cfg.seed}", "device=cpu",
                 *CYCLEGAN_OVERRIDES]
    if st.cfg.gan_steps is not None:
        overrides += [f"train.steps={st.cfg.gan_steps}", f"train.ckpt_every={st.cfg.gan_steps}",
                      f"train.image_every={st.cfg.gan_steps}"]
    cfg = load_config(CycleGANConfig, CYCLEGAN_CONFIG, overrides)
    run_dir = st.cfg.out / "runs" / "cyclegan"
    result = train(cfg, run_dir)
    progress(result.steps_done)
    translate_tree(matched, st.harmonized / "cyclegan", load_translator(run_dir, "a2b"), overwrite=True,
                   progress=progress)
    # Scored on the split the CycleGAN's training kept out (data.split_seed), whatever --seed is
    # (looked up on the module, so tests can watch which split is scored).
    scores = paired.phantom_report(st.phantom, st.harmonized / "cyclegan", seed=cfg.data.split_seed,
                                   histogram_field=CENTRAL_FIELD)
    st.results["paired_scores"] = scores
    atomic_write_text(st.cfg.out / "paired_scores.txt", "\n\n".join(
        (format_scores(scores), format_gains(scores), format_factors(scores))) + "\n")
    ssim = ", ".join(f"{name} {s['ssim']:.3f}" for name, s in scores.items())
    gain, lo, hi = (scores["cyclegan"][f"gain_vs_histogram{k}"] for k in ("", "_lo", "_hi"))
    return [f"CycleGAN ({cfg.model.generator}, {cfg.data.size} px, {result.steps_done} steps, "
            f"{result.seconds:.0f} s) on the histogram-matched Montgomery-like tree -> {run_dir}",
            f"Montgomery-like -> Shenzhen-like, SSIM to the paired truth on {scores['untranslated']['n']} "
            f"test subjects: {ssim}; CycleGAN minus histogram matching {gain:+.3f} (95 % CI {lo:+.3f} to "
            f"{hi:+.3f} over patients; table: paired_scores.txt)"]


def stage_fastcut(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """FastCUT, the second learned translator, trained like the CycleGAN (matched A → B,
    training splits only) and translating the matched tree."""
    matched, shenzhen = st.harmonized / "histogram", st.phantom / "ChinaSet_AllFiles"
    overrides = [f"seed={st.cfg.seed}", "device=cpu", *FASTCUT_OVERRIDES]
    if st.cfg.gan_steps is not None:
        overrides += [f"train.steps={st.cfg.gan_steps}", f"train.ckpt_every={st.cfg.gan_steps}",
                      f"train.image_every={st.cfg.gan_steps}"]
    run_dir = st.cfg.out / "runs" / "fastcut"
    result = train_cut(matched, shenzhen, run_dir, overrides, config=FASTCUT_CONFIG)
    progress(result.steps_done)
    translate_run(run_dir, matched, st.harmonized / "fastcut", method="fastcut", overwrite=True, progress=progress,
                  command="cxr harmonize --method fastcut")
    return [f"FastCUT (cut_tiny, {result.steps_done} steps, {result.seconds:.0f} s) on the histogram-matched "
            f"Montgomery-like tree -> {run_dir}"]


def stage_classifier(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """Train the small-CNN TB classifier on the Shenzhen-like tree with several seeds and test
    it in-domain and on the Montgomery-like test split as is, histogram-matched and translated
    after matching (:func:`eval.study.cross_domain_study`)."""
    tests = {"Montgomery-like, as is": st.phantom / "MontgomerySet",
             **{f"Montgomery-like, {HARMONIZED_NAMES.get(name, name)}": st.harmonized / name
                for name in (*(f for f, _, _ in CLASSICAL), *LEARNED)}}
    overrides = [f"data.size={min(st.cfg.size, 128)}", "device=cpu"]
    if st.cfg.clf_epochs is not None:
        overrides.append(f"train.epochs={st.cfg.clf_epochs}")
    study = cross_domain_study(st.phantom / "ChinaSet_AllFiles", tests, st.cfg.out / "runs", seeds=st.cfg.seeds,
                               seed=st.cfg.seed, overrides=overrides, on_seed=lambda _run: progress(1))
    st.results["cross_domain"] = study.results
    st.results["classifier_runs"] = study.runs
    st.results["classifier_split_seed"] = study.config.data.split_seed
    st.results["classifier_epochs"] = study.config.train.epochs
    table = format_table(study.results, reference=study.results[0].name)
    atomic_write_text(st.cfg.out / "cross_domain.txt", table + "\n")
    cfg = study.config
    lines = [f"TB classifier (small CNN, {cfg.data.size} px, {cfg.train.epochs} epochs, {st.cfg.seeds} seeds, "
             f"{study.seconds:.0f} s) trained on the Shenzhen-like training split; AUROC, mean over seeds, "
             f"95% CI over patients, change from in-domain (table: cross_domain.txt):"]
    return lines + ["  " + line for line in table.splitlines()]


def stage_augmentation(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """Train the tiny StyleGAN2-ADA on the Shenzhen-like training split, generate as many images
    at that split's prevalence, judge them (:func:`eval.generative.evaluate_gan`, the trained
    extractor, no CAS), then train the classifier with synthetic images mixed in and with the
    duplicated-real control, beside real images only trained the same way."""
    shenzhen, montgomery = st.phantom / "ChinaSet_AllFiles", st.phantom / "MontgomerySet"
    steps = st.cfg.stylegan_steps or STYLEGAN2_STEPS
    size = 64 if st.cfg.size >= 64 else 32  # a power of two, never above the phantom's size
    cfg = load_config(stylegan2.StyleGAN2Config, STYLEGAN2_CONFIG, [
        f"data.train={shenzhen}", f"data.size={size}", f"seed={st.cfg.seed}", "device=cpu", *STYLEGAN2_OVERRIDES,
        f"train.steps={steps}", f"train.ckpt_every={steps}", f"train.image_every={steps}"])
    run_dir = st.cfg.out / "runs" / "stylegan2"
    result = stylegan2.train(cfg, run_dir)
    progress(result.steps_done)

    gen = load_generator(run_dir)
    train_part = split_records(load_tree(shenzhen).records, cfg.data.split_fractions, seed=cfg.data.split_seed)["train"]
    n_tb = sum(1 for r in train_part if r.labels[0] > 0.5)
    mix = {gen.resolve_class("Tuberculosis")[0]: n_tb / len(train_part),
           gen.resolve_class("normal")[0]: 1 - n_tb / len(train_part)}
    synthetic = st.cfg.out / "synthetic"
    generate_tree(gen, synthetic, mix, len(train_part), "shenzhen", seed=st.cfg.seed, overwrite=True,
                  progress=progress)
    report = evaluate_gan(GanEvalOptions(real=shenzhen, fake=synthetic, out=st.cfg.out / "gan_eval",
                                         extractor="trained", size=size, seed=st.cfg.seed, device="cpu", cas=False,
                                         kid_subsets=20, kid_subset_size=100, ssim_images=DEMO_SSIM_IMAGES,
                                         overwrite=True))
    st.results["gan_eval"] = report
    overall, mem = report["overall"], report["memorization"]

    tests = {"Montgomery-like, as is": montgomery}
    overrides = [f"data.size={size}", "device=cpu", f"data.synthetic={synthetic}"]
    epochs = max(1, st.results["classifier_epochs"] // 2)
    overrides.append(f"train.epochs={epochs}")
    k = st.cfg.aug_seeds
    rows = []
    t0 = time.perf_counter()
    for name, folder, extra in AUGMENTATION:
        study = cross_domain_study(shenzhen, tests, st.cfg.out / "runs" / folder, seeds=k, seed=st.cfg.seed,
                                   overrides=[*overrides, extra], on_seed=lambda _run: progress(1))
        added = round(float(extra.split("=")[1]) * len(train_part))
        rows.append((name, len(train_part) + added, study.results))
    seconds = time.perf_counter() - t0
    head = f"  {'training set':<26} {'images':>6}  {'in-domain AUROC':>24}  {'Montgomery-like AUROC':>24}"
    table = [head] + [f"  {name:<26} {n:>6}  " + "  ".join(
        f"{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]".rjust(24) for r in res) for name, n, res in rows]
    atomic_write_text(st.cfg.out / "augmentation.txt", "\n".join(line[2:] for line in table) + "\n")
    return [f"StyleGAN2-ADA (tiny, {size} px, {result.steps_done} steps, ADA p {result.p:.2f}, {result.seconds:.0f} s) "
            f"on the Shenzhen-like training split -> {run_dir}; {len(train_part)} synthetic images at its TB "
            f"prevalence {n_tb / len(train_part):.2f} -> {synthetic}",
            f"synthetic set (extractor: the small classifier trained on the real split): relative FD "
            f"{overall['relative_fd']:.2f}, KID {overall['kid']:.4g}; memorization: {mem['features']['share']:.1%} "
            f"of synthetic images nearer a training image than the {mem['percentile']:g}st percentile of held-out "
            f"images (features), {mem['ssim']['share']:.1%} by SSIM{ssim_searched(mem, overall['n_fake'])} "
            f"(report: gan_eval/)",
            f"TB classifier with added images ({size} px, {epochs} epochs, {k} seed{'s' * (k > 1)} each, "
            f"{seconds:.0f} s): AUROC, 95% CI over patients (table: augmentation.txt):", *table]


def stage_audit(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """One row per harmonizer on the Montgomery-like test split: SSIM to the paired truth,
    cross-site AUROC of the TB classifiers (from the classifier stage), the histogram site
    detector's AUROC against the Shenzhen-like tree, and the first seed's label-flip rate at its
    validation threshold (:func:`eval.harmonization.quick_audit`)."""
    montgomery, shenzhen = st.phantom / "MontgomerySet", st.phantom / "ChinaSet_AllFiles"
    names = (*(f for f, _, _ in CLASSICAL), *LEARNED)
    split_seed = st.results["classifier_split_seed"]
    pairs = paired.phantom_pairs(st.phantom)
    test = paired.split_subset(pairs, "test", split_seed)
    ssim = paired.harmonization_scores(test, {n: paired.translated_tree_method(st.harmonized / n) for n in names})
    audit = quick_audit(montgomery, {n: st.harmonized / n for n in names}, shenzhen,
                        classifier=st.results["classifier_runs"][0], split="test", size=64, seed=split_seed)
    progress(len(names))
    auroc = {r.name: r for r in st.results["cross_domain"]}
    st.results["audit"] = audit
    head = (f"  {'method':<18} {'SSIM':>6}  {'cross-site AUROC':>22}  {'site detector AUROC':>22}  "
            f"{'flip rate':>9}")
    rows = [head]
    for name in ("none", *names):
        a = audit[name]
        r = auroc[f"Montgomery-like, {HARMONIZED_NAMES.get(name, name)}" if name != "none"
                  else "Montgomery-like, as is"]
        s = ssim["untranslated" if name == "none" else name]["ssim"]
        site = "{:.3f} [{:.3f}, {:.3f}]".format(a["domain_auroc"], a["domain_auroc_lo"], a["domain_auroc_hi"])
        rows.append(f"  {name:<18} {s:>6.3f}  {f'{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]':>22}  "
                    f"{site:>22}  {a['flip_rate']:>9.1%}")
    atomic_write_text(st.cfg.out / "harmonizers.txt", "\n".join(line[2:] for line in rows) + "\n")
    n = ssim["untranslated"]["n"]
    return [f"harmonizers on the {n} Montgomery-like test subjects: SSIM to the paired truth, the TB classifiers' "
            f"AUROC (mean over seeds, 95% CI over patients), the histogram site detector's AUROC against the "
            f"Shenzhen-like tree (0.5 = indistinguishable) and the first seed's label-flip rate at its validation "
            f"threshold (table: harmonizers.txt):", *rows]


def stage_localization(st: DemoState, progress: Callable[[int], None]) -> list[str]:
    """A small lung segmenter trained on the Shenzhen-like chain's truth, Dice on each chain's test
    subjects; and Grad-CAM of the first TB classifier on the Montgomery-like tree's lesions:
    the pointing game against the phantom's lesion masks, beside a fixed two-lung null map."""
    t0 = time.perf_counter()
    dice = chain_dice(st.phantom, st.cfg.out / "segmentation", train_chain="shenzhen", seed=st.cfg.seed,
                      **SEGMENTER_SETTINGS)
    t_seg = time.perf_counter() - t0
    progress(1)
    cam = phantom_pointing_game(st.results["classifier_runs"][0], st.phantom, st.cfg.out / "explain")
    progress(1)
    st.results["localization"] = {"dice": dice, "pointing": cam}
    per_chain = ", ".join(f"{c}-like {d:.3f}" for c, d in dice.items())
    return [f"lung segmentation (small U-Net trained on the Shenzhen-like chain, {t_seg:.0f} s): Dice on the test "
            f"subjects {per_chain} (-> segmentation/)",
            f"Grad-CAM of the TB classifier on {cam['n']} Montgomery-like images with lesions: pointing game "
            f"{cam['pointing']:.1%} inside the true lesion masks, null two-lung map {cam['null_pointing']:.1%} "
            f"(overlays: explain/)"]


STAGES: tuple[tuple[str, Callable[[DemoState, Callable[[int], None]], list[str]]], ...] = (
    ("phantom", stage_phantom),
    ("inspect", stage_inspect),
    ("contact sheet", stage_contact_sheet),
    ("domain gap", stage_domain_gap),
    ("harmonize", stage_harmonize),
    ("cyclegan", stage_cyclegan),
    ("fastcut", stage_fastcut),
    ("classifier", stage_classifier),
    ("harmonizer audit", stage_audit),
    ("augmentation", stage_augmentation),
    ("localization", stage_localization),
)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CxrError(f"{out}: output folder is not empty (use --overwrite to replace the demo's outputs)")


def run_demo(cfg: DemoConfig, on_stage: Callable[[str], Callable[[int], None]] | None = None,
             echo: Callable[[str], None] = print) -> list[str]:
    """Run every stage; return the summary lines (each stage's lines plus its time)."""
    if cfg.size < 32:
        raise CxrError(f"--size must be at least 32, got {cfg.size}")
    if cfg.seeds < 1 or (cfg.clf_epochs is not None and cfg.clf_epochs < 1) or \
            (cfg.gan_steps is not None and cfg.gan_steps < 1):
        raise CxrError(f"--seeds, --clf-epochs and --gan-steps must be at least 1, got {cfg.seeds}, "
                       f"{cfg.clf_epochs} and {cfg.gan_steps}")
    check_out(cfg.out, cfg.overwrite)
    cfg.out.mkdir(parents=True, exist_ok=True)
    st = DemoState(cfg)
    summary: list[str] = []
    t_all = time.perf_counter()
    for i, (name, fn) in enumerate(STAGES, 1):
        echo(f"[{i}/{len(STAGES)}] {name} ...")
        t0 = time.perf_counter()
        progress = on_stage(name) if on_stage else (lambda n: None)
        lines = fn(st, progress)
        dt = time.perf_counter() - t0
        summary.extend(lines)
        echo(f"[{i}/{len(STAGES)}] {name} done in {dt:.1f} s")
    summary.append(f"total time {time.perf_counter() - t_all:.0f} s; everything is under {cfg.out}")
    atomic_write_text(cfg.out / "summary.txt", "\n".join(summary) + "\n")
    return summary
