"""Paired-truth check of CycleGAN harmonization on the phantom: Montgomery-like → Shenzhen-like.

1. writes an NLM phantom (``cxr phantom --preset nlm``) unless ``--phantom`` already holds one;
2. trains a CycleGAN (``cxr train-gan cyclegan``; A = MontgomerySet, B = ChinaSet_AllFiles,
   training splits only) unless ``--run`` names a finished run;
3. translates the whole Montgomery-like tree a → b (``cxr translate``);
4. scores, against the phantom's true Shenzhen-like render of each same subject (SSIM, PSNR):
   the untranslated images, histogram matching to the Shenzhen-like training images, and the
   CycleGAN translations -- on the Montgomery-like *validation* and *test* splits (never seen in
   training; choose options on validation, report test once) and on all its images.

Steps 1-3 call the library function behind each ``cxr`` command named, with the same options.

    python experiments/paired_proof.py                       # the documented run (64², config below)
    python experiments/paired_proof.py --phantom data/phantom64 --run runs/paired-64-1200   # score a run
    python experiments/paired_proof.py ... -- model.ngf=64 optim.lr=0.0002   # extra overrides
    python -m experiments.paired_proof ...                    # the same, as a module

The training settings are the config's (the shipped ``cyclegan_paired64`` by default); ``--size``
and ``--steps`` override its ``data.size`` / ``train.steps`` and the phantom is written at the
training size, so no resampling sits between the truth and the translation.

Results are printed as a table and written to ``<run>/paired/results.json``.

``--ceiling N`` instead measures, on the first N Montgomery-like subjects, what *any* translator
can reach: the truth is one noisy render, so even a perfect translator (which cannot know that
render's noise) scores below 1. It re-renders each subject's Shenzhen-like truth with the
noise turned off (the best possible prediction) and with another noise draw, and scores both
against the stored truth, beside the untranslated image.

    python experiments/paired_proof.py --phantom data/phantom64 --ceiling 40

``--supervised`` instead trains the config's A → B generator (same network, optimizer, batch
and steps) *with* the paired truth -- an L1 loss between its output and the true Shenzhen-like
render of each training-split subject -- and scores it on the test split. No unpaired method
can beat that at equal budget, so it says how much of the gap to the goal is the training
budget and how much the unpaired objective.

    python experiments/paired_proof.py --phantom data/phantom64 --supervised --steps 5000

``--bands`` adds a diagnostic that uses the truth (never a method): SSIM after the truth's
coarse part (above a Gaussian σ of 1, 2, 4, 8 px) or its fine part replaces the translation's,
which says at which scale the remaining error lives (``eval.paired.band_scores``).

    python experiments/paired_proof.py --phantom data/phantom128 --run runs/p128-r128 --bands

``--curve`` with ``--run`` scores every checkpoint the run kept (``train.keep_last``) instead.

A config with ``data.prematch: histogram`` (``cyclegan_paired128``) chains the classical method
and the learned one: the trainer first histogram-matches the Montgomery-like tree to the
Shenzhen-like training split (written to ``<run>/prematched/MontgomerySet``) and trains on that
tree, and the translation applies the same match, so the CycleGAN only has to learn what a
gray-level curve cannot (edge enhancement, range compression, scatter). ``cxr train-gan`` and
``cxr translate`` do the same outside this script. ``--prematch histogram`` and
``--prematch-field F`` are deprecated spellings of ``data.prematch=histogram`` and
``data.prematch_field=F``; a finished run (``--run``) is scored with its own config's match.

    python experiments/paired_proof.py --phantom data/phantom64 -- data.prematch=histogram
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
# Idle OpenMP threads sleep instead of spinning (as the `cxr` command sets it, and for the same
# reason: a shared CPU); it must be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr.configs import resolve_config  # noqa: E402
from cxr.data.image import load_image  # noqa: E402
from cxr.data.preprocess import resize_square  # noqa: E402
from cxr.engine.checkpoint import latest, list_checkpoints  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.engine.distributed import resolve_device  # noqa: E402
from cxr.engine.loop import Family, Run, run_training  # noqa: E402
from cxr.errors import CxrError, DataError  # noqa: E402
from cxr.phantom import chains as C  # noqa: E402
from cxr.phantom import generate as G  # noqa: E402
from cxr.phantom import writers as W  # noqa: E402
from eval.paired import (  # noqa: E402
    band_reports,
    best_field,
    examples_figure,
    field_sweep,
    format_bands,
    format_factors,
    format_gains,
    format_scores,
    harmonization_scores,
    phantom_pairs,
    phantom_reports,
    score_pairs,
    split_subset,
    target_folder,
)
from gan.cyclegan import trainer as cyclegan_trainer  # noqa: E402
from gan.cyclegan.config import CycleGANConfig  # noqa: E402
from gan.cyclegan.data import to_model_range  # noqa: E402
from gan.cyclegan.translate import load_translator, translate_images, translate_tree  # noqa: E402
from gan.networks import model_args  # noqa: E402


def truth_ceiling(phantom: Path, n: int, seed: int = 0, source_tree: str = "montgomery",
                  target_site: str = "shenzhen") -> dict[str, dict[str, float]]:
    """SSIM/PSNR to the stored truth of: the untranslated image, a noise-free render of the truth
    (the best any translator can predict) and the truth under another noise draw.

    Re-renders the first ``n`` subjects of ``source_tree`` exactly as ``cxr phantom`` did (same
    plan, subjects and geometry; the phantom must have been written with ``seed`` and the
    built-in chains) and checks that the stored truth is reproduced before scoring.
    """
    pairs = phantom_pairs(phantom, source_tree, target_site)[:n]
    size = max(load_image(pairs[0].source).shape)
    chains = G.resolve_chains(())
    backend = G.default_backend()
    with open(Path(phantom) / "phantom_truth" / "manifest.csv", encoding="utf-8") as f:
        total = sum(1 for _ in f) - 1  # the plan depends on the image count (`cxr phantom --n`)
    plan = G.plan(G.PhantomConfig(preset="nlm", out=phantom, size=size, seed=seed, n=total), chains, backend)
    jobs = {j.subject.subject_id: j for j in plan}
    anatomy = backend.load()
    home, target = chains[source_tree], chains[target_site]
    # acquire_all draws each chain's noise from a stream named after the chain: renamed copies
    # of the target give the same exposure and processing with other noise, or none.
    variants = [target, replace(target, name=f"{target.name}-other-noise"),
                replace(target, name=f"{target.name}-noise-free", dose=1e12, electronic_noise=0.0,
                        structure_noise=0.0)]
    cols = {"untranslated": [], "noise_free_truth": [], "truth_other_noise": []}
    truths, lungs = [], []
    for pair in pairs:
        job = jobs.get(pair.subject_id)
        if job is None or job.home != home.name:
            raise DataError(pair.truth, f"subject {pair.subject_id} is not in a seed-{seed} nlm plan")
        rads = C.acquire_all(backend.render(job.subject, anatomy, size), variants, home, size,
                             seed=job.subject.seed)
        renders = [(W.to_pixels(r.image, r.bits, 8) / np.float32(255)).astype(np.float32) for r in rads.values()]
        truth = load_image(pair.truth)
        if not np.array_equal(renders[0], truth):
            raise DataError(pair.truth, "re-rendering does not reproduce the stored truth "
                                        "(another seed, size, chain file or phantom version?)")
        truths.append(truth)
        lungs.append(load_image(pair.lung) > 0 if pair.lung else None)
        cols["untranslated"].append(load_image(pair.source))
        cols["truth_other_noise"].append(renders[1])
        cols["noise_free_truth"].append(renders[2])
    masks = lungs if all(m is not None for m in lungs) else None
    return {k: score_pairs(zip(v, truths), masks) for k, v in cols.items()}


class SupervisedFamily(Family):
    """The config's A → B generator trained on (source, truth) pairs with L1, on the engine's loop.

    ``‖G(a) − b‖₁`` with the truth ``b`` of each source image ``a``: what the translator could
    reach were the pairs known, a bound for the unpaired CycleGAN with the same network, Adam
    settings, batch size and step count. Batches are drawn with replacement from the training
    pairs by a generator of its own (``seed``).
    """

    name = "supervised"

    def __init__(self, cfg: CycleGANConfig, x: torch.Tensor, y: torch.Tensor, seed: int):
        t = cfg.train
        self.cfg, self.x, self.y = cfg, x, y
        self.total_steps, self.log_every, self.ckpt_every = t.steps, t.log_every, 0
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.order = np.random.default_rng(seed)

    def setup(self, run: Run) -> dict:
        cfg = self.cfg
        self.g = cyclegan_trainer.build_networks(cfg)[0].g_ab.to(run.device)
        self.opt = torch.optim.Adam(self.g.parameters(), cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
        return {"pairs": len(self.x)}

    def modules(self) -> dict:
        return {"G_ab": self.g}

    def optimizers(self) -> dict:
        return {"G": self.opt}

    def model_args(self) -> dict:
        return {"G_ab": model_args(self.g)}

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.order.integers(len(self.x), size=self.batch_size))
        loss = (self.g(self.x[idx]) - self.y[idx]).abs().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss_l1": loss.detach()}


def supervised_bound(phantom: Path, cfg, seed: int = 0, run_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Test-split scores of :class:`SupervisedFamily` trained on the training split's pairs.

    Images enter as the CycleGAN trainer feeds them (padded to the training square, [-1, 1]) and
    leave through the same inverse as ``cxr translate``. The run folder (a temporary one unless
    ``run_dir`` is given) holds the usual log, stats and final checkpoint.
    """
    size, fit = cfg.data.size, cfg.data.fit
    pairs = phantom_pairs(phantom, "montgomery", "shenzhen")
    train = split_subset(pairs, "train", cfg.data.split_seed)

    def square(path: Path) -> torch.Tensor:
        return torch.from_numpy(resize_square(load_image(path), size, fit))[None]

    x = to_model_range(torch.stack([square(p.source) for p in train]))
    y = to_model_range(torch.stack([square(p.truth) for p in train]))
    cfg = replace(cfg, seed=seed, device="cpu")
    family = SupervisedFamily(cfg, x, y, seed)
    with tempfile.TemporaryDirectory(prefix="supervised-") as tmp:
        run_training(cfg, run_dir or Path(tmp), family)
    g = family.g.eval()
    test = split_subset(pairs, "test", cfg.data.split_seed)
    translate = lambda _pair, src: translate_images(g, [src], size, fit)[0]  # noqa: E731
    return harmonization_scores(test, {f"supervised ({cfg.train.steps} steps)": translate})


def checkpoint_curve(phantom: Path, run: Path, split_seed: int = 0) -> list[tuple[str, dict[str, float]]]:
    """Test-split SSIM/PSNR of every complete checkpoint a run kept (its ``a2b`` generator), in
    step order: how the translation approached (or left) the truth during training."""
    test = split_subset(phantom_pairs(phantom, "montgomery", "shenzhen"), "test", split_seed)
    curve = []
    for ckpt in list_checkpoints(run):
        t = load_translator(ckpt, "a2b")
        scores = harmonization_scores(test, {"cyclegan": lambda _pair, src, t=t: t.images([src])[0]})
        curve.append((ckpt.name, scores["cyclegan"]))
    return curve


def print_ceiling(phantom: Path, n: int, seed: int) -> int:
    scores = truth_ceiling(phantom, n, seed)
    print(f"What a translator can reach: {n} Montgomery-like subjects vs their stored Shenzhen-like truth")
    print(format_scores(scores))
    return 0


def print_field_sweep(phantom: Path, seed: int) -> int:
    """Histogram matching over central fields: chosen on validation, reported once on test."""
    sweep = field_sweep(phantom, seed=seed)
    print("field   " + "   ".join(f"{split} SSIM (n={next(iter(sc.values()))['n']})  PSNR" for split, sc in sweep.items()))
    for f in sweep["val"]:
        print(f"{f:5.2f}   " + "   ".join(f"{sc[f]['ssim']:14.4f} {sc[f]['psnr']:6.2f}" for sc in sweep.values()))
    chosen = best_field(sweep["val"])
    print(f"chosen on validation: field {chosen:g}; test SSIM {sweep['test'][chosen]['ssim']:.4f} "
          f"(whole image {sweep['test'][1.0]['ssim']:.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantom", type=Path, default=Path("data/phantom64"))
    p.add_argument("--size", type=int, default=None, help="phantom and training size (default: the config's)")
    p.add_argument("--n", type=int, default=None, help="phantom images (default: the preset's 800)")
    p.add_argument("--run", type=Path, default=None, help="a finished CycleGAN run (skips training)")
    p.add_argument("--run-dir", type=Path, default=None, help="where to train (default: runs/paired-SIZE-STEPS)")
    p.add_argument("--config", type=resolve_config, default="cyclegan_paired64",
                   help="YAML file or shipped config name (default cyclegan_paired64)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ceiling", type=int, default=0, metavar="N",
                   help="score noise-free and re-noised truth renders of N subjects, then exit")
    p.add_argument("--figure", type=Path, default=None, metavar="PNG",
                   help="also write source / translation / truth of the first 6 test subjects here")
    p.add_argument("--curve", action="store_true",
                   help="with --run: score every checkpoint the run kept on the test split, then exit")
    p.add_argument("--supervised", action="store_true",
                   help="train the generator with the paired truth (an upper bound at equal budget), score, exit")
    p.add_argument("--prematch", choices=["histogram"], default=None,
                   help="deprecated: the config key data.prematch=histogram (histogram-match the "
                        "Montgomery-like tree to the Shenzhen-like training split first)")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                   help="which generator weights to score (cxr translate --weights; auto: the average if kept)")
    p.add_argument("--prematch-field", type=float, default=None, metavar="F",
                   help="deprecated: the config key data.prematch_field=F (match the central F of each side; "
                        "the report then adds that method as a baseline)")
    p.add_argument("--field-sweep", action="store_true",
                   help="score histogram matching of each central field on the validation and test splits, "
                        "pick the field on validation, then exit")
    p.add_argument("--bands", action="store_true",
                   help="also say at which scale the translations' error lives: SSIM after the truth's coarse "
                        "or fine part replaces theirs (eval.paired.band_scores; a diagnostic with the truth)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides (after --)")
    args = p.parse_args(argv)
    aliases = ([f"data.prematch={args.prematch}"] if args.prematch else []) + \
        ([f"data.prematch_field={args.prematch_field}"] if args.prematch_field is not None else [])
    args.overrides = [*aliases, *args.overrides]
    if args.ceiling:
        return print_ceiling(args.phantom, args.ceiling, args.seed)
    if args.field_sweep:
        return print_field_sweep(args.phantom, args.seed)

    cfg = load_config(CycleGANConfig, args.config, list(args.overrides))
    size = args.size or cfg.data.size
    steps = args.steps or cfg.train.steps
    if args.curve:
        if args.run is None:
            raise SystemExit("paired_proof: --curve needs --run RUN")
        for name, sc in checkpoint_curve(args.phantom, args.run, cfg.data.split_seed):
            print(f"{name}  SSIM {sc['ssim']:.4f}  PSNR {sc['psnr']:.2f}  SSIM lung {sc['ssim_lung']:.4f}")
        return 0
    if args.supervised:
        cfg = load_config(CycleGANConfig, args.config, [*args.overrides, f"data.size={size}", f"train.steps={steps}"])
        t0 = time.perf_counter()
        scores = supervised_bound(args.phantom, cfg, args.seed)
        print(f"Supervised bound ({time.perf_counter() - t0:.0f} s): Montgomery-like → Shenzhen-like, "
              "test images, vs the true Shenzhen-like renders")
        print(format_scores(scores))
        return 0
    phantom = args.phantom
    if not (phantom / "phantom_truth" / "manifest.csv").exists():  # cxr phantom --preset nlm
        written = G.generate(G.check_config(G.PhantomConfig(preset="nlm", out=phantom, size=size, seed=args.seed,
                                                            n=args.n or None)))
        print(f"wrote {written.images} images to {written.out}")
    source, target = phantom / "MontgomerySet", target_folder(phantom, "shenzhen")

    run = args.run
    run_dir = run or args.run_dir or ROOT / "runs" / f"paired-{size}-{steps}"
    if run is None:  # cxr train-gan cyclegan, resumed when the folder holds a checkpoint
        train_cfg = load_config(CycleGANConfig, args.config, [
            f"data.a={source}", f"data.b={target}", f"data.size={size}", f"train.steps={steps}",
            f"seed={args.seed}", *args.overrides])
        cyclegan_trainer.check_config(train_cfg)
        t0 = time.perf_counter()
        if cyclegan_trainer.train(train_cfg, run_dir, resume=latest(run_dir) is not None).interrupted:
            return 1
        print(f"training took {time.perf_counter() - t0:.0f} s")
        run = run_dir
    # The run's own config says whether (and how) its domain A was matched; translation applies
    # the match recorded in the generator, so the original tree goes in.
    saved = run / "config.yaml"
    run_data = load_config(CycleGANConfig, saved).data if saved.exists() else cfg.data
    prematch, prematch_field = run_data.prematch, run_data.prematch_field
    old = Path(run_data.a)
    if prematch is None and old.parent.name == "prematched" and (old / "cxr_harmonization.json").exists():
        # a run of the old --prematch flag: trained on the matched tree as data.a; translate that tree
        source, prematch = old, "histogram"
        prematch_field = json.loads((old / "cxr_harmonization.json").read_text()).get("field", 1.0)
    out = run / ("paired" if args.weights == "auto" else f"paired-{args.weights}")
    translated = out / "MontgomerySet_a2b"
    translator = load_translator(run, "a2b", resolve_device("auto"), weights=args.weights)  # cxr translate
    translate_tree(source, translated, translator, batch_size=16, overwrite=True)

    results = {"phantom": str(phantom), "run": str(run), "checkpoint": str(latest(run)), "size": size,
               "prematch": prematch, "prematch_field": prematch_field, "weights": args.weights}
    # Scored on the Montgomery-like tree's split by data.split_seed, the split training kept out
    # (--seed moves the training seed, never the scored images nor the prematch reference, which is
    # fitted on the Shenzhen-like training split by data.split_seed).
    split_seed = cfg.data.split_seed
    reports = phantom_reports(phantom, translated, "montgomery", "shenzhen", ("val", "test", "all"), split_seed,
                              histogram_field=prematch_field if prematch else None)
    for split, scores in reports.items():
        results[split] = scores
        print(f"\nMontgomery-like → Shenzhen-like, {split} images, vs the true Shenzhen-like renders")
        print(format_scores(scores))
        print(format_gains(scores))
        print(format_factors(scores))
    if args.bands:
        results["bands"] = band_reports(phantom, translated, "montgomery", "shenzhen", ("val", "test"), split_seed)
        for split, scores in results["bands"].items():
            print(f"\n{split} images\n{format_bands(scores)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.figure:
        test = split_subset(phantom_pairs(phantom, "montgomery", "shenzhen"), "test", split_seed)
        print(f"wrote {examples_figure(test[:6], translated, args.figure)}")
    print(f"\nwrote {out / 'results.json'}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with a bad phantom, run or config reported as one line (exit 2), not a traceback."""
    try:
        return main(argv)
    except CxrError as e:
        print(f"paired_proof: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
