"""``cxr demo``: the whole study on the built-in phantom in one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from cxr.cli.common import add_workers_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole study end to end on the built-in phantom",
                       description="Run the whole study end to end on the built-in phantom "
                                   "(CPU-friendly; within 10 minutes on 2 cores).")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    add_workers_argument(p, None, "all cores", "processes")
    p.add_argument("--n", type=int, default=None,
                   help="phantom images (default: 800, the real Shenzhen + Montgomery counts)")
    p.add_argument("--gan-steps", type=int, default=None,
                   help="CycleGAN and FastCUT training steps (default: their tiny configs' 300)")
    p.add_argument("--stylegan-steps", type=int, default=None,
                   help="StyleGAN2-ADA training steps of the augmentation stage (default 300)")
    p.add_argument("--seeds", type=int, default=3, help="classifier training seeds (default 3)")
    p.add_argument("--clf-epochs", type=int, default=20,
                   help="classifier epochs (default 20; the classifier_tb config trains 30)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo's outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: cxr.demo imports every stage's code, torchvision included (seconds), which `cxr --help`
    # and the other subcommands never need
    from cxr.demo import DemoConfig, run_demo

    bars: list[tqdm] = []

    def on_stage(name: str):
        for b in bars:
            b.close()
        bars[:] = [tqdm(desc=f"  {name}", unit="img", file=sys.stderr, leave=False,
                        disable=not sys.stderr.isatty())]
        return bars[0].update

    summary = run_demo(DemoConfig(out=args.out, size=args.size, seed=args.seed, workers=args.workers,
                                  overwrite=args.overwrite, n=args.n,
                                  gan_steps=args.gan_steps, stylegan_steps=args.stylegan_steps, seeds=args.seeds,
                                  clf_epochs=args.clf_epochs), on_stage=on_stage,
                       echo=lambda m: print(m, file=sys.stderr, flush=True))
    for b in bars:
        b.close()
    print("\n== cxr demo summary ==")
    for line in summary:
        print(line)
    return 0
