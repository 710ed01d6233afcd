"""One `generate()` for every model: prompt (and optionally a first frame or a clip) in, frames out.

It reads top to bottom as the phases of the official Wan `text2video.generate`: prepare, encode text, make noise,
sample with guidance, decode. The ComfyUI nodes run the same phases one node each, through the same helpers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import sampling

log = logging.getLogger("zoetrope")

Progress = Callable[[int, int, torch.Tensor | None], None]  # (step, total, x0 estimate in model space or None)


@dataclass(frozen=True)
class Plan:
    """What a request turns into once snapped to what the model can take."""
    frames: int
    width: int
    height: int
    latent_shape: tuple[int, int, int, int]   # (z, frames', height', width')
    tokens: int
    notes: tuple[str, ...] = ()


def plan(vae, frames: int, width: int, height: int, patch: Sequence[int] = (1, 2, 2),
         size_multiple: int | None = None) -> Plan:
    """Snap a request to the nearest size the VAE and transformer can take, saying what changed.

    Frames follow the 4k+1 rule of the causal VAE; width and height must be multiples of the VAE stride times the
    transformer patch. Refuses what rounding would only hide (a size under one latent pixel).
    """
    notes = []
    tc, sc = vae.temporal_compression, vae.spatial_compression
    if frames < 1:
        raise ValueError(f"frames must be at least 1 (got {frames})")
    snapped = 1 + tc * max(0, round((frames - 1) / tc))
    if snapped != frames:
        notes.append(f"frames {frames} -> {snapped} (the VAE takes {tc}k+1 frames)")
    mult = size_multiple or sc * max(patch[1], patch[2])
    sizes = []
    for name, value in (("width", width), ("height", height)):
        if value < mult:
            raise ValueError(f"{name} {value} is too small: this model needs at least {mult} pixels "
                             f"(a multiple of {mult})")
        s = max(mult, int(round(value / mult)) * mult)
        if s != value:
            notes.append(f"{name} {value} -> {s} (a multiple of {mult})")
        sizes.append(s)
    width, height = sizes
    shape = vae.latent_shape(snapped, height, width)
    tokens = shape[1] // patch[0] * (shape[2] // patch[1]) * (shape[3] // patch[2])
    return Plan(snapped, width, height, tuple(shape), tokens, tuple(notes))


def seeded_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Noise drawn the way core ComfyUI draws it: a CPU generator seeded with the seed, one randn of the shape."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32, device="cpu")


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """IMAGE frames [T, H, W, 3] in 0..1 -> VAE input [1, 3, T, H, W] in -1..1."""
    return (frames.float() * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, T, H, W] in -1..1 -> IMAGE frames [B*T, H, W, 3] in 0..1."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[-2:], 3)


def make_denoiser(dit, cond: list[torch.Tensor], uncond: list[torch.Tensor] | None, cfg: float, *,
                  integer_timesteps: bool, pinned: torch.Tensor | None = None, pinned_mask: torch.Tensor | None = None,
                  image_condition: torch.Tensor | None = None, experts=None, should_stop=None):
    """The closure the solvers call: model(x, sigma) -> guided velocity, in float32 model space.

    pinned / pinned_mask: a clean first latent frame held fixed (TI2V and the built-in model): the pinned tokens get
    timestep 0 and their latent is reset before every call. image_condition: the 20 extra channels (mask + image
    latents) that Wan's in_dim-36 image-to-video models take by concatenation. experts: (high, low, boundary,
    cfg_high, cfg_low): the network and guidance scale at timesteps at or above the boundary, and below it (Wan 2.2
    A14B's two experts; one model with two guidance scales passes itself twice).
    """
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if should_stop is not None:
            should_stop()
        t = sampling.timesteps(sigma.reshape(1), integer=integer_timesteps).float().to(x.device)
        net, scale = dit, cfg
        if experts is not None:
            high, low, boundary, cfg_high, cfg_low = experts
            net, scale = (high, cfg_high) if sampling.expert_for(t.item(), boundary) == "high" else (low, cfg_low)
        if pinned is not None:
            x = x * pinned_mask + pinned * (1 - pinned_mask)
            tt = sampling.token_timesteps(t.expand(x.shape[0]), pinned_mask[:, 0], patch=net.config.patch_size)
        else:
            tt = t.expand(x.shape[0])
        inp = x if image_condition is None else torch.cat([x, image_condition], dim=1)
        dtype = next(p.dtype for p in net.parameters() if p.is_floating_point() and p.element_size() > 1)
        inp = inp.to(dtype)
        v_c = net(inp, tt, cond).float()
        if uncond is not None and sampling.needs_uncond(scale):
            v_u = net(inp, tt, uncond).float()
            v = sampling.guided(v_c, v_u, scale)
        else:
            v = v_c
        if pinned is not None:
            v = v * pinned_mask  # the pinned frame does not move
        return v
    return model


def sample(dit, noise: torch.Tensor, cond: list[torch.Tensor], uncond: list[torch.Tensor] | None, *, steps: int,
           cfg: float, shift: float, solver: str = "unipc", first_latent: torch.Tensor | None = None,
           image_condition: torch.Tensor | None = None, init_latent: torch.Tensor | None = None,
           denoise: float = 1.0, experts=None, high_noise_cfg: float | None = None,
           boundary: float = sampling.GUIDANCE_BOUNDARY, seed: int = 0, progress: Progress | None = None,
           should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """Phase 4 of generate(), shared with the sampler node: noise [B, C, F, H, W] -> clean latent, all in the
    model's normalised latent space. `seed` seeds the noise a stochastic solver adds on the way (the clip's
    seed: same seed, same clip).

    high_noise_cfg: the guidance scale while the timestep is at or above `boundary` (x 1000; `cfg` below it), as
    Wan 2.2 A14B's two experts each have their own; None = `cfg` throughout. Ignored with `experts`, which carry
    their own scales and boundary.

    first_latent [B or 1, C, 1, H, W]: a clean first latent frame to pin (TI2V, the built-in model).
    image_condition: the in_dim-36 models' extra channels. init_latent [B or 1, C, F, H, W]: a clip to restyle,
    noised to the first sigma left after `denoise` (video-to-video). cond / uncond: one [L, D] row per sample.
    """
    pinned = pinned_mask = None
    if first_latent is not None:
        pinned = torch.zeros_like(noise)
        pinned[:, :, :1] = first_latent.to(noise)
        pinned_mask = torch.ones_like(noise)
        pinned_mask[:, :, :1] = 0
    if experts is None and high_noise_cfg is not None and high_noise_cfg != cfg:
        experts = (dit, dit, boundary, high_noise_cfg, cfg)
    sigmas = sampling.default_sigmas(solver, steps, shift)
    x = noise
    if init_latent is not None:
        x0 = init_latent.to(noise).expand_as(noise)
        sigmas = sampling.sigmas_for_denoise(sigmas, denoise)
        x = sampling.noise_latent(x0, noise, sigmas[0]) if len(sigmas) > 1 else x0
    if pinned is not None:
        x = x * pinned_mask + pinned * (1 - pinned_mask)

    model = make_denoiser(dit, cond, uncond, cfg, integer_timesteps=(solver == "unipc"), pinned=pinned,
                          pinned_mask=pinned_mask, image_condition=image_condition, experts=experts,
                          should_stop=should_stop)
    callback = None if progress is None else (lambda step, total, x_now, x0_est: progress(step, total, x0_est))
    extra = {"seed": seed} if solver in sampling.STOCHASTIC else {}
    if len(sigmas) > 1:
        x = sampling.SOLVERS[solver](model, x, sigmas, callback=callback, **extra)
    if pinned is not None:
        x = x * pinned_mask + pinned * (1 - pinned_mask)
    return x


@torch.no_grad()
def generate(dit, vae, text_encoder, prompt: str, *, negative_prompt: str = "", seed: int = 0,
             frames: int = 17, width: int = 64, height: int = 64, steps: int = 20, cfg: float = 5.0,
             shift: float = 3.0, solver: str = "unipc", first_frame: torch.Tensor | None = None,
             init_video: torch.Tensor | None = None, denoise: float = 1.0, experts=None,
             progress: Progress | None = None, should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """Make a clip. Returns IMAGE frames [T, H, W, 3] in 0..1.

    first_frame: IMAGE [1, H, W, 3] to start from (image-to-video); init_video: IMAGE [T, H, W, 3] to restyle
    (video-to-video, with denoise < 1). should_stop() raises to cancel; progress(step, total, x0) after each step.
    """
    # 1. Prepare: snap the request to what the model takes.
    p = plan(vae, frames, width, height, patch=dit.config.patch_size)
    for note in p.notes:
        log.warning("adjusted: %s", note)
    device = next(dit.parameters()).device

    # 2. Encode text (the negative prompt only when guidance needs it).
    cond = [e.to(device) for e in text_encoder.encode([prompt])]
    uncond = None
    if sampling.needs_uncond(cfg):
        uncond = [e.to(device) for e in text_encoder.encode([negative_prompt])]

    # 3. Noise, in the model's (normalised) latent space.
    noise = seeded_noise((1, *p.latent_shape), seed).to(device)

    first_latent = image_condition = init_latent = None
    if first_frame is not None:
        image = fit_image(first_frame, p.width, p.height)
        if dit.config.in_dim == dit.config.out_dim:          # TI2V-style: pin a clean first latent frame
            first_latent = vae.normalize(vae.encode(frames_to_video(image).to(device, _dtype(vae))).float())
        else:                                                 # Wan in_dim 36: mask + image latents by concatenation
            image_condition = _i2v_condition(vae, image, p, device)
    if init_video is not None:
        clip = fit_video(init_video, p)
        init_latent = vae.normalize(vae.encode(frames_to_video(clip).to(device, _dtype(vae))).float())

    # 4. Sample with guidance.
    x = sample(dit, noise, cond, uncond, steps=steps, cfg=cfg, shift=shift, solver=solver,
               first_latent=first_latent, image_condition=image_condition, init_latent=init_latent,
               denoise=denoise, experts=experts, seed=seed, progress=progress, should_stop=should_stop)

    # 5. Decode.
    video = vae.decode(vae.denormalize(x).to(_dtype(vae)), callback=_vae_callback(should_stop))
    return video_to_frames(video)


def _dtype(module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _vae_callback(should_stop):
    if should_stop is None:
        return None
    return lambda done, total: should_stop()


def fit_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a start image [1, H, W, 3] to the clip's size, centre-cropping to keep its aspect ratio."""
    image = image[:1].float()
    h, w = image.shape[1:3]
    if (h, w) == (height, width):
        return image
    target, source = width / height, w / h
    if not math.isclose(target, source, rel_tol=0.01):
        log.warning("start image %dx%d has another aspect ratio than the clip %dx%d: centre-cropped", w, h, width,
                    height)
        if source > target:
            cw = round(h * target)
            image = image[:, :, (w - cw) // 2:(w - cw) // 2 + cw]
        else:
            ch = round(w / target)
            image = image[:, (h - ch) // 2:(h - ch) // 2 + ch]
    chw = image.permute(0, 3, 1, 2)
    chw = torch.nn.functional.interpolate(chw, size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)
    return chw.permute(0, 2, 3, 1).clamp(0, 1)


def fit_video(video: torch.Tensor, p: Plan) -> torch.Tensor:
    frames = [fit_image(video[i:i + 1], p.width, p.height) for i in range(min(len(video), p.frames))]
    while len(frames) < p.frames:          # too short: hold the last frame
        frames.append(frames[-1])
    return torch.cat(frames)


def _i2v_condition(vae, image: torch.Tensor, p: Plan, device) -> torch.Tensor:
    """Wan's image-to-video conditioning: 4 mask channels (1 on the given frame) + latents of [image, zeros...]."""
    clip = torch.cat([image, torch.full((p.frames - 1, *image.shape[1:]), 0.5)])   # 0.5 -> 0 in VAE space
    y = vae.normalize(vae.encode(frames_to_video(clip).to(device, _dtype(vae))).float())
    z, tl, hl, wl = p.latent_shape
    tc = vae.temporal_compression
    mask = torch.zeros(1, tc * (tl - 1) + tc, hl, wl, device=device)
    mask[:, :tc] = 1  # the first frame stands for the first latent frame's tc slots
    mask = mask.view(1, tl, tc, hl, wl).transpose(1, 2)   # [1, tc, tl, hl, wl]
    return torch.cat([mask, y], dim=1)
