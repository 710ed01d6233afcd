"""What the sampler's live preview costs, as a share of sampling time.

Samples a clip with the built-in model's transformer (its trained weights when present, else random weights of the
same architecture: the time is the same) the way ZoetropeSampler does, with the live preview on (frames projected,
JPEG-encoded and serialised as ComfyUI's send_sync would), and reports the median over --runs of:

- share: seconds spent in the preview / seconds spent sampling, as the preview measures itself;
- overhead: the wall time of a run with previews against one without, which also catches what the preview's own
  clock would miss (noisy on a busy machine; the share is the number to quote).

The built-in model is a hard case: its steps take tens of milliseconds on a CPU, so a preview is relatively
expensive; a loop of 2.5 ms "steps" (a tiny test model) is the worst one. For the Wan models the script also times
one preview of their real latent sizes, to set against their seconds per step.

    python benchmarks/preview_cost.py                  # 64x64, 17 frames, 20 steps, 5 runs
    python benchmarks/preview_cost.py --quick --runs 1 --steps 4

Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zoetrope.nodes import preview
from zoetrope.pipeline import builtin, generate, load_transformer
from zoetrope.pipeline.dit import WanModel
from zoetrope.pipeline.world import train


def transformer():
    if builtin.TRANSFORMER.is_file():
        return load_transformer(builtin.TRANSFORMER, device="cpu", dtype=torch.float32), "trained"
    torch.manual_seed(0)
    return WanModel(train.DIT_CONFIG).eval(), "random-weight"


def run(dit, noise, cond, steps: int, with_preview: bool):
    """One sampling run; returns (wall seconds, the LivePreview or None)."""
    live = None
    if with_preview:
        fam = preview.projection_for(noise.shape[1], builtin=True)
        live = preview.LivePreview("1", fam, fps=8, send=lambda event, data: json.dumps({"type": event, "data": data}))
    start = time.perf_counter()
    generate.sample(dit, noise, cond, cond, steps=steps, cfg=4.0, shift=3.0, solver="unipc",
                    progress=None if live is None else (lambda step, total, x0: live(step, total, x0)))
    if live is not None:
        live.close()
    return time.perf_counter() - start, live


def wan_preview_ms(shape, family: str, repeats: int = 5) -> float:
    """Median milliseconds of one preview (projection, JPEG, JSON) of a latent of this shape."""
    x0 = torch.randn(shape)
    p = preview.projections()[family]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        json.dumps(preview.frame_grid(preview.latent_to_rgb(x0, p)))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="skip the Wan preview timings")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    dit, weights = transformer()
    t = 1 + (args.frames - 1) // 4
    noise = torch.randn(1, dit.config.out_dim, t, args.size // 4, args.size // 4, generator=torch.Generator().manual_seed(0))
    cond = [torch.randn(12, dit.config.text_dim, generator=torch.Generator().manual_seed(1))]
    run(dit, noise, cond, 2, False)                                       # warm-up
    shares, overheads, counts, per_step = [], [], [], []
    for _ in range(args.runs):
        plain, _ = run(dit, noise, cond, args.steps, False)
        wall, live = run(dit, noise, cond, args.steps, True)
        shares.append(live.share)
        overheads.append(wall / plain - 1)
        counts.append(live.previews)
        per_step.append(live.sampling / args.steps)
    print(f"built-in transformer ({weights}), {args.size}x{args.size}x{args.frames} (latent {list(noise.shape)}), "
          f"{args.steps} UniPC steps with cfg, CPU, {torch.get_num_threads()} threads, {args.runs} runs")
    print(f"  {statistics.median(per_step) * 1000:.1f} ms per step; {statistics.median(counts):.0f} previews per run "
          f"(every {args.steps / max(1, statistics.median(counts)):.1f} steps)")
    print(f"  preview share of sampling time (median): {100 * statistics.median(shares):.2f}%  "
          f"[runs: {', '.join(f'{100 * s:.2f}%' for s in shares)}]")
    print(f"  wall-time overhead vs no preview (median): {100 * statistics.median(overheads):+.2f}%")
    # The worst case for the budget: steps of a few milliseconds (a tiny model), here a busy loop of 2.5 ms.
    fast_shares, fast_counts = [], []
    x0 = torch.randn(1, 16, 5, 16, 16)
    for _ in range(args.runs):
        live = preview.LivePreview("1", preview.projection_for(16, builtin=True), fps=8,
                                   send=lambda event, data: json.dumps({"type": event, "data": data}))
        for step in range(1, 401):
            until = time.perf_counter() + 0.0025
            while time.perf_counter() < until:
                pass
            live(step, 400, x0)
        live.close()
        fast_shares.append(live.share)
        fast_counts.append(live.previews)
    print(f"  steps of 2.5 ms (400 steps): {statistics.median(fast_counts):.0f} previews per run, share "
          f"{100 * statistics.median(fast_shares):.2f}% (median of {args.runs})")
    if not args.quick:
        for name, shape, fam in (("Wan 2.1 832x480x81", (1, 16, 21, 60, 104), "wan2.1"),
                                 ("Wan 2.2 TI2V 1280x704x121", (1, 48, 31, 44, 80), "wan2.2")):
            print(f"  one preview of {name} (latent {list(shape)}): {wan_preview_ms(shape, fam):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
