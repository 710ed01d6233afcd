"""Layers whose stored weight may be in another precision than the compute.

The models build their Linear layers through this module so that the loader, not the model, decides how
weights are stored: full precision, or fp8 (plain or with a per-layer scale) kept as fp8 in memory and
up-cast one layer at a time in `forward`. That keeps a 14B model in fp8 at ~14 GB instead of 28 GB.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


class Linear(nn.Linear):
    """nn.Linear that casts its weight (and bias) to the input's dtype on the fly.

    `weight_scale` is None for ordinary weights; for scaled fp8 it is the per-layer (or per-row) factor:
    the real weight is `weight.to(dtype) * weight_scale`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_scale: torch.Tensor | None = None

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(dtype)
        if self.weight_scale is not None:
            w = w * self.weight_scale.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.compute_weight(x.dtype), bias)


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its first floating, non-fp8 parameter."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype not in FP8_DTYPES:
            return p.dtype
    return torch.float32


@functools.lru_cache(maxsize=None)     # asked on every training step; the answer never changes
def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products in hardware (an Ampere or newer GPU; a CPU with AVX512-BF16
    or AMX) rather than emulating them, slower than fp32 or fp16. oneDNN runs bf16 on any AVX-512 CPU, but without
    the bf16 dot-product instructions it converts: a training step of the built-in VAE took 0.93-1.1 s in bf16
    against 0.61 s in fp32 on such a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        try:     # older GPUs (RTX 20xx, T4, V100) emulate bf16, and torch counts that as support by default
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:   # an older torch, without the argument
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:     # private checks: a torch without them gets the safe answer
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return True          # other accelerators (Apple's MPS on a current macOS) compute bf16 themselves


def default_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """The dtype a model computes in when the user does not say, for weights stored in `stored` (None: unknown).

    On a CPU float32: most CPUs emulate half-precision products (on an AVX2-only CPU a bf16 transformer step took
    15 times as long as fp32). On an accelerator 16 bits, which halve memory and time: the file's own half
    precision where the hardware computes it, else bf16 where the hardware has it (Wan itself runs in bf16), else
    fp16, as ComfyUI chooses on GPUs older than Ampere."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if stored == torch.float16:
        return torch.float16
    return torch.bfloat16 if bf16_native(device) else torch.float16
