"""Paired-truth check of CycleGAN harmonization on the phantom: Montgomery-like → Shenzhen-like.

1. writes an NLM phantom (``cxr phantom --preset nlm``) unless ``--phantom`` already holds one;
2. trains a CycleGAN (``cxr train-gan cyclegan``; A = MontgomerySet, B = ChinaSet_AllFiles,
   training splits only) unless ``--run`` names a finished run;
3. translates the whole Montgomery-like tree a → b (``cxr translate``);
4. scores, against the phantom's true Shenzhen-like render of each same subject (SSIM, PSNR):
   the untranslated images, histogram matching to the Shenzhen-like training images, and the
   CycleGAN translations -- on the Montgomery-like *test* split (never seen in training) and on
   all its images.

    python benchmarks/cyclegan_paired.py --phantom data/phantom_paired --size 128 --steps 3000
    python benchmarks/cyclegan_paired.py --phantom data/phantom_paired --run runs/00004-cyclegan
    python benchmarks/cyclegan_paired.py ... -- model.ngf=32 optim.lr=0.0005   # extra overrides

Results are printed as a table and written to ``<run>/paired/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The documented CPU-sized run (see README): a small ResNet-6 at the phantom's native size.
CPU_RUN = ["model.generator=resnet6", "model.ngf=16", "model.ndf=16", "train.batch_size=1",
           "train.log_every=50", "train.image_every=500", "train.ckpt_every=500", "optim.lr=0.0005"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantom", type=Path, default=Path("data/phantom_paired"))
    p.add_argument("--size", type=int, default=128, help="phantom image size and training size")
    p.add_argument("--n", type=int, default=None, help="phantom images (default: the preset's 800)")
    p.add_argument("--run", type=Path, default=None, help="a finished CycleGAN run (skips training)")
    p.add_argument("--run-dir", type=Path, default=None, help="where to train (default: runs/NNNNN-cyclegan)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cyclegan_nlm.yaml")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides (after --)")
    args = p.parse_args(argv)

    from cxr.cli.main import main as cxr
    from cxr.engine.checkpoint import latest
    from eval.paired import format_scores, phantom_report, target_folder

    phantom = args.phantom
    if not (phantom / "phantom_truth" / "manifest.csv").exists():
        cmd = ["phantom", "--preset", "nlm", "--out", str(phantom), "--size", str(args.size), "--seed", str(args.seed)]
        if args.n:
            cmd += ["--n", str(args.n)]
        if cxr(cmd) != 0:
            return 1
    source, target = phantom / "MontgomerySet", target_folder(phantom, "shenzhen")

    run = args.run
    if run is None:
        run_dir = args.run_dir or ROOT / "runs" / f"paired-{args.size}-{args.steps}"
        cmd = ["train-gan", "cyclegan", "--config", str(args.config), "--run-dir", str(run_dir),
               f"data.a={source}", f"data.b={target}", f"data.size={args.size}", f"train.steps={args.steps}",
               f"seed={args.seed}", *CPU_RUN, *args.overrides]
        if latest(run_dir) is not None:
            cmd.insert(cmd.index("--run-dir"), "--resume")
        t0 = time.perf_counter()
        if cxr(cmd) != 0:
            return 1
        print(f"training took {time.perf_counter() - t0:.0f} s")
        run = run_dir
    out = run / "paired"
    translated = out / "MontgomerySet_a2b"
    if cxr(["translate", "--checkpoint", str(run), "--direction", "a2b", "--in", str(source),
            "--out", str(translated), "--overwrite"]) != 0:
        return 1

    results = {"phantom": str(phantom), "run": str(run), "checkpoint": str(latest(run)), "size": args.size}
    for split in ("test", "all"):
        scores = phantom_report(phantom, translated, "montgomery", "shenzhen", split=split)
        results[split] = scores
        print(f"\nMontgomery-like → Shenzhen-like, {split} images, vs the true Shenzhen-like renders")
        print(format_scores(scores))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
