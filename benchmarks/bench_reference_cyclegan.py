"""Time the reference CycleGAN's training step (junyanz/pytorch-CycleGAN-and-pix2pix) beside ours.

The reference's code is not part of this repository. Put its model files in a folder (``--ref``,
default ``.ref/``, ignored by git) and this script times ``model.set_input(data)`` +
``model.optimize_parameters()`` per step, which is what the reference's ``train.py`` reports as
``time:``. It prints one JSON line with the same ``s_per_pair`` field as
``benchmarks/bench_cyclegan.py``.

The folder holds the 2018 API version used in docs/results/cyclegan_speed.md: ``models/networks.py``,
``models/__init__.py`` and ``models/cycle_gan_model.py`` at commit 78913853;
``models/base_model.py``, ``util/image_pool.py`` and ``util/util.py`` at d45df3a6. Also add
**an empty** ``util/__init__.py``: the only copy of that file in the stored code index is
malicious (it downloads and runs a payload). Same maths as ``bench_cyclegan.py --amp off
--no-channels-last``: ResNet-9, 70×70 PatchGAN, instance norm, LSGAN, pool 50, identity 0.5,
batch 1, one channel, fp32.

``--interleave`` also builds our training step (``gan.cyclegan.trainer.CycleGANSteps``, the same
settings, our defaults otherwise) in the same process and runs it right after each reference
step on the same images, so both see the same machine load; it adds our per-step times and the
median of the per-step ratios (reference / ours) to the JSON line. On a shared machine whose
speed drifts by tens of percent between runs, that ratio is the steadiest figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_reference_cyclegan.py --size 128 --threads 1
    python benchmarks/bench_reference_cyclegan.py --size 256 --threads 2 --interleave   # + ours, step by step
    python benchmarks/bench_reference_cyclegan.py --size 256 --steps 30 --warmup 5 --gpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from cxr.engine.config import load_config  # noqa: E402
from cxr.engine.seed import seed_everything  # noqa: E402  (the seeding bench_cyclegan.py uses)
from gan.cyclegan.config import CycleGANConfig  # noqa: E402
from gan.cyclegan.trainer import CycleGANSteps  # noqa: E402


def reference_options(gpu: bool, checkpoints: str) -> SimpleNamespace:
    """The option namespace the reference's 2018 ``CycleGANModel.initialize`` reads."""
    return SimpleNamespace(
        isTrain=True, gpu_ids=[0] if gpu else [], checkpoints_dir=checkpoints, name="bench",
        input_nc=1, output_nc=1, ngf=64, ndf=64, which_model_netG="resnet_9blocks",
        which_model_netD="basic", n_layers_D=3, norm="instance", init_type="normal",
        no_dropout=True, no_lsgan=False, pool_size=50, lambda_A=10.0, lambda_B=10.0,
        lambda_identity=0.5, lr=0.0002, beta1=0.5,
        # 'lambda' is this version's name for constant-then-linear decay (never stepped here)
        lr_policy="lambda", epoch_count=1, niter=100, niter_decay=100, lr_decay_iters=50,
        which_direction="AtoB", resize_or_crop="none", continue_train=False, verbose=False,
        which_epoch="latest", load_iter=0, display_id=0, model="cycle_gan", batch_size=1,
        batchSize=1, phase="train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=Path, default=ROOT / ".ref", help="folder with the reference's models/ and util/")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--gpu", action="store_true", help="run on cuda:0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleave", action="store_true", help="also time our step after each reference step")
    p.add_argument("overrides", nargs="*", help="with --interleave: key=value overrides of our config")
    args = p.parse_args(argv)
    if not (args.ref / "models" / "cycle_gan_model.py").is_file():
        print(f"bench_reference_cyclegan: {args.ref}: no models/cycle_gan_model.py (see the docstring)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    sys.path.insert(0, str(args.ref.resolve()))
    from models import create_model  # the reference's own factory

    device = torch.device("cuda:0" if args.gpu else "cpu")
    with tempfile.TemporaryDirectory() as ckpt, contextlib.redirect_stdout(sys.stderr):
        opt = reference_options(args.gpu, ckpt)
        (Path(ckpt) / opt.name).mkdir()
        model = create_model(opt)
        model.setup(opt)
        ours = our_steps(args.size, device, args.overrides) if args.interleave else None
        gen = torch.Generator().manual_seed(args.seed)
        shape = (1, 1, args.size, args.size)
        times, our_times = [], []
        for i in range(args.warmup + args.steps):
            data = {"A": torch.rand(shape, generator=gen) * 2 - 1, "B": torch.rand(shape, generator=gen) * 2 - 1,
                    "A_paths": ["a"], "B_paths": ["b"]}
            if args.gpu:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model.set_input(data)
            model.optimize_parameters()
            if args.gpu:
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            if ours is not None:
                t0 = time.perf_counter()
                ours.step(data["A"].to(device), data["B"].to(device), i)
                if args.gpu:
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    our_times.append(time.perf_counter() - t0)
    interleaved = {} if ours is None else {
        "ours_s_per_pair": round(statistics.mean(our_times), 4), "ours_median_s": round(statistics.median(our_times), 4),
        "ours_all": [round(t, 4) for t in our_times],
        "ratio_median": round(statistics.median(r / o for r, o in zip(times, our_times)), 3),
        "ours_winograd": ours.cfg.model.winograd}
    print(json.dumps({
        "impl": "reference", "device": torch.cuda.get_device_name(device) if args.gpu else
        f"cpu ({torch.get_num_threads()} threads)", "size": args.size, "steps": args.steps,
        "s_per_pair": round(statistics.mean(times), 4), "median_s": round(statistics.median(times), 4),
        "pairs_per_s": round(1 / statistics.mean(times), 3), "all": [round(t, 4) for t in times],
        **interleaved, "torch": torch.__version__}))
    return 0


def our_steps(size: int, device: torch.device, overrides: list[str]):
    """Our CycleGAN step at the reference's maths: ResNet-9, 70×70 PatchGAN, batch 1, fp32, contiguous."""
    cfg = load_config(CycleGANConfig, None, [
        f"data.size={size}", "model.generator=resnet9", "train.batch_size=1", "train.amp=off",
        "train.channels_last=false", *overrides])
    return CycleGANSteps(cfg, device)


if __name__ == "__main__":
    sys.exit(main())
