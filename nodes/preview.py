"""The sampler's live preview: every frame of the current estimate, projected from latent to RGB, sent to the page.

A latent pixel maps to a colour almost linearly, so a preview needs no VAE: one small matrix per latent family
(channels x RGB, plus a bias), applied to the model-space estimate x0 that the solver reports after each step. The
matrices are data (pipeline/data/latent_rgb.json): the published ones for the Wan 2.1 and Wan 2.2 latents, and one
fitted by least squares from the built-in VAE (`fit_projection`, run by benchmarks/fit_latent_rgb.py).

The frames travel as one small JPEG grid inside a `zoetrope.preview` message, together with the step, the seconds per
step and the time left; js/zoetrope.js plays them as a loop in the sampler node. Previews are spaced so that making
and sending them costs at most `budget` (3%) of the sampling time: the cost of the last one, per latent element,
predicts the next, and a preview is only made once enough sampling time has passed to pay for it.

Nothing here imports torch, PIL or ComfyUI at import time.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from . import host

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "latent_rgb.json"
EVENT = "preview"                 # reaches the page as "zoetrope.preview"
BUDGET = 0.03                     # share of sampling time previews may cost (the promise is under 5%)
PROGRESS_INTERVAL = 0.1           # seconds between progress messages without frames
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Projection:
    """rgb = x0 @ factors + bias, per latent pixel: x0 in the model's standardised latent space, rgb in -1..1."""
    family: str
    factors: tuple[tuple[float, float, float], ...]     # [C][3]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.factors)


@lru_cache(maxsize=1)
def projections() -> dict[str, Projection]:
    """The projections stored in pipeline/data/latent_rgb.json, by family."""
    table = json.loads(DATA.read_text())
    return {family: Projection(family, tuple(tuple(float(v) for v in row) for row in entry["factors"]),
                               tuple(float(v) for v in entry["bias"]))
            for family, entry in table.items() if not family.startswith("_")}


def projection_for(channels: int, builtin: bool = False) -> Projection:
    """The projection of a latent space: the built-in VAE's when fitted, else the released Wan VAE with that many
    channels (16: Wan 2.1, also used by Wan 2.2 A14B; 48: Wan 2.2). A latent space without stored factors gets a
    neutral projection (three channel groups averaged), which still shows layout and motion."""
    table = projections()
    if builtin and "builtin" in table and table["builtin"].channels == channels:
        return table["builtin"]
    if not builtin:
        for family in ("wan2.1", "wan2.2"):
            if family in table and table[family].channels == channels:
                return table[family]
    return neutral_projection(channels)


def neutral_projection(channels: int) -> Projection:
    """Each of R, G, B the mean of one third of the channels, for a latent space nobody fitted."""
    groups = [range(c * channels // 3, (c + 1) * channels // 3) or range(channels) for c in range(3)]
    factors = tuple(tuple(1.0 / len(g) if i in g else 0.0 for g in groups) for i in range(channels))
    return Projection("neutral", factors)


def latent_to_rgb(x0, projection: Projection):
    """Model-space estimate [B, C, T, H, W] -> uint8 frames [T, H, W, 3] of its first sample, at latent resolution.

    Computed where x0 lives (the GPU during sampling): only the small uint8 result comes to the CPU."""
    import torch
    if x0.ndim != 5 or x0.shape[1] != projection.channels:
        raise ValueError(f"latent {list(x0.shape)} does not fit the {projection.family} preview projection, which "
                         f"takes [B, {projection.channels}, T, H, W]")
    z = x0[0].float()                                                          # [C, T, H, W]
    factors = torch.tensor(projection.factors, dtype=z.dtype, device=z.device)  # [C, 3]
    bias = torch.tensor(projection.bias, dtype=z.dtype, device=z.device)        # [3]
    rgb = torch.einsum("cthw,ck->thwk", z, factors) + bias                      # [T, H, W, 3] in -1..1
    if projection.family == "neutral":
        # Unfitted factors have no known scale: stretch to the estimate's own spread instead.
        rgb = torch.tanh((rgb - rgb.mean()) / (2 * rgb.std() + 1e-6))
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def frame_grid(frames, quality: int = JPEG_QUALITY) -> dict:
    """uint8 frames [T, H, W, 3] -> one JPEG holding them in a grid, row by row, as the page decodes it
    (js/frames.js): {"image": base64 JPEG, "count", "columns", "frame_width", "frame_height"}."""
    from PIL import Image
    count, h, w, _ = frames.shape
    columns = min(count, max(1, math.ceil(math.sqrt(count * h / w))))         # a roughly square sheet keeps the JPEG small
    rows = math.ceil(count / columns)
    sheet = frames.new_zeros((rows * columns, h, w, 3))
    sheet[:count] = frames
    sheet = sheet.reshape(rows, columns, h, w, 3).permute(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)
    buf = io.BytesIO()
    # No chroma subsampling: a latent-resolution frame is small, and halved colour would smear its shapes.
    Image.fromarray(sheet.numpy()).save(buf, "JPEG", quality=quality, subsampling=0)
    return {"image": base64.b64encode(buf.getvalue()).decode("ascii"), "count": int(count), "columns": columns,
            "frame_width": int(w), "frame_height": int(h)}


class LivePreview:
    """The progress callback's companion in the sampler: call it after every step with (step, total, x0).

    It sends the step, the seconds per step and the time left (every step, or every PROGRESS_INTERVAL when steps
    are faster than that); when the budget allows, also the frames.
    `close()` tells the page the sampler is done, so the animation goes away (also after Cancel or an error).
    Time spent here is kept out of the seconds per step and counted against the budget.
    """

    # Seconds per latent element of the last few previews, shared by all runs. The prediction is the cheapest of
    # them: a slow outlier (a busy machine) must not starve the previews of every later run, and the budget holds
    # anyway, because it is checked against the time really spent. Before any measurement: a pessimistic guess.
    _recent: list[float] = []
    FIRST_GUESS = 2e-7

    def __init__(self, node_id, projection: Projection, fps: float, temporal_compression: int = 4,
                 send: Callable[[str, dict], None] = host.send_event, clock: Callable[[], float] = time.perf_counter,
                 budget: float = BUDGET):
        self.node_id = None if node_id is None else str(node_id)
        self.projection = projection
        self.frame_rate = float(fps) / temporal_compression      # one latent frame stands for 4 video frames
        self.send, self.clock, self.budget = send, clock, budget
        self.sampling = 0.0      # seconds in the model, between callbacks
        self.previews = 0
        self.spent = 0.0         # seconds in here
        # Once per process, PIL's JPEG encoder is loaded: a fixed cost that is not the previews' share of sampling
        # (and would otherwise hold back every preview of a short run), so it is done before the clock starts.
        _warm_up()
        self._last = clock()
        self._sent = -math.inf
        self._closed = False

    def __call__(self, step: int, total: int, x0=None) -> None:
        start = self.clock()
        self.sampling += start - self._last
        frames = x0 is not None and step < total and self._affordable(x0.numel() // max(x0.shape[0], 1))
        # Progress alone goes out at most PROGRESS_INTERVAL apart (and at the first and last step): a model that
        # takes milliseconds a step would otherwise spend its budget on messages.
        if frames or step in (1, total) or start - self._sent >= PROGRESS_INTERVAL:
            per_step = self.sampling / max(step, 1)
            message = {"node": self.node_id, "step": int(step), "total": int(total),
                       "seconds_per_step": round(per_step, 4), "eta": round(per_step * max(total - step, 0), 2)}
            if frames:
                made = self.clock()
                message.update(frame_grid(latent_to_rgb(x0, self.projection)), fps=self.frame_rate,
                               family=self.projection.family)
                self.previews += 1
                measured = (self.clock() - made) / max(1, x0.numel() // x0.shape[0])
                LivePreview._recent = (LivePreview._recent + [measured])[-5:]
            self.send(EVENT, message)
            self._sent = self.clock()
        self._last = self.clock()
        self.spent += self._last - start

    def _affordable(self, elements: int) -> bool:
        predicted = elements * min(LivePreview._recent or [LivePreview.FIRST_GUESS])
        return self.spent + predicted <= self.budget * self.sampling

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.send(EVENT, {"node": self.node_id, "done": True})

    @property
    def share(self) -> float:
        """Time spent on previews as a share of the sampling time so far."""
        return self.spent / self.sampling if self.sampling else 0.0


@lru_cache(maxsize=1)
def _warm_up() -> None:
    """Load PIL's JPEG encoder before the first step, so the first preview's time is a typical one."""
    from PIL import Image
    Image.new("RGB", (8, 8)).save(io.BytesIO(), "JPEG")


def sampler_preview(model, node_id, send: Callable[[str, dict], None] | None = None) -> LivePreview | None:
    """The live preview of a ZoetropeSampler run with `model` (a Loaded transformer), or None where no page can
    show it (outside ComfyUI or without its server, unless `send` is given)."""
    if send is None:
        if not host.can_send_events():
            return None
        send = host.send_event
    channels = model.module.config.out_dim
    fps = float((model.defaults or {}).get("fps", 16))
    return LivePreview(node_id, projection_for(channels, builtin=model.builtin), fps, send=send)


# ---------------------------------------------------------------------------------------------------------------
# Fitting a projection

def pool_to_latent_grid(video, temporal: int, spatial: int):
    """Pixels [B, 3, 1 + temporal*k, H, W] -> the mean colour under each latent pixel [B, 3, 1 + k, H/s, W/s].

    The causal VAE gives the first frame a latent frame of its own and every later latent frame the next
    `temporal` frames; each latent pixel covers a spatial x spatial square."""
    import torch
    import torch.nn.functional as F
    first, rest = video[:, :, :1], video[:, :, 1:]
    pooled = [F.avg_pool3d(first, (1, spatial, spatial))]
    if rest.shape[2]:
        pooled.append(F.avg_pool3d(rest, (temporal, spatial, spatial)))
    return torch.cat(pooled, dim=2)


def fit_projection(latents, video, temporal: int, spatial: int, family: str) -> Projection:
    """Least-squares factors and bias mapping model-space latents [B, C, T', H', W'] to the pooled colours of the
    clips they encode (video [B, 3, T, H, W] in -1..1)."""
    import torch
    target = pool_to_latent_grid(video.double(), temporal, spatial)              # [B, 3, T', H', W']
    if target.shape[2:] != latents.shape[2:] or target.shape[0] != latents.shape[0]:
        raise ValueError(f"latents {list(latents.shape)} do not match the video {list(video.shape)} pooled by "
                         f"{temporal}x{spatial}x{spatial} ({list(target.shape)}): pass the clips that were encoded")
    z = latents.double().movedim(1, -1).reshape(-1, latents.shape[1])             # [N, C]
    y = target.movedim(1, -1).reshape(-1, 3)                                     # [N, 3]
    design = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)                    # [N, C + 1]
    solution = torch.linalg.lstsq(design, y).solution                            # [C + 1, 3]
    factors = tuple(tuple(round(float(v), 5) for v in row) for row in solution[:-1])
    bias = tuple(round(float(v), 5) for v in solution[-1])
    return Projection(family, factors, bias)


def save_projection(projection: Projection, source: str, path: Path | None = None) -> None:
    """Store (or replace) one family's projection in latent_rgb.json, keeping the others."""
    path = DATA if path is None else path
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[projection.family] = {"source": source, "factors": [list(r) for r in projection.factors],
                                "bias": list(projection.bias)}
    path.write_text(dump_table(table))
    projections.cache_clear()


def dump_table(table: dict) -> str:
    """latent_rgb.json's text: indented, with each row of numbers on one line."""
    text = json.dumps(table, indent=1)
    return re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                  text) + "\n"
