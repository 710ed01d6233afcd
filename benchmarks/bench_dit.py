"""One forward of the Wan transformer: ours (pipeline/dit.py) against diffusers' WanTransformer3DModel.

Both models get identical random weights (each tensor drawn from a generator seeded by its official name) at
the Wan 2.1 T2V 1.3B width (dim 1536, 12 heads, ffn 8960), with fewer layers unless --full. Times are the
median of --runs forwards after one warm-up, both models timed in this process; the peak memory of a forward
is measured for each case in a fresh subprocess (peak RSS on the CPU, peak allocated memory on CUDA), above
what the process held just before it (weights and libraries: the 'before' column).

    python benchmarks/bench_dit.py                          # 4 layers, ~1,500 tokens, float32 and bfloat16
    python benchmarks/bench_dit.py --device cuda --full     # 30 layers, 32,760 tokens (832x480x81), bfloat16

Needs diffusers (the test extra). Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib

import torch

from zoetrope.pipeline import dit  # the repository installed as `zoetrope` (pip install -e .)
from zoetrope.pipeline.config import DiTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_TOKENS = 32760  # 832x480, 81 frames -> latent 21 x 60 x 104 -> 21 x 30 x 52 tokens


def config(layers: int) -> DiTConfig:
    return DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers)


def latent_grid(tokens: int) -> tuple[int, int, int]:
    """Token grid (frames, height/2, width/2) of an 832x480-shaped clip with about `tokens` tokens."""
    frames = max(1, round(21 * (tokens / FULL_TOKENS) ** (1 / 3)))
    area = tokens / frames
    height = max(1, round(math.sqrt(area * 30 / 52)))
    return frames, height, max(1, round(area / height))


# ------------------------------------------------------------------------------------------------------------
# Models with identical weights
# ------------------------------------------------------------------------------------------------------------

def fill_(model: torch.nn.Module, official_name) -> None:
    """Random weights that depend only on the official tensor name, so both implementations get the same."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            official = official_name(name)
            g = torch.Generator(p.device).manual_seed(zlib.crc32(official.encode()))
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.ndim >= 2 and "modulation" not in official:
                r /= math.sqrt(math.prod(p.shape[1:]))
            elif official.endswith("modulation"):
                r *= 0.1
            elif official.endswith("weight"):
                r = 1 + 0.1 * r
            else:
                r *= 0.02
            p.copy_(r)


def build(impl: str, cfg: DiTConfig, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model built straight in `dtype` on `device` (no float32 detour that would blur the memory figures)."""
    if impl == "ours":
        model = dit.WanModel(cfg, device=device, dtype=dtype)
        fill_(model, lambda name: name)
        return model.eval()
    from diffusers import WanTransformer3DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(
                patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps)
    finally:
        torch.set_default_dtype(default)
    fill_(model, lambda name: next(iter(dit.map_diffusers_keys({name: None}))))
    return model.eval()


def inputs(cfg: DiTConfig, tokens: int, device: str, dtype: torch.dtype):
    f, h, w = latent_grid(tokens)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_dim, f, 2 * h, 2 * w, generator=g, device=device)
    t = torch.tensor([500.0], device=device)
    prompt = torch.randn(40, cfg.text_dim, generator=g, device=device)      # a 40-token prompt, padded to 512
    context = dit.pad_context([prompt], cfg.text_len).to(dtype)
    return x, t, context


def forward(impl: str, model, x, t, context, dtype):
    if impl == "ours":
        return model(x, t, context)
    return model(x.to(dtype), t, context).sample


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------------

def time_both(args, dtype_name: str) -> dict[str, list[float]]:
    dtype, cfg = DTYPES[dtype_name], config(args.layers)
    x, t, context = inputs(cfg, args.tokens, args.device, dtype)
    models = {impl: build(impl, cfg, args.device, dtype) for impl in ("diffusers", "ours")}
    times: dict[str, list[float]] = {impl: [] for impl in models}
    outputs = {}
    with torch.inference_mode():
        for impl, model in models.items():                                 # warm-up (and RoPE tables, kernels)
            outputs[impl] = forward(impl, model, x, t, context, dtype).float()
        for _ in range(args.runs):                                         # interleaved, so drift hits both
            for impl, model in models.items():
                sync(args.device)
                start = time.perf_counter()
                forward(impl, model, x, t, context, dtype)
                sync(args.device)
                times[impl].append(time.perf_counter() - start)
    ref = outputs["diffusers"]
    err = ((outputs["ours"] - ref).abs().max() / ref.abs().max()).item()
    print(f"  {dtype_name}: ours vs diffusers, max relative difference of the outputs {err:.1e}")
    return times


def memory_case(args) -> None:
    """Subprocess entry: build one model, run one forward, print its peak memory above the weights as JSON."""
    impl, dtype = args.memory_case, DTYPES[args.dtype]
    cfg = config(args.layers)
    model = build(impl, cfg, args.device, dtype)
    x, t, context = inputs(cfg, args.tokens, args.device, dtype)
    with torch.inference_mode():
        # A one-frame warm-up first: library set-up (kernels, thread pools) is not the forward's memory.
        forward(impl, model, x[:, :, :1, :2, :2], t, context, dtype)
        sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            forward(impl, model, x, t, context, dtype)
            sync(args.device)
            peak = torch.cuda.max_memory_allocated() - held
        else:
            held = current_rss()
            reset = reset_peak_rss()
            high_before = peak_rss()
            forward(impl, model, x, t, context, dtype)
            # Without the reset, the high-water mark only says something if this forward raised it.
            peak = peak_rss() - held if reset or peak_rss() > high_before else float("nan")
    print(json.dumps({"peak_mb": peak / 2**20, "held_mb": held / 2**20}))


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: that one survives execve, so a
    subprocess would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(args, impl: str, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-case", impl, "--dtype", dtype_name, "--layers", str(args.layers),
           "--tokens", str(args.tokens), "--device", args.device]
    # Fixed glibc mmap threshold: freed tensors go back to the OS at once, so RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"memory case {impl} {dtype_name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1500, help="about this many latent tokens (832x480 aspect)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--runs", type=int, default=3, help="timed forwards per case (after one warm-up)")
    p.add_argument("--full", action="store_true", help="Wan 2.1 1.3B at 832x480x81: 30 layers, 32,760 tokens, bf16")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    p.add_argument("--memory-case", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full:
        args.layers, args.tokens = 30, FULL_TOKENS
        if args.dtype == p.get_default("dtype"):
            args.dtype = "bfloat16"
    if args.memory_case:
        return memory_case(args)

    dtypes = [d.strip() for d in args.dtype.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype {unknown}; choose from {', '.join(DTYPES)}")
    grid = latent_grid(args.tokens)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"Wan DiT forward: dim 1536, 12 heads, ffn 8960, {args.layers} layers, grid {grid[0]}x{grid[1]}x{grid[2]}"
          f" = {math.prod(grid)} tokens, text 512, batch 1; {device_name}; torch {torch.__version__}; "
          f"median of {args.runs}")
    rows = []
    for dtype_name in dtypes:
        times = time_both(args, dtype_name)
        memory = {impl: (None if args.no_memory else measure_memory(args, impl, dtype_name)) for impl in times}
        rows.append((dtype_name, times, memory))

    print(f"\n{'dtype':9} {'impl':10} {'median s':>9} {'min s':>8} {'peak MB':>9} {'before MB':>11} "
          f"{'time ours/diff':>15} {'mem ours/diff':>14}")
    for dtype_name, times, memory in rows:
        for impl in ("diffusers", "ours"):
            med, low = statistics.median(times[impl]), min(times[impl])
            mem = memory[impl]
            peak = f"{mem['peak_mb']:9.0f}" if mem else f"{'-':>9}"
            held = f"{mem['held_mb']:11.0f}" if mem else f"{'-':>11}"
            ratio_t = ratio_m = ""
            if impl == "ours":
                ratio_t = f"{med / statistics.median(times['diffusers']):15.2f}"
                if mem and memory["diffusers"]["peak_mb"] > 0:
                    ratio_m = f"{mem['peak_mb'] / memory['diffusers']['peak_mb']:14.2f}"
            print(f"{dtype_name:9} {impl:10} {med:9.3f} {low:8.3f} {peak} {held} {ratio_t} {ratio_m}".rstrip())


if __name__ == "__main__":
    main()
