"""The phantom harmonization table: every harmonizer audited on one Montgomery-like → Shenzhen-like
task, and the prevalence experiment.

    python -m experiments.harmonization_phantom --out runs/harm_phantom                 # the documented run
    python -m experiments.harmonization_phantom --out runs/hp --size 128 --seeds 3 --gan-steps 300
    python -m experiments.harmonization_phantom --out runs/hp --phantom data/phantom128 --no-prevalence
    python -m experiments.harmonization_phantom --out runs/hp --gan-seeds 1 --reuse   # keep trees already there

1. writes the nlm phantom at ``--size`` (``cxr phantom --preset nlm``) unless ``--phantom`` names one;
2. harmonizes the Montgomery-like tree with each classical method (``cxr harmonize --method``,
   fitted on the Shenzhen-like training split) and with each learned one (``--learned``): the
   CycleGAN of ``cxr demo`` (``cyclegan_tiny``, ``data.prematch=histogram``,
   ``loss.lambda_border=10``), CUT and FastCUT (``cut_tiny``, ``data.prematch=histogram``), each
   ``--gan-steps`` steps (default the configs' 300) on the training splits, applied with
   ``cxr translate``; each learned method ``--gan-seeds`` times (seeds ``--seed`` onwards), every
   seed's translated tree scored on its own (``--reuse`` keeps a translated tree already in
   ``--out`` instead of training it again);
3. trains the small-CNN TB classifier on the Shenzhen-like tree with ``--seeds`` seeds
   (:func:`eval.study.cross_domain_study`) and scores it on the Montgomery-like test split as
   is and after every method: cross-site AUROC with its patient-bootstrap CI, the share of the
   in-domain drop recovered (:func:`cxr.metrics.harmonization.drop_recovered`) and the gain over
   "as is" with its paired interval (:func:`cxr.metrics.cross_domain.change_interval`); a learned
   method's row is the mean over its translator seeds, its interval from the replicates averaged
   over those seeds (every tree is bootstrapped on the same patients, so it stays paired);
4. audits every method (:mod:`eval.harmonization`): domain AUROC of the histogram, texture and
   CNN detectors (all Montgomery-like images, harmonized, against the Shenzhen-like *test*
   split, which no method fitted on), and on the Montgomery-like *test* split (images no
   translator saw): the seed-0 classifier's flip rate at its validation threshold, erase and
   hallucination rates against the phantom's lesion masks, SSIM/PSNR to the true Shenzhen-like
   renders (LPIPS when its weights are local); a learned method's row is the mean over its
   translator seeds with their sd (each seed's row, with its intervals, in a second table);
5. the prevalence experiment (unless ``--no-prevalence``): the CycleGAN trained again with the
   Shenzhen-like tree filtered to 0 % and to 100 % TB (natural: step 2's first seed), one seed
   each, flip and erase rates on the same test images.

Writes ``results.json`` and ``table.md`` into ``--out`` and prints the tables. Goals (for each
learned method, on its seed means): domain AUROC <= 0.65, flip <= 5 %, erase <= 5 %, half the cross-site AUROC
drop recovered with the gain's interval above 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cxr.configs import shipped_config  # noqa: E402
from cxr.data.io import atomic_write_text  # noqa: E402
from cxr.data.layouts import load_tree  # noqa: E402
from cxr.data.splits import split_records  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.metrics import harmonization as hm  # noqa: E402
from cxr.metrics.cross_domain import ConditionResult, change_interval, format_table  # noqa: E402
from cxr.metrics.intervals import percentile_interval  # noqa: E402
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402
from eval import harmonization as audit  # noqa: E402
from eval.study import cross_domain_study  # noqa: E402
from gan.cut.trainer import train_cut  # noqa: E402
from gan.cyclegan.config import CycleGANConfig  # noqa: E402
from gan.cyclegan.trainer import train as train_cyclegan  # noqa: E402
from gan.cyclegan.translate import translate_run  # noqa: E402
from harmonize.trees import harmonize_tree  # noqa: E402

CLASSICAL = ("histogram", "lung-histogram", "percentile", "zscore", "clahe", "fda")
CYCLEGAN_CONFIG = shipped_config("cyclegan_tiny")
CYCLEGAN_OVERRIDES = ("data.prematch=histogram", "loss.lambda_border=10")  # cxr demo's recipe
CUT_CONFIG = "cut_tiny"  # the CycleGAN demo's network and optimizer, PatchNCE instead of the cycle
CUT_OVERRIDES = ("data.prematch=histogram",)  # the same chain: the gray-level curve first
LEARNED = ("cyclegan", "cut", "fastcut")
SOURCE_IMAGES = "CXR_png"  # the Montgomery layout's image folder: a finished translated tree has it
SOURCE, TARGET = "MontgomerySet", "ChinaSet_AllFiles"
GOALS = {"domain_auroc": 0.65, "flip_rate": 0.05, "erase_rate": 0.05, "recovered": 0.5}
# the audit figures averaged over translator seeds: name → where it sits in an audit row
MEASURES: dict[str, Callable[[dict], Any]] = {
    "ssim": lambda r: r["paired"].get("ssim"),
    "psnr": lambda r: r["paired"].get("psnr"),
    "domain_histogram": lambda r: r["domain"]["histogram"]["auroc"],
    "domain_texture": lambda r: r["domain"].get("texture", {}).get("auroc"),
    "domain_cnn": lambda r: r["domain"].get("cnn", {}).get("auroc"),
    "flip_rate": lambda r: r["flips"]["flip_rate"],
    "erase_rate": lambda r: r["erasure_hallucination"]["erase_rate"],
    "hallucinations_per_image": lambda r: r["erasure_hallucination"]["hallucinations_per_image"],
}


def filtered_tree(src: Path, out: Path, tb_share: float, seed: int = 0) -> Path:
    """A Shenzhen-layout copy of ``src`` holding only normals (``tb_share`` 0) or only TB cases
    (1): image and reading of each kept case, hard-linked where the file system allows."""
    if out.exists():
        shutil.rmtree(out)
    keep = [r for r in load_tree(src).records if (r.labels[0] > 0.5) == (tb_share >= 0.5)]
    for r in keep:
        img = Path(r.image)
        for f, sub in ((img, "CXR_png"), (src / "ClinicalReadings" / f"{img.stem}.txt", "ClinicalReadings")):
            dst = out / sub / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy2(f, dst)
    return out


def train_translator(phantom: Path, b_tree: Path, run_dir: Path, out_tree: Path, seed: int, steps: int | None,
                     method: str = "cyclegan", reuse: bool = False) -> float:
    """Train ``method`` (A = the Montgomery-like tree, B = ``b_tree``) and translate A → B; seconds
    (NaN when ``reuse`` kept a translated tree already at ``out_tree``)."""
    if reuse and (out_tree / SOURCE_IMAGES).is_dir():
        return math.nan
    t0 = time.perf_counter()
    overrides = [f"seed={seed}", "device=cpu"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.ckpt_every={steps}", f"train.image_every={steps}"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if method == "cyclegan":
        cfg = load_config(CycleGANConfig, CYCLEGAN_CONFIG, [f"data.a={phantom / SOURCE}", f"data.b={b_tree}",
                                                            *overrides, *CYCLEGAN_OVERRIDES])
        train_cyclegan(cfg, run_dir)
    else:
        train_cut(phantom / SOURCE, b_tree, run_dir, [*overrides, *CUT_OVERRIDES, f"model.mode={method}"],
                  config=CUT_CONFIG)
    translate_run(run_dir, phantom / SOURCE, out_tree, method=method, overwrite=True)
    return time.perf_counter() - t0


def audit_rows(phantom: Path, trees: dict[str, Path], classifier: Path, seed: int, size: int, n_boot: int,
               echo: Callable[[str], None], detectors: tuple[str, ...] = audit.DETECTORS) -> dict[str, dict]:
    """Per method: domain AUROC of each detector (whole source tree vs the target's test split),
    flip rate, erase and hallucination rates and paired SSIM/PSNR (the source's test split)."""
    src = phantom / SOURCE
    target_records = load_tree(phantom / TARGET).records
    ref_records = split_records(target_records, seed=seed)["test"]
    ref = audit.square_images(ref_records, size)
    ref_patients = [r.patient_id for r in ref_records]
    thr, _ = audit.classifier_threshold(classifier)
    rows: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="cxr-harm-audit-"))
    first_test = audit.read_pairs(src, src, phantom / TARGET, "test", seed)
    truth, _target = audit.read_truth(phantom, first_test.source, ref_records)
    p_none = audit.classifier_probabilities(classifier, src, first_test.keys, work)
    for name, tree in trees.items():
        echo(f"audit: {name}")
        whole = audit.read_pairs(src, tree, phantom / TARGET, "all", seed)
        test = audit.read_pairs(src, tree, phantom / TARGET, "test", seed)
        det = audit.indistinguishability({name: audit.square_images(whole.harmonized, size)}, whole.patients,
                                         ref, ref_patients, detectors, seed=seed, n_boot=n_boot)
        p = audit.classifier_probabilities(classifier, tree, test.keys, work)
        flips = hm.prediction_changes_ci(p_none, p, thr, test.patients, n_boot, seed)
        c, d, _ = audit.truth_sections(test, truth, size, n_boot, seed)
        rows[name] = {"domain": {k: v[name] for k, v in det.items()}, "flips": flips, "threshold": thr,
                      "erasure_hallucination": {k: v for k, v in c.items() if k != "lesions"},
                      "paired": d.get("harmonized", {}), "paired_measures": d.get("measures", []),
                      "n_test": len(test.keys), "n_all": len(whole.keys), "n_reference": len(ref_records)}
    shutil.rmtree(work, ignore_errors=True)
    return rows


def mean_sd(values: list[Any]) -> tuple[float, float]:
    """Mean and sd (ddof 1; NaN for one value) of the finite ``values``."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def seed_summary(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each audit measure's mean and sd over one learned method's translator seeds."""
    return {k: mean_sd([get(r) for r in rows]) for k, get in MEASURES.items()}


def study_row(in_domain: ConditionResult, as_is: ConditionResult, results: list[ConditionResult]) -> dict[str, Any]:
    """Cross-site row of one method, averaged over its trees (one per translator seed): the mean
    AUROC, its sd over trees, and intervals from the per-replicate means (paired with "as is")."""
    auc, sd = mean_sd([r.auroc for r in results])
    reps = np.mean([r.replicates for r in results], axis=0) if all(
        r.replicates.size == as_is.replicates.size for r in results) else np.zeros(0)
    lo, hi = percentile_interval(reps) if reps.size else (math.nan, math.nan)
    glo, ghi = percentile_interval(reps - as_is.replicates) if reps.size and as_is.replicates.size else (
        math.nan, math.nan)
    return {"auroc": auc, "auroc_sd": sd, "ci_low": lo, "ci_high": hi, "per_tree": [r.auroc for r in results],
            "per_seed": [list(r.per_seed) for r in results],
            "recovered": hm.drop_recovered(in_domain.auroc, as_is.auroc, auc), "gain": auc - as_is.auroc,
            "gain_lo": glo, "gain_hi": ghi}


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(v: Any, lo: Any, hi: Any, fmt: str = ".3f") -> str:
    return f"{_f(v, fmt)} [{_f(lo, fmt)}, {_f(hi, fmt)}]"


def _msd(v: tuple[float, float], fmt: str = ".3f") -> str:
    return f"{_f(v[0], fmt)} ± {_f(v[1], fmt)}"


def summary_table(rows: dict[str, dict], summaries: dict[str, dict], study: dict[str, Any],
                  seconds: dict[str, float], gan_seeds: int) -> str:
    """One row per method: a classical one's figures with their intervals, a learned one's mean ±
    sd over its ``gan_seeds`` translator seeds (cross-site AUROC and gain with pooled intervals)."""
    head = ("| method | SSIM | PSNR dB | domain AUROC hist | texture | CNN | TB flip rate | erase rate | "
            "hallucinations / image | cross-site TB AUROC | drop recovered | gain over as is | time s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    classical = main_table(rows, study, seconds).splitlines()[2:]
    for line in classical:  # drop the LPIPS column: not run on this machine either way
        cells = line.split(" | ")
        lines.append(" | ".join(cells[:3] + cells[4:]))
    for name, m in summaries.items():
        s = study["rows"][name]
        lines.append("| " + " | ".join([
            f"{name} ({gan_seeds} seeds)", _msd(m["ssim"]), _msd(m["psnr"], ".2f"), _msd(m["domain_histogram"]),
            _msd(m["domain_texture"]), _msd(m["domain_cnn"]), _msd(m["flip_rate"]), _msd(m["erase_rate"]),
            _msd(m["hallucinations_per_image"]),
            f"{_msd((s['auroc'], s['auroc_sd']))} [{_f(s['ci_low'])}, {_f(s['ci_high'])}]",
            _f(s["recovered"], ".2f"), _ci(s["gain"], s["gain_lo"], s["gain_hi"], "+.3f"),
            _f(mean_sd([seconds.get(f"{name}-s{k}") for k in range(gan_seeds)])[0], ".0f")]) + " |")
    return "\n".join(lines)


def main_table(rows: dict[str, dict], study: dict[str, Any], seconds: dict[str, float]) -> str:
    head = ("| method | SSIM | PSNR dB | LPIPS | domain AUROC hist | texture | CNN | TB flip rate | erase rate | "
            "hallucinations / image | cross-site TB AUROC | drop recovered | gain over as is | time s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        dom, fl, c, pd = r["domain"], r["flips"], r["erasure_hallucination"], r["paired"]
        s = study["rows"].get(name, {})
        lines.append("| " + " | ".join([
            name, _ci(pd.get("ssim"), pd.get("ssim_lo"), pd.get("ssim_hi")), _f(pd.get("psnr"), ".2f"),
            _f(pd.get("lpips")) if "lpips" in pd else "not run",
            _ci(dom["histogram"]["auroc"], dom["histogram"]["lo"], dom["histogram"]["hi"]),
            _f(dom.get("texture", {}).get("auroc")), _f(dom.get("cnn", {}).get("auroc")),
            _ci(fl["flip_rate"], fl["flip_rate_lo"], fl["flip_rate_hi"]),
            _ci(c["erase_rate"], c["erase_rate_lo"], c["erase_rate_hi"]),
            _ci(c["hallucinations_per_image"], c["hallucinations_per_image_lo"], c["hallucinations_per_image_hi"]),
            _ci(s.get("auroc"), s.get("ci_low"), s.get("ci_high")), _f(s.get("recovered"), ".2f"),
            _ci(s.get("gain"), s.get("gain_lo"), s.get("gain_hi"), "+.3f"), _f(seconds.get(name), ".0f")]) + " |")
    return "\n".join(lines)


def prevalence_table(rows: dict[str, dict]) -> str:
    lines = ["| target TB share | domain AUROC hist | TB flip rate | TB+ → TB− | TB− → TB+ | erase rate | "
             "contrast kept | hallucinations / image |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        fl, c = r["flips"], r["erasure_hallucination"]
        lines.append("| " + " | ".join([
            name, _f(r["domain"]["histogram"]["auroc"]), _ci(fl["flip_rate"], fl["flip_rate_lo"], fl["flip_rate_hi"]),
            _f(fl["flip_pos_to_neg"]), _f(fl["flip_neg_to_pos"]),
            _ci(c["erase_rate"], c["erase_rate_lo"], c["erase_rate_hi"]),
            _ci(c["contrast_kept"], c["contrast_kept_lo"], c["contrast_kept_hi"]),
            _f(c["hallucinations_per_image"])]) + " |")
    return "\n".join(lines)


def goals(summaries: dict[str, dict], study: dict[str, Any]) -> list[str]:
    """One line per goal and learned method, on the means over its translator seeds."""
    if not summaries:
        return ["no learned method ran"]
    lines = []
    for name, m in summaries.items():
        s = study["rows"][name]
        dom = max(m[k][0] for k in ("domain_histogram", "domain_texture", "domain_cnn") if math.isfinite(m[k][0]))
        checks = [("domain AUROC (worst detector) <= 0.65", dom, dom <= GOALS["domain_auroc"]),
                  ("flip rate <= 5 %", m["flip_rate"][0], m["flip_rate"][0] <= GOALS["flip_rate"]),
                  ("erase rate <= 5 %", m["erase_rate"][0], m["erase_rate"][0] <= GOALS["erase_rate"]),
                  ("half the cross-site drop recovered, gain interval above 0", s["recovered"],
                   s["recovered"] >= GOALS["recovered"] and s["gain_lo"] > 0)]
        lines += [f"{name}: {'met ' if ok else 'MISS'} {what}: {_f(v)}" for what, v, ok in checks]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (phantom, trees, runs, results)")
    ap.add_argument("--size", type=int, default=128, help="phantom image size (default 128)")
    ap.add_argument("--seeds", type=int, default=3, help="TB classifier training seeds (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="phantom, split and first training seed (default 0)")
    ap.add_argument("--gan-steps", type=int, default=None, help="translator steps (default: the config's 300)")
    ap.add_argument("--gan-seeds", type=int, default=3, help="training seeds per learned method (default 3)")
    ap.add_argument("--reuse", action="store_true", help="keep translated trees already in --out (same arguments)")
    ap.add_argument("--clf-epochs", type=int, default=20, help="classifier epochs (default 20, as cxr demo)")
    ap.add_argument("--phantom", type=Path, default=None, help="use this phantom folder instead of writing one")
    ap.add_argument("--learned", default=",".join(LEARNED), help="learned methods (default cyclegan,cut,fastcut)")
    ap.add_argument("--no-prevalence", dest="prevalence", action="store_false", help="skip the prevalence runs")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    args = ap.parse_args(argv)
    if args.gan_seeds < 1:
        ap.error(f"--gan-seeds must be at least 1, got {args.gan_seeds}")
    torch.set_num_threads(1)  # on 2 shared cores one thread is many times faster than two (contention)
    t_start = time.perf_counter()

    def echo(m: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {m}", file=sys.stderr, flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    phantom = args.phantom or out / "phantom"
    if args.phantom is None:
        echo(f"phantom (nlm, {args.size} px)")
        generate(PhantomConfig(preset="nlm", out=phantom, size=args.size, seed=args.seed, overwrite=True))
    src, target = phantom / SOURCE, phantom / TARGET
    trees: dict[str, Path] = {"none": src}
    seconds: dict[str, float] = {"none": 0.0}
    for method in CLASSICAL:
        echo(f"harmonize --method {method}")
        t0 = time.perf_counter()
        harmonize_tree(src, out / "harmonized" / method, target, method=method, seed=args.seed, overwrite=True)
        trees[method], seconds[method] = out / "harmonized" / method, time.perf_counter() - t0
    learned = [m for m in args.learned.split(",") if m]
    for method in learned:
        if method not in LEARNED:
            ap.error(f"--learned {method}: choose from {', '.join(LEARNED)}")
        for seed in range(args.seed, args.seed + args.gan_seeds):
            key = f"{method}-s{seed - args.seed}"
            echo(f"{method} seed {seed} (tiny config, histogram prematch)")
            seconds[key] = train_translator(phantom, target, out / "runs" / key, out / "harmonized" / key,
                                            seed, args.gan_steps, method, args.reuse)
            trees[key] = out / "harmonized" / key

    echo(f"TB classifier on {TARGET}, {args.seeds} seeds, scored on every tree")
    names = {"none": "Montgomery-like, as is", **{m: f"Montgomery-like, {m}" for m in trees if m != "none"}}
    study = cross_domain_study(target, {names[m]: t for m, t in trees.items()}, out / "runs" / "classifiers",
                               seeds=args.seeds, seed=args.seed, n_boot=args.n_boot,
                               overrides=[f"data.size={min(args.size, 128)}", "device=cpu",
                                          f"train.epochs={args.clf_epochs}"])
    res = {r.name: r for r in study.results}
    in_domain, as_is = study.results[0], res[names["none"]]
    study_rows: dict[str, dict] = {}
    for m, n in names.items():
        r = res[n]
        lo, hi = change_interval(as_is, r) if m != "none" else (math.nan, math.nan)
        study_rows[m] = {"auroc": r.auroc, "ci_low": r.ci_low, "ci_high": r.ci_high, "per_seed": list(r.per_seed),
                         "recovered": hm.drop_recovered(in_domain.auroc, as_is.auroc, r.auroc) if m != "none" else None,
                         "gain": r.auroc - as_is.auroc if m != "none" else None, "gain_lo": lo, "gain_hi": hi}
    for method in learned:
        study_rows[method] = study_row(in_domain, as_is, [res[names[f"{method}-s{k}"]] for k in range(args.gan_seeds)])
    study_info = {"in_domain": {"auroc": in_domain.auroc, "ci_low": in_domain.ci_low, "ci_high": in_domain.ci_high},
                  "rows": study_rows, "seconds": study.seconds, "seeds": args.seeds,
                  "table": format_table(study.results, reference=in_domain.name)}
    classifier = study.runs[0]

    echo("auditing every method")
    rows = audit_rows(phantom, trees, classifier, args.seed, 64, args.n_boot, echo)
    summaries = {m: seed_summary([rows[f"{m}-s{k}"] for k in range(args.gan_seeds)]) for m in learned}

    prevalence: dict[str, dict] = {}
    if args.prevalence and "cyclegan" in learned:
        prev_trees = {"natural": trees["cyclegan-s0"]}
        for share, label in ((0.0, "0 %"), (1.0, "100 %")):
            echo(f"CycleGAN with the target filtered to {label} TB")
            b = filtered_tree(target, out / "targets" / f"tb{int(share * 100)}" / TARGET, share)
            name = f"cyclegan-tb{int(share * 100)}"
            seconds[name] = train_translator(phantom, b, out / "runs" / name, out / "harmonized" / name, args.seed,
                                             args.gan_steps, reuse=args.reuse)
            prev_trees[label] = out / "harmonized" / name
        records = load_tree(target).records
        natural = f"natural ({sum(1 for r in records if r.labels[0] > 0.5) / len(records):.0%})"
        filtered = audit_rows(phantom, {k: v for k, v in prev_trees.items() if k != "natural"}, classifier,
                              args.seed, 64, args.n_boot, echo, ("histogram",))
        prevalence = {"0 %": filtered["0 %"], natural: rows["cyclegan-s0"], "100 %": filtered["100 %"]}

    lines = [f"in-domain TB AUROC {_ci(in_domain.auroc, in_domain.ci_low, in_domain.ci_high)}; "
             f"as is {_ci(as_is.auroc, as_is.ci_low, as_is.ci_high)}", "",
             summary_table({m: r for m, r in rows.items() if m in ("none", *CLASSICAL)}, summaries, study_info,
                           seconds, args.gan_seeds), "", *goals(summaries, study_info), "",
             "Every tree (a learned method's translator seeds one by one)", "", main_table(rows, study_info, seconds)]
    if prevalence:
        lines += ["", "Prevalence (CycleGAN target tree filtered by TB share)", "", prevalence_table(prevalence)]
    lines += ["", f"total {time.perf_counter() - t_start:.0f} s"]
    report = audit.jsonable({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "study": study_info,
                           "seconds": seconds, "prevalence": prevalence, "learned": learned, "summaries": summaries,
                           "total_seconds": time.perf_counter() - t_start})
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(study_info["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
