"""One 3×3 convolution layer, forward + backward: oneDNN's direct kernel against Winograd F(4, 3).

Times what ``model.winograd`` decides between (``gan.networks.winograd``): a residual block's
stride-1 3×3 convolution with reflection padding, batch 1, float32, on the CPU, for each
feature-map side and channel count given. Prints a markdown table of medians (seconds per
forward + backward) and the speed-up, and whether ``auto`` picks Winograd there.

    python benchmarks/bench_winograd.py --threads 2
    python benchmarks/bench_winograd.py --threads 1 --sides 16 32 64 --channels 256 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.networks.winograd import use_winograd, winograd_conv3x3  # noqa: E402  (after the checkout is on the path)


def time_layer(conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median seconds of pad + ``conv`` forward + backward (all three gradients)."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        y = conv(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)
        torch.autograd.grad(y.sum(), (x, weight, bias))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64, 128], help="feature-map sides (multiples of 4)")
    p.add_argument("--channels", type=int, nargs="+", default=[256, 128, 64])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if any(s % 4 for s in args.sides):
        print("bench_winograd: --sides must be multiples of 4", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# python benchmarks/bench_winograd.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, batch 1, float32, forward + backward, "
          f"median of {args.repeats}\n")
    print("| channels | map side | direct s | Winograd s | speed-up | `auto` uses it |")
    print("|---:|---:|---:|---:|---:|---|")
    gen = torch.Generator().manual_seed(0)
    for c in args.channels:
        for side in args.sides:
            x = torch.randn(1, c, side, side, generator=gen, requires_grad=True)
            weight = (torch.randn(c, c, 3, 3, generator=gen) * 0.02).requires_grad_()
            bias = torch.zeros(c, requires_grad=True)
            direct = time_layer(F.conv2d, x, weight, bias, args.repeats, args.warmup)
            wino = time_layer(winograd_conv3x3, x, weight, bias, args.repeats, args.warmup)
            auto = "yes" if use_winograd("auto", x, c) else "no"
            print(f"| {c} | {side}² | {direct:.4f} | {wino:.4f} | {direct / wino:.2f}× | {auto} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
