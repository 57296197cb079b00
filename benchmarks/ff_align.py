"""The feed-forward's matmuls at open-musiclm's inner width vs the same width padded, forward and backward.

open-musiclm's feed-forward (``dim_inner = int(dim * mult * 2 / 3)``) is 2,730 wide at dim 1,024: proj_in's output
rows (2 x 2,730 bf16 = 10,920 bytes) and proj_out's input rows (5,460 bytes) are not multiples of 16 bytes, which the
fastest GPU GEMM kernels need for their operands' leading dimensions (Hopper's TMA requires it; cuBLAS otherwise
picks kernels with narrower loads). These two matmuls are ~80 % of a large stage's model FLOPs. This times
``F.linear`` forward + backward (input and weight gradients) of both at the real width and at widths padded to 16
and 64 elements, one run, and prints ms, TFLOP/s of the useful work (the real width's FLOPs) and the ratio, so
that padding inside the model (zero rows/columns, the same function) is done only if it pays.
    python benchmarks/ff_align.py --device cuda            # bf16, 8 x 1,116 positions (a large coarse batch)
    python benchmarks/ff_align.py --device cpu --tokens 2048 --dtype float32
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def linear_step(x: torch.Tensor, w: torch.Tensor):
    """Forward and backward of ``F.linear(x, w)`` into both: 3 matmuls, as in training."""
    def run():
        x.grad = w.grad = None
        y = F.linear(x, w)
        y.backward(torch.ones_like(y))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=8 * 1116, help="batch x positions (default: large coarse, batch 8)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--mult", type=int, default=4)
    p.add_argument("--align", type=int, nargs="+", default=[16, 64], help="pad the inner width to multiples of these")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inner = int(args.dim * args.mult * 2 / 3)
    widths = [inner] + sorted({-(-inner // a) * a for a in args.align} - {inner})
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    flops_in = 6 * args.tokens * args.dim * 2 * inner  # useful FLOPs: the real width's
    flops_out = 6 * args.tokens * inner * args.dim
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {dtype}, "
          f"{args.tokens} tokens, dim {args.dim}, inner {inner} (torch {torch.__version__})")
    print("| inner width | proj_in ms | proj_out ms | both ms | useful TFLOP/s | real width / this |")
    print("|---|---|---|---|---|---|")
    base = None
    for width in widths:
        w_in = torch.randn(2 * width, args.dim, device=device, dtype=dtype, requires_grad=True)
        w_out = torch.randn(args.dim, width, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(args.tokens, width, device=device, dtype=dtype, requires_grad=True)
        t_in = timed(linear_step(x, w_in), device, args.repeats)
        t_out = timed(linear_step(h, w_out), device, args.repeats)
        both = t_in + t_out
        base = base or both
        print(f"| {width} | {t_in * 1e3:.3f} | {t_out * 1e3:.3f} | {both * 1e3:.3f} | "
              f"{(flops_in + flops_out) / both / 1e12:.1f} | {base / both:.2f}x |")


if __name__ == "__main__":
    main()
