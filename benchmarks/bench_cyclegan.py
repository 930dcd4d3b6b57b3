"""CycleGAN training speed: images per second and peak memory of our training step.

Times :class:`gan.cyclegan.trainer.CycleGANSteps` -- the exact step ``cxr train-gan cyclegan``
runs (G phase, D phase through the image pools, LR schedule, Adam) -- at the paper's setting:
ResNet-9 generators, 70×70 PatchGANs, instance norm, LSGAN, batch size 1, 256², one channel.
The batches come from preprocessed images already on the device, as in training. Reports
training pairs per second (one A and one B image per pair; comparable to 1 / the ``time:``
field of the reference implementation's log) and peak memory (CUDA: max allocated; CPU:
the process's max resident set).

    python benchmarks/bench_cyclegan.py                          # 256², auto device, defaults
    python benchmarks/bench_cyclegan.py --device cpu --steps 10 --threads 2
    python benchmarks/bench_cyclegan.py --amp off --no-channels-last    # fp32 "equal maths" on GPU
    python benchmarks/bench_cyclegan.py --compile
    python benchmarks/bench_cyclegan.py --compile --compile-mode reduce-overhead   # + CUDA graphs
    python benchmarks/bench_cyclegan.py --device cpu --size 128 --steps 2 --warmup 1 --amp off --threads 1 --profile 2

Comparing with the reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix), same
machine, same maths (fetch it into its own folder; it needs ``dominate`` for its HTML log):

    python benchmarks/bench_cyclegan.py --export-dataroot /tmp/cg_dataroot --phantom data/phantom
    cd pytorch-CycleGAN-and-pix2pix
    python train.py --dataroot /tmp/cg_dataroot --name bench --model cycle_gan \\
        --input_nc 1 --output_nc 1 --netG resnet_9blocks --netD basic --norm instance \\
        --gan_mode lsgan --pool_size 50 --lambda_identity 0.5 --batch_size 1 \\
        --preprocess none --load_size 256 --crop_size 256 --no_flip --display_id 0 --no_html \\
        --n_epochs 1 --n_epochs_decay 0 --print_freq 20 --gpu_ids 0      # --gpu_ids -1 on CPU

and read its ``time:`` (seconds of compute per training pair, after the first prints); the
ratio is our ``pairs_per_s`` × that time. On CPU compare at equal threads
(``OMP_NUM_THREADS``) and ``--amp off``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.data.image import load_image  # noqa: E402  (after the checkout is on the path)
from cxr.data.layouts import load_tree  # noqa: E402
from cxr.data.preprocess import resize_square  # noqa: E402
from cxr.engine.config import CompileMode, load_config  # noqa: E402
from cxr.engine.distributed import resolve_device  # noqa: E402
from cxr.engine.memory import peak_memory_mb  # noqa: E402
from cxr.engine.seed import seed_everything  # noqa: E402
from gan.cyclegan.config import CycleGANConfig  # noqa: E402
from gan.cyclegan.trainer import CycleGANSteps  # noqa: E402

POOL = 16  # a small in-memory "dataset" per domain, as the trainers keep it (float16, on the device)


def data_pools(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.rand(POOL, 1, size, size, device=device).half(), torch.rand(POOL, 1, size, size, device=device).half())


def pool_batch(images: torch.Tensor, i: int, batch_size: int) -> torch.Tensor:
    """Step ``i``'s batch from a pool, in [-1, 1], as the trainers feed it."""
    idx = torch.arange(i * batch_size, (i + 1) * batch_size, device=images.device) % POOL
    return images.index_select(0, idx).float() * 2 - 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(typing.NamedTuple):
    seconds: float  # wall time of the timed steps
    cpu_seconds: float  # this process's CPU time over them
    per_step: list[float]  # CPU only: a GPU step is timed as a whole run, without a sync per step
    losses: dict[str, torch.Tensor]  # the last step's


def time_steps(steps, pools: tuple[torch.Tensor, torch.Tensor], batch_size: int, warmup: int, timed: int,
               device: torch.device) -> Timing:
    """``warmup`` untimed steps of a two-domain ``steps.step(a, b, i)`` (CycleGAN or CUT), then
    ``timed`` timed ones; the CUDA peak memory counts from the first timed step."""
    pool_a, pool_b = pools
    for i in range(warmup):
        steps.step(pool_batch(pool_a, i, batch_size), pool_batch(pool_b, i, batch_size), i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + timed):
        t_step = time.perf_counter()
        losses, _ = steps.step(pool_batch(pool_a, i, batch_size), pool_batch(pool_b, i, batch_size), i)
        if device.type == "cpu":
            per_step.append(time.perf_counter() - t_step)
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    assert torch.isfinite(losses["loss_G"]), "non-finite loss in the benchmark"
    return Timing(seconds, cpu_seconds, per_step, losses)


def export_dataroot(phantom: Path, out: Path, size: int) -> None:
    """trainA/ (Montgomery-like) and trainB/ (Shenzhen-like) 8-bit PNGs at ``size``² for the reference code."""
    for sub, site in (("trainA", "MontgomerySet"), ("trainB", "ChinaSet_AllFiles")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for r in load_tree(phantom / site).records:
            img = resize_square(load_image(r.image), size, "pad")
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(out / sub / Path(r.image).name)
    print(f"wrote {out}/trainA and {out}/trainB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--generator", default="resnet9")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=typing.get_args(CompileMode),
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, profile N more steps (torch.profiler) and print where the time goes")
    p.add_argument("--export-dataroot", type=Path, default=None, metavar="DIR",
                   help="write the reference code's trainA/trainB from --phantom and exit")
    p.add_argument("--phantom", type=Path, default=Path("data/phantom"))
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. model.ngf=32")
    args = p.parse_args(argv)
    if args.export_dataroot:
        export_dataroot(args.phantom, args.export_dataroot, args.size)
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    total = args.warmup + args.steps
    cfg = load_config(CycleGANConfig, None, [
        f"data.size={args.size}", f"model.generator={args.generator}", f"train.batch_size={args.batch_size}",
        f"train.steps={total}", f"train.amp={args.amp}", f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={str(args.compile).lower()}", f"train.compile_mode={args.compile_mode}", *args.overrides])
    seed_everything(0)
    steps = CycleGANSteps(cfg, device)
    pool_a, pool_b = data_pools(args.size, device)
    timing = time_steps(steps, (pool_a, pool_b), args.batch_size, args.warmup, args.steps, device)
    seconds, per_step = timing.seconds, timing.per_step
    pairs_per_s = args.steps * args.batch_size / seconds
    if args.profile > 0:  # separate steps, so the profiler's overhead stays out of the timing
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(total, total + args.profile):
                steps.step(pool_batch(pool_a, i, args.batch_size), pool_batch(pool_b, i, args.batch_size), i)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=12))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": cfg.data.size, "generator": cfg.model.generator, "ngf": cfg.model.ngf,
        "d_layers": cfg.model.d_layers, "batch_size": cfg.train.batch_size,
        "amp": args.amp, "channels_last": steps.channels_last, "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None, "winograd": cfg.model.winograd,
        "steps": args.steps, "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs_per_s, 3), "images_per_s": round(2 * pairs_per_s, 3),
        "s_per_pair": round(1 / pairs_per_s, 4), "peak_memory_mb": round(peak_memory_mb(device), 1),
        **({"median_s": round(statistics.median(per_step), 4), "all": [round(t, 4) for t in per_step]}
           if per_step and args.batch_size == 1 else {}),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
