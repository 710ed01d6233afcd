"""Attention on a CPU: PyTorch's fused kernel against two matrix products and a softmax (pipeline.dit.attention
picks the second in bf16 below dit.SMALL_ATTENTION score entries).

For each shape, the median of --runs calls after one warm-up, forward alone and forward + backward, both ways timed
in this process, and the ratio fused / explicit (above 1: the explicit form is faster). The shapes are the built-in
model's (3 heads of 64; training batches of 12 clips and 24 pictures, sampling 16 prompts with guidance) and some
longer ones towards where the fused kernel wins.

    python benchmarks/attention_cpu.py
    python benchmarks/attention_cpu.py --threads 1 --dtype float32

Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zoetrope.pipeline.dit import explicit_attention

# (batch, heads, query length, key length): self-attention of clips and pictures, cross-attention to 48 text tokens
SHAPES = ((12, 3, 320, 320), (24, 3, 64, 64), (12, 3, 320, 48), (32, 3, 320, 320), (2, 3, 1280, 1280),
          (2, 3, 2560, 2560), (2, 12, 1500, 1500), (2, 12, 4096, 4096))




def timed(fn, shape, dtype, backward: bool, runs: int) -> float:
    b, n, lq, lk = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, length, 64, generator=g, dtype=dtype).requires_grad_(backward)
               for length in (lq, lk, lk))
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = fn(q, k, v)
            if backward:
                out.float().sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; milliseconds, median of {args.runs}")
    print(f"{'dtype':<9}{'shape (B, heads, Lq, Lk)':<26}{'entries':>10}{'pass':>10}{'fused':>9}{'explicit':>10}"
          f"{'ratio':>7}")
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for shape in SHAPES:
            entries = shape[0] * shape[1] * shape[2] * shape[3]
            for backward in (False, True):
                a = timed(F.scaled_dot_product_attention, shape, dtype, backward, args.runs)
                b = timed(explicit_attention, shape, dtype, backward, args.runs)
                print(f"{name:<9}{str(shape):<26}{entries:>10}{'fwd+bwd' if backward else 'fwd':>10}"
                      f"{1e3 * a:>9.1f}{1e3 * b:>10.1f}{a / b:>7.2f}")


if __name__ == "__main__":
    main()
