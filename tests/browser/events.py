"""Recorded `zoetrope.preview` messages for the browser tests, made by the real preview code (nodes/preview.py).

A Wan 2.1 sampler is imitated at the level of what it reports: its x0 estimate moves, step by step, from blurred
noise to the latent of a known clip (a red disc crossing a blue background), which LivePreview projects with the
published Wan 2.1 factors, encodes and times as it would in ComfyUI, on a clock that ticks `seconds_per_step` a
step. The clean latent is the least-norm latent whose projection is the clip, so the last frames show the disc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoetrope.nodes import preview


def disc_clip(frames: int = 5, height: int = 30, width: int = 52) -> torch.Tensor:
    """[T, H, W, 3] in -1..1: a red disc moving left to right over a dark blue background."""
    y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    clip = torch.empty(frames, height, width, 3)
    clip[:] = torch.tensor([-0.8, -0.6, 0.1])
    radius = height / 4
    for t in range(frames):
        cx = radius + (width - 2 * radius) * t / max(1, frames - 1)
        inside = (x - cx) ** 2 + (y - height / 2) ** 2 <= radius ** 2
        clip[t][inside] = torch.tensor([0.9, -0.7, -0.7])
    return clip


def preview_events(node_id: str = "0", steps: int = 12, seconds_per_step: float = 0.8) -> list[dict]:
    projection = preview.projections()["wan2.1"]
    factors = torch.tensor(projection.factors)                               # [16, 3]
    clip = disc_clip()
    clean = (clip - torch.tensor(projection.bias)) @ torch.linalg.pinv(factors)   # [T, H, W, 16]
    clean = clean.permute(3, 0, 1, 2)[None]                                  # [1, 16, T, H, W]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    blurred = F.avg_pool3d(noise, (1, 5, 5), stride=1, padding=(0, 2, 2))

    now = [0.0]
    sent: list[dict] = []
    saved = preview.LivePreview._recent
    preview.LivePreview._recent = [0.0]                   # a free preview on this clock: frames every step
    try:
        live = preview.LivePreview(node_id, projection, fps=16, send=lambda event, data: sent.append(data),
                                   clock=lambda: now[0])
        for step in range(1, steps + 1):
            now[0] += seconds_per_step
            a = step / steps
            live(step, steps, a * clean + (1 - a) * blurred)
        live.close()
    finally:
        preview.LivePreview._recent = saved
    return sent
