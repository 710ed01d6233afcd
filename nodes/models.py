"""What travels on the ZOETROPE_MODEL / ZOETROPE_VAE / ZOETROPE_TEXT_ENCODER wires, and the facts the nodes need
about a loaded transformer: the latent space it samples in and the settings its authors recommend.

A model waits on its offload device (the CPU when it computes on a GPU) and comes onto its compute device only
for the node that uses it (`with handle.active() as module:`); memory is handed back between stages.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import host

log = logging.getLogger("zoetrope")

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
DEVICES = ("auto", "cpu", "gpu")
BUILTIN = "builtin"
GENERIC_DEFAULTS = dict(frames=33, width=480, height=480, steps=30, cfg=5.0, shift=5.0, solver="unipc", fps=16)


@dataclass(frozen=True)
class LatentFormat:
    """A VAE family's latent statistics: LATENT wires carry raw latents, the transformer samples standardised
    ones (core ComfyUI's convention, with the same numbers for Wan 2.1 and 2.2)."""
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _stats(self, z):
        import torch
        shape = (1, self.channels) + (1,) * (z.ndim - 2)
        return (torch.tensor(self.mean, device=z.device).view(shape),
                torch.tensor(self.std, device=z.device).view(shape))

    def normalize(self, z):
        """raw [B, C, T, H, W] -> standardised, float32."""
        mean, std = self._stats(z)
        return (z.float() - mean) / std

    def denormalize(self, z):
        mean, std = self._stats(z)
        return z.float() * std + mean


@dataclass(eq=False)
class Loaded:
    """A loaded module and where it runs. `module` is a WanModel, WanVAE or TextEncoder."""
    module: Any
    name: str                              # the file chosen in the loader, or "builtin"
    device: Any                            # torch.device it computes on
    offload: Any                           # torch.device it waits on
    info: Any = None                       # the checkpoint loader's ModelInfo
    latent: LatentFormat | None = None     # transformers only: the latent space they sample in
    defaults: dict = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.name == BUILTIN or getattr(self.info, "family", None) == BUILTIN

    @property
    def label(self) -> str:
        return getattr(self.info, "name", None) or self.name

    @contextmanager
    def active(self):
        """The module on its compute device for the duration of a node, back on the offload device after
        (also when the node fails or is cancelled), with the cache emptied."""
        move(self.module, self.device)
        try:
            yield self.module
        finally:
            if self.offload != self.device:
                move(self.module, self.offload)
                host.empty_cache()


def _torch_module(module):
    return getattr(module, "encoder", module)    # TextEncoder wraps its nn.Module


def move(module, device) -> None:
    """module.to(device), carrying along fp8 weight scales, which are plain attributes rather than buffers."""
    from ..pipeline import ops
    net = _torch_module(module)
    first = next(net.parameters(), None)
    if first is None or first.device == device:
        return
    host.make_room(device, sum(p.numel() * p.element_size() for p in net.parameters()))
    net.to(device)
    for m in net.modules():
        if isinstance(m, ops.Linear) and m.weight_scale is not None:
            m.weight_scale = m.weight_scale.to(device)


def compute_dtype(precision: str):
    """The dtype a model computes in for a precision choice, or None for the loaders' own default (auto, and fp8,
    which stores the big weights in fp8 and computes in the default): fp32 on a CPU; on a GPU the file's 16-bit
    precision, bf16 for other files, fp16 on GPUs without hardware bf16 (pipeline.ops.default_dtype)."""
    import torch
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def store_fp8(module) -> int:
    """Keep the blocks' Linear weights in float8_e4m3fn (up-cast per layer in forward). Weights that
    are fp8 already are left alone. Returns how many layers changed."""
    import torch
    from ..pipeline import ops
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no float8_e4m3fn; choose bf16 or fp16")
    changed = 0
    for name, m in _torch_module(module).named_modules():
        # Only the repeated blocks, as in the released fp8 files: embeddings and heads stay in full precision.
        if name.startswith("blocks.") and isinstance(m, ops.Linear) and m.weight.dtype not in ops.FP8_DTYPES:
            # e4m3fn saturates at 448; Wan's weights are far below that, so a plain cast loses only precision.
            m.weight = torch.nn.Parameter(m.weight.detach().to(fp8), requires_grad=False)
            changed += 1
    return changed


# ---------------------------------------------------------------------------------------------------------------
# Facts about a transformer

def latent_format(dit, name: str) -> LatentFormat:
    """The latent space a transformer samples in, chosen from what the weights are (never from a flag)."""
    from ..pipeline import builtin
    from ..pipeline.config import WAN21_VAE, WAN22_VAE
    info = getattr(dit, "info", None)
    family = getattr(info, "family", None)
    # A custom model (the built-in one included) records its VAE's statistics in its own file.
    settings = getattr(info, "settings", None) or {}
    if settings.get("latents_mean") and settings.get("latents_std"):
        return LatentFormat(f"{family} latents", tuple(settings["latents_mean"]), tuple(settings["latents_std"]))
    if name == BUILTIN or family == BUILTIN:
        return builtin_latent_format(builtin.VAE)
    variant = getattr(info, "variant", None)
    released = {"wan2.1": WAN21_VAE, "wan2.2": WAN22_VAE}
    vae = released.get(getattr(variant, "vae", None)) or {16: WAN21_VAE, 48: WAN22_VAE}.get(dit.config.out_dim)
    if vae is None:
        raise ValueError(
            f"{name}: a transformer with {dit.config.out_dim} latent channels, which matches no Wan VAE (16 for "
            "Wan 2.1, 48 for Wan 2.2). Store its VAE's latents_mean and latents_std in the file's zoetrope.config "
            "metadata.")
    label = "Wan 2.1 VAE" if vae is WAN21_VAE else "Wan 2.2 VAE"
    return LatentFormat(label, tuple(vae.latents_mean), tuple(vae.latents_std))


def builtin_latent_format(vae_path) -> LatentFormat:
    """The built-in VAE's statistics, read from its file's header (no weights are loaded)."""
    from ..pipeline import checkpoints
    header = checkpoints.read_header(vae_path)
    config = json.loads(header.metadata.get(checkpoints.METADATA_KEY, "{}"))
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if not mean or not std:
        raise ValueError(f"{vae_path}: the built-in VAE file has no latents_mean/latents_std in its metadata; "
                         "re-export it with `zoetrope train-builtin`")
    return LatentFormat("built-in VAE", tuple(mean), tuple(std))


def recommended(dit, name: str) -> dict:
    """The sampling settings the model's authors recommend: frames, width, height, steps, cfg, shift, solver, fps."""
    from ..pipeline import builtin
    info = getattr(dit, "info", None)
    if name == BUILTIN or getattr(info, "family", None) == BUILTIN:
        return dict(builtin.DEFAULTS)
    v = getattr(info, "variant", None)
    if v is not None:
        out = dict(frames=v.frames, width=v.width, height=v.height, steps=v.steps, cfg=v.cfg, shift=v.shift,
                   solver="unipc", fps=v.fps)
        out.update(v.extra)      # A14B: boundary, cfg_high, cfg_low
        return out
    out = dict(GENERIC_DEFAULTS)
    settings = getattr(info, "settings", None) or {}
    out.update({k: settings[k] for k in out if k in settings})
    return out


# ---------------------------------------------------------------------------------------------------------------
# A small preview of a latent, for the progress bar

def preview_image(x0, min_size: int = 128):
    """A PIL image of the middle frame of a latent estimate [B, C, T, H, W] (any latent space): three channel
    groups, each averaged and squashed to 0..1. A rough picture of layout and motion, computed in microseconds."""
    import torch
    from PIL import Image
    z = x0[0, :, x0.shape[2] // 2].float()                                  # [C, H, W]
    groups = torch.tensor_split(z, 3, dim=0) if z.shape[0] >= 3 else (z, z, z)
    rgb = torch.stack([g.mean(0) for g in groups])                            # [3, H, W]
    rgb = (rgb - rgb.mean()) / (rgb.std() + 1e-6)
    rgb = torch.sigmoid(rgb * 1.5)
    scale = max(1, -(-min_size // max(rgb.shape[1:])))
    rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)
