"""Train the built-in model from nothing: `zoetrope train-builtin`.

Stages, each resumable (a checkpoint every few minutes; a finished stage is skipped on the next run):
  1. vae         a small Wan 2.2-style causal VAE (residual stages), 4x in time and 4x in space (Wan 2.1's is
                 4x8x8): 64x64 frames to 16x16 latents; trained on Shapes World clips of 1 to 17 frames, mostly crops
     wide-decoder the exported decoder, twice as wide, trained from scratch on the frozen encoder (train_wide_decoder)
     decoder     (when Budget.decoder_steps > 0, with the VAE stage) the decoder alone tuned against a patch critic on
                 perturbed latents, so that the transformer's drawn latents decode to straight outlines (tune_decoder)
  2. latents     the tokenizer (SentencePiece over the world's words, stored in the text-encoder file) and a pool
                 of clips encoded once by the frozen encoder (their prompts are redrawn every time)
  3. transformer a Wan-architecture DiT and a umT5-architecture text encoder, trained together by flow matching,
                 for text-to-video and for first-frame image-to-video (a clean first latent frame pinned with
                 per-token timesteps, as Wan 2.2 TI2V does); run as two halves of one schedule, transformer-1
                 and transformer-2, so that no stage runs over 90 minutes on a 2-core CPU
  4. export      the three safetensors files the loaders read

Everything is seeded. One command runs them all:
    zoetrope train-builtin --work builtin-training
Measured on a 2-core CPU with native bf16 (AVX512-BF16: autocast computes in bf16, ops.bf16_native), the run
that made the shipped weights: VAE 18.5 min (2500 steps), wide decoder 20.5 min (2000 steps), decoder tuning 11 min
(the VAE stage 50 min), latent pool 1.7 min, transformer 56 min (its halves 28 and 27.5 min); 1 h 48 min in all.
A 2-core AVX-512 CPU without native bf16 trains in fp32, about twice as long: over 3 hours (the recipe with a
16-channel decoder only took 2 h 56 min there). One with AVX2 only takes several times as long. `--only
STAGE` runs one stage. A GPU, when present, is used and takes minutes.
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import builtin, ops, sampling
from ..config import DiTConfig, TextEncoderConfig, VAEConfig
from ..dit import WanModel
from ..text_encoder import TextEncoder, UMT5Encoder
from ..tokenizer import Tokenizer, clean_prompt
from ..vae import WanVAE
from . import evaluate, scene as world

log = logging.getLogger("zoetrope.train")

# The built-in model's architecture: Wan's classes at small sizes. The VAE compresses 4x in space (64x64 ->
# 16x16) rather than Wan 2.1's 8x, because an object of 0.2 W is 13 pixels and must keep its shape. Its stages are
# Wan 2.2's residual ones (a parameter-free shortcut around each down/up stage): rendered clips encoded and decoded
# (48 single-object clips, 2400 steps, benchmarks/latent_space.py's measure) came back with every attribute right in
# 75% against 48% for the same channels without the shortcuts, and 31% for twice the channels without them.
# The exported decoder has twice the encoder's channels: with 16 it drew moving squares and triangles rounder than
# their codes say (moving triangles encoded and decoded: 54% right against 77% with 32; generated clips' shape 69.5%
# -> 77.5%, docs/built-in-model-recipe.md), and decoding is the cheap end of generation. The VAE stage trains the
# encoder with a decoder of JOINT_DECODER_DIM channels, and the wide one is then trained on the frozen encoder
# (train_wide_decoder): trained with the encoder from the start, the wide decoder reached shape 69% in a full run.
VAE_CONFIG = VAEConfig(dim=16, dec_dim=32, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1,
                       temporal_downsample=(True, True), residual=True)
JOINT_DECODER_DIM = 16
TEXT_CONFIG = TextEncoderConfig(vocab_size=256, dim=128, dim_attn=128, dim_ffn=256, num_heads=4, num_layers=2,
                                num_buckets=32, max_distance=64)
DIT_CONFIG = DiTConfig(dim=192, ffn_dim=768, num_heads=3, num_layers=6, in_dim=16, out_dim=16,
                       text_dim=TEXT_CONFIG.dim, text_len=48, freq_dim=256)


@dataclass(frozen=True)
class Budget:
    """Steps per stage and the recipe's settings (what each stage takes on a 2-core CPU: the module's docstring).
    --smoke runs seconds.

    Every setting here was measured against its alternatives; docs/built-in-model-recipe.md has the figures,
    including what did not help. In short: the transformer is what the budget is shortest of, so its steps and
    learning rate count most (1e-3; 2e-3 reached a lower loss but drew worse clips). Training's noise levels follow
    the sampler's shift 8, which made the motion words decide (text-to-video motion 59% to 92%); the text encoder's
    object-phrase loss binds each motion to its object (two objects' motions 38.5% to 76%). Half the pool starts
    its objects anywhere, so the words are the only cue to the direction. Shape is what the recipe is weakest at:
    the shape probe, the decoder blur and tuning, the outline weight and sharpening lifted single-object shapes from
    36% to 57.5%, and what still rounds moving shapes is the VAE's coding of motion and the animation. The VAE
    trains on its exact codes: with the residual stages its latent space is smooth enough that the transformer's
    imperfect codes decode right, and noise on the codes in training only cost sharpness."""
    vae_steps: int = 2500
    vae_batch: int = 12
    vae_crop: int = 32
    pool_clips: int = 4000
    dit_steps: int = 4000
    dit_batch: int = 11          # clips a step; small batches, many steps: a CPU's samples go furthest that way
    image_batch: int = 32        # first frames a step, trained as 1-frame videos (Wan's image-video joint training)
    lr_vae: float = 1e-3
    lr_dit: float = 1e-3
    i2v_share: float = 0.5       # share of training clips with a pinned clean first frame (generate's default path)
    forcing_share: float = 0.3   # share with a noise level of its own on every latent frame (see _flow_loss)
    uncond_share: float = 0.1    # share trained with an empty prompt, for classifier-free guidance
    vae_anchor: float = 0.02     # weight of _anchor_loss: each latent frame coded like the picture it ends on
    free_start_share: float = 0.5  # pool clips whose objects start anywhere (see _free_start)
    object_weight: float = 4.0   # extra loss weight on the latent positions of objects (see _latent_object_weight)
    outline_weight: float = 8.0  # extra loss weight on objects' edge cells (_latent_object_weight)
    ema: float = 0.999
    shift: float = builtin.DEFAULTS["shift"]   # training's noise levels are drawn through the sampler's shift
    vae_shape_probe: float = 0.5      # weight of _shape_probe_loss in the VAE stage; alone it made the transformer
                                      # read the shape word but not draw shapes; with vae_decoder_blur it draws them
    vae_decoder_blur: float = 0.5     # share of VAE steps whose decoder reads blurred latents (_blur_latent)
    sharpen_share: float = 0.3   # share of transformer samples noised from a blurred latent, to be sharpened (see
                                 # _flow_loss)
    wide_decoder_steps: int = 2000  # steps of train_wide_decoder after the joint VAE (0: VAE_CONFIG's decoder trains
                                    # with the encoder instead)
    decoder_steps: int = 1200    # steps of tune_decoder after the VAE stage
    decoder_critic: float = 1.0  # the patch critic's weight in tune_decoder, relative to VQGAN's adaptive one
    clause_weight: float = 0.1   # weight of the text encoder's object-phrase loss (ClauseProbe): it took
                                 # text-to-video motion from 77.5% to 93%, and two objects' from 38.5% to 76%
    stats_clips: int = 64        # clips whose latents give the per-channel mean and std


SMOKE = Budget(vae_steps=3, vae_batch=2, pool_clips=8, dit_steps=3, dit_batch=4,
               image_batch=4, stats_clips=4, decoder_steps=2, wide_decoder_steps=2)

SIZE, FRAMES = 64, 17


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    # bf16 where the hardware has it (ops.bf16_native): several times faster than fp32 on GPUs and CPUs with
    # AVX512-BF16. Elsewhere fp32: on an AVX2-only CPU bf16 is emulated, and a transformer step took 30 s against
    # 2.0 s in fp32 (a VAE step 80 s); on AVX-512 without the bf16 instructions a VAE step took 0.93-1.1 s against
    # 0.61 s in fp32.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ops.bf16_native(device))


class Stage:
    """A resumable loop: `state` is saved to work/NAME.pt every few minutes and on completion."""

    def __init__(self, work: Path, name: str):
        self.path = work / f"{name}.pt"
        self.done_path = work / f"{name}.done"
        self.name = name

    @property
    def done(self) -> bool:
        return self.done_path.exists()

    def load(self):
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def restore(self, module: torch.nn.Module, weights: dict) -> None:
        """Load a checkpoint's weights into `module`, or say what to do when an earlier recipe saved another shape."""
        try:
            module.load_state_dict(weights)
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise RuntimeError(
                f"{self.path} holds a {type(module).__name__} of another shape than this version of train-builtin "
                f"trains ({detail}); train into a new --work folder, or delete {self.path.name} and "
                f"{self.done_path.name} to redo the '{self.name}' stage") from e

    def save(self, state: dict, done: bool = False):
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        if done:
            self.done_path.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))


def _clips(rng: np.random.Generator, n: int, frames: int, crop: int | None = None,
           shapes: bool = False) -> tuple[torch.Tensor, list, torch.Tensor | None]:
    """n random clips [n, 3, T, H, W] in -1..1, their scenes (one or two objects) and, with `shapes`, each pixel's
    world.shape_map [n, T, H, W] (else None).

    With `crop`, each clip is cut to crop x crop pixels around one of its objects' first position (jittered): the
    VAE is convolutional, and a quarter of the pixels trains four times faster at the same scale of objects.
    """
    scenes = [world.sample_scene(rng, 1 if rng.random() < 0.6 else 2) for _ in range(n)]
    video = np.stack([world.render(s, size=SIZE, frames=frames) for s in scenes])        # [n, T, H, W, 3] uint8
    maps = np.stack([world.shape_map(s, size=SIZE, frames=frames) for s in scenes]) if shapes else None
    if crop is not None:
        corners = []
        for s in scenes:
            cx, cy = s.objects[rng.integers(len(s.objects))].start
            x0 = int(np.clip(cx * SIZE - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, SIZE - crop))
            y0 = int(np.clip(cy * SIZE - crop / 2 + rng.integers(-crop // 3, crop // 3 + 1), 0, SIZE - crop))
            corners.append((y0, x0))
        video = np.stack([v[:, y:y + crop, x:x + crop] for v, (y, x) in zip(video, corners)])
        if shapes:
            maps = np.stack([m[:, y:y + crop, x:x + crop] for m, (y, x) in zip(maps, corners)])
    return evaluate.to_video(video), scenes, None if maps is None else torch.from_numpy(maps)


def _object_weight(video: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: objects and their edges count 8x the background, which fills most of the frame."""
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values[..., None, None]                                     # [n, 3, T, 1, 1]
    fg = ((video - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
    fg = F.max_pool3d(fg, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))               # include edges
    return 1 + 7 * fg


def _reconstruction_loss(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """The VAE's loss to a rendered clip, in train_vae and tune_decoder: L1 + L2, objects weighted (_object_weight)."""
    w = _object_weight(video)
    return (w * (recon - video).abs()).mean() + (w * (recon - video) ** 2).mean()


class ShapeProbe(torch.nn.Module):
    """A linear read-out of each latent cell's shape (background, circle, square, triangle) along unit-length
    directions, so that the encoder has to move the code by a fixed distance, not just a probe grow its weights."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.read = torch.nn.Linear(z_dim, 1 + len(world.SHAPES))

    def forward(self, z: torch.Tensor) -> torch.Tensor:                         # [B, z, T, h, w] -> [B, 4, T, h, w]
        w = F.normalize(self.read.weight, dim=1)
        return torch.einsum("bzthw,kz->bkthw", z, w) + self.read.bias.view(1, -1, 1, 1, 1)


def _shape_probe_loss(probe: ShapeProbe, mu: torch.Tensor, maps: torch.Tensor, tc: int, sc: int) -> torch.Tensor:
    """Cross-entropy of the probe's read-out of every latent cell against the share of the cell each shape covers
    in the frame the cell's chunk ends on (frames 0, tc, 2 tc, ...); object cells count 8x.

    Why: the transformer learns colour (a code over the object's cells) quickly and shape (the outline, a detail
    inside a cell or two) barely; a code that names the shape in every object cell makes shape a colour-like
    attribute for it to draw."""
    idx = list(range(0, maps.shape[1], tc))
    onehot = F.one_hot(maps[:, idx], 1 + len(world.SHAPES)).permute(0, 4, 1, 2, 3).float()   # [B, 4, T', H, W]
    target = F.avg_pool3d(onehot, kernel_size=(1, sc, sc)).to(mu.device)                    # [B, 4, T', h, w]
    logp = F.log_softmax(probe(mu.float()), dim=1)
    weight = 1 + 7 * (1 - target[:, :1])
    return (-(target * logp).sum(1, keepdim=True) * weight).sum() / weight.sum()


def train_vae(work: Path, budget: Budget, seed: int, device: torch.device, progress) -> WanVAE:
    """Stage 1: encoder and decoder together, on clips of 1 to 17 frames (mostly crops around objects), by
    object-weighted L1 + L2, a small latent penalty and the anchor loss."""
    torch.manual_seed(seed)
    vae = WanVAE(joint_vae_config(budget)).to(device)
    probe = ShapeProbe(VAE_CONFIG.z_dim).to(device) if budget.vae_shape_probe > 0 else None
    params = list(vae.parameters()) + (list(probe.parameters()) if probe is not None else [])
    stage, rng = Stage(work, "vae"), np.random.default_rng(seed)
    opt = torch.optim.AdamW(params, lr=budget.lr_vae, weight_decay=1e-4, betas=(0.9, 0.99))
    step = 0
    state = stage.load()
    if state is not None:
        stage.restore(vae, state["model"])
        if stage.done:
            return vae.eval()
        if probe is not None:
            probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
    vae.train()
    last_save, bar = time.time(), progress(budget.vae_steps, stage.name, step)
    while step < budget.vae_steps:
        lr = _set_cosine_lr(opt, step, budget.vae_steps, budget.lr_vae, warmup=100)
        video, maps, blur = _vae_batch(rng, step, budget, shapes=probe is not None)
        video = video.to(device)
        with _autocast(device):
            mu = vae.encode(video)
            recon = vae.decode(_blur_latent(mu) if blur else mu, clamp=False).float()
        loss = _reconstruction_loss(recon, video) + 1e-4 * mu.float().pow(2).mean()
        if budget.vae_anchor > 0 and mu.shape[2] > 1:
            loss = loss + budget.vae_anchor * _anchor_loss(vae, video, mu)
        probe_loss = None
        if probe is not None:
            probe_loss = _shape_probe_loss(probe, mu, maps, vae.temporal_compression, vae.spatial_compression)
            loss = loss + budget.vae_shape_probe * probe_loss
        _optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            log.info("vae step %d loss %.5f%s", step, loss.item(),
                     "" if probe_loss is None else f" (shape probe cross-entropy {probe_loss.item():.4f})")
        if time.time() - last_save > 180 or step == budget.vae_steps:
            stage.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng,
                        **({"probe": probe.state_dict()} if probe is not None else {})},
                       done=step == budget.vae_steps)
            last_save = time.time()
    bar.close()
    return vae.eval()


def joint_vae_config(budget: Budget) -> VAEConfig:
    """The VAE the VAE stage trains: VAE_CONFIG, with a JOINT_DECODER_DIM decoder when a wide one follows."""
    return replace(VAE_CONFIG, dec_dim=JOINT_DECODER_DIM) if budget.wide_decoder_steps > 0 else VAE_CONFIG


def _vae_batch(rng: np.random.Generator, step: int, budget: Budget, shapes: bool):
    """One VAE training batch: (video, shape maps or None, whether the decoder reads blurred latents)."""
    # Single frames, and clips of two to five chunks: later chunks read the causal cache of an earlier chunk that
    # was itself not the first, which a 5-frame clip never shows; whole 17-frame clips keep the last chunks from
    # drifting.
    t = int(rng.choice((1, 5, 9, 17), p=(0.1, 0.4, 0.3, 0.2)))
    # Mostly crops around objects; every fourth step whole frames, so the borders and the mid-block's attention
    # also see the full picture. Longer clips get smaller batches: about the same pixels a step.
    whole = step % 4 == 3
    batch = max(1, budget.vae_batch * 5 // max(t, 5) // (2 if whole else 1))
    video, _, maps = _clips(rng, batch, t, crop=None if whole else budget.vae_crop, shapes=shapes)
    blur = budget.vae_decoder_blur > 0 and rng.random() < budget.vae_decoder_blur
    return video, maps, blur


def train_wide_decoder(work: Path, joint: WanVAE, budget: Budget, seed: int, device: torch.device,
                       progress) -> WanVAE:
    """Stage 1a: VAE_CONFIG's (wider) decoder from scratch on the VAE stage's frozen encoder, by the VAE stage's
    clips, loss and decoder blur. Returns the VAE of VAE_CONFIG: that encoder, this decoder.

    Why from scratch on a frozen encoder: its every step is spent on the one latent space the transformer will be
    trained on. A 32-channel decoder trained this way on a finished encoder took generated clips' shape from 69.5%
    to 77.5%; trained with the encoder from the start, 69% (docs/built-in-model-recipe.md)."""
    stage = Stage(work, "wide-decoder")
    torch.manual_seed(seed + 3)
    vae = WanVAE(VAE_CONFIG).to(device)
    vae.encoder.load_state_dict(joint.encoder.state_dict())
    vae.conv1.load_state_dict(joint.conv1.state_dict())
    params = _decoder_only(vae)
    opt = torch.optim.AdamW(params, lr=budget.lr_vae, weight_decay=1e-4, betas=(0.9, 0.99))
    step, rng = 0, np.random.default_rng(seed + 3)
    state = stage.load()
    if state is not None:
        stage.restore(vae, state["model"])
        if stage.done:
            vae.requires_grad_(True)
            return vae.eval()
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
    vae.train()
    last_save, bar = time.time(), progress(budget.wide_decoder_steps, stage.name, step)
    while step < budget.wide_decoder_steps:
        lr = _set_cosine_lr(opt, step, budget.wide_decoder_steps, budget.lr_vae, warmup=100)
        video, _, blur = _vae_batch(rng, step, budget, shapes=False)
        video = video.to(device)
        with _autocast(device):
            with torch.no_grad():
                mu = vae.encode(video)
            recon = vae.decode(_blur_latent(mu) if blur else mu, clamp=False).float()
        loss = _reconstruction_loss(recon, video)
        _optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            log.info("wide decoder step %d loss %.5f", step, loss.item())
        if time.time() - last_save > 180 or step == budget.wide_decoder_steps:
            stage.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng},
                       done=step == budget.wide_decoder_steps)
            last_save = time.time()
    bar.close()
    vae.requires_grad_(True)
    return vae.eval()


def _decoder_only(vae: WanVAE) -> list[torch.nn.Parameter]:
    """Freeze the encoder side of `vae` (its latents keep their meaning) and return the decoder side's parameters,
    the ones to train. The caller sets vae.requires_grad_(True) again when done."""
    params = list(vae.conv2.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def _blur_latent(z: torch.Tensor) -> torch.Tensor:
    """Each latent frame of z [B, z, T, h, w] blurred in space by [1, 2, 1] x [1, 2, 1] (edges repeated).

    Why: a decoder trained on exact codes draws an object's outline from its exact layout over a few cells, which
    the transformer never draws exactly, so drawn squares and triangles came out as round blobs; one that must also
    draw the picture from blurred codes has to read the outline from what each cell codes (with the shape probe: its
    shape)."""
    c = z.shape[1]
    k = torch.tensor([1.0, 2.0, 1.0], device=z.device, dtype=z.dtype)
    kernel = (k[:, None] * k[None, :] / 16).expand(c, 1, 1, 3, 3)
    return F.conv3d(F.pad(z, (1, 1, 1, 1, 0, 0), mode="replicate"), kernel, groups=c)


class PatchCritic(torch.nn.Module):
    """Tells decoded frames from rendered ones patch by patch, for tune_decoder. Each output reads about 26 pixels:
    a small object whole, a large one's corner and edges."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(32, 64, 4, 2, 1), nn.GroupNorm(8, 64), nn.LeakyReLU(0.2),
                                 nn.Conv2d(64, 128, 3, 1, 1), nn.GroupNorm(8, 128), nn.LeakyReLU(0.2),
                                 nn.Conv2d(128, 1, 3, 1, 1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:               # [B, 3, T, H, W] -> [B*T, 1, H/4, W/4]
        return self.net(video.transpose(1, 2).flatten(0, 1))


def _warp_latent(z: torch.Tensor, amplitude: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each frame of each latent [B, z, T, h, w] displaced by a smooth random field (3 x 3 control points) whose
    largest shift is amplitude[b] cells; edges repeated."""
    b, c, t, h, w = z.shape
    field = F.interpolate(torch.randn(b * t, 2, 3, 3, generator=gen), size=(h, w), mode="bicubic", align_corners=True)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    field = (field * amplitude.repeat_interleave(t).view(-1, 1, 1, 1)).to(z.device)
    field = field * torch.tensor([2 / w, 2 / h], device=z.device).view(1, 2, 1, 1)        # cells -> grid units
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=z.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=z.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None] + field.permute(0, 2, 3, 1)
    frames = z.transpose(1, 2).reshape(b * t, c, h, w)
    moved = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved.reshape(b, t, c, h, w).transpose(1, 2)


def _perturb_latent(mu: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What tune_decoder's decoder reads: each latent warped by up to 0.6 cells (60% of them), blurred (half) and
    noised per cell by up to half of each channel's spread: a layout a little off, soft and noisy, like the
    transformer's drawn latents, whose shape code is right where their layout is not."""
    b = mu.shape[0]
    spread = mu.transpose(0, 1).flatten(1).std(dim=1).view(1, -1, 1, 1, 1)
    amplitude = torch.rand(b, generator=gen) * 0.6 * (torch.rand(b, generator=gen) < 0.6)
    z = _warp_latent(mu, amplitude, gen)
    blur = (torch.rand(b, generator=gen) < 0.5).view(-1, 1, 1, 1, 1).to(mu.device)
    z = torch.where(blur, _blur_latent(z), z)
    scale = (0.5 * torch.rand(b, 1, 1, 1, 1, generator=gen)).to(mu.device)
    return z + torch.randn(z.shape, generator=gen).to(mu.device) * spread * scale


def tune_decoder(work: Path, vae: WanVAE, budget: Budget, seed: int, device: torch.device, progress) -> WanVAE:
    """Stage 1b: the decoder alone (the encoder frozen, so the latents keep their meaning), on perturbed latents
    (_perturb_latent) of single frames and 5-frame clips, by the VAE's object-weighted L1 + L2 to the rendered
    frames plus a patch critic's hinge loss, weighted as VQGAN does (the ratio of the two losses' gradient norms at
    the decoder's last layer, times decoder_critic).

    Why: the transformer draws the right shape code on a layout a little off, and a decoder trained by regression
    alone draws what the layout says, wobbly edges and rounded corners; one that must also fool a critic draws
    straighter outlines (benchmarks/picture_training.py)."""
    stage = Stage(work, "decoder")
    state = stage.load()
    if state is not None and stage.done:
        stage.restore(vae, state["model"])
        return vae.eval()
    torch.manual_seed(seed + 5)
    critic = PatchCritic().to(device)
    params = _decoder_only(vae)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
    opt_critic = torch.optim.AdamW(critic.parameters(), lr=4e-4, betas=(0.5, 0.9), weight_decay=0.0)
    step, rng, gen = 0, np.random.default_rng(seed + 5), torch.Generator().manual_seed(seed + 5)
    if state is not None:
        stage.restore(vae, state["model"])
        critic.load_state_dict(state["critic"])
        opt.load_state_dict(state["opt"])
        opt_critic.load_state_dict(state["opt_critic"])
        step, rng = state["step"], state["rng"]
        gen.set_state(state["gen"])
    last_layer = vae.decoder.head[2].weight
    critic_from = min(100, budget.decoder_steps // 10)
    vae.train()
    last_save, bar = time.time(), progress(budget.decoder_steps, stage.name, step)
    while step < budget.decoder_steps:
        frames = 1 if rng.random() < 0.5 else 5
        whole = step % 4 == 3
        n = (16 if frames == 1 else 12) // (2 if whole else 1)
        video, _, _ = _clips(rng, n, frames, crop=None if whole else budget.vae_crop)
        video = video.to(device)
        with torch.no_grad(), _autocast(device):
            mu = vae.encode(video).float()
        with _autocast(device):
            recon = vae.decode(_perturb_latent(mu, gen), clamp=False).float()
        loss = rec = _reconstruction_loss(recon, video)
        critic.requires_grad_(False)          # the decoder's step: no gradients for the critic, which steps below
        if step >= critic_from:
            fool = -critic(recon).mean()
            g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0].norm()
            g_fool = torch.autograd.grad(fool, last_layer, retain_graph=True)[0].norm()
            loss = rec + budget.decoder_critic * (g_rec / (g_fool + 1e-4)).clamp(max=1e4).detach() * fool
        _optimizer_step(opt, loss, params)
        critic.requires_grad_(True)
        critic_loss = F.relu(1 - critic(video)).mean() + F.relu(1 + critic(recon.detach())).mean()
        opt_critic.zero_grad(set_to_none=True)
        critic_loss.backward()
        opt_critic.step()
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", critic=f"{critic_loss.item():.3f}")
        if step % 100 == 0:
            log.info("decoder step %d reconstruction %.5f critic %.4f", step, rec.item(), critic_loss.item())
        if time.time() - last_save > 180 or step == budget.decoder_steps:
            stage.save({"model": vae.state_dict(), "critic": critic.state_dict(), "opt": opt.state_dict(),
                        "opt_critic": opt_critic.state_dict(), "step": step, "rng": rng, "gen": gen.get_state()},
                       done=step == budget.decoder_steps)
            last_save = time.time()
    bar.close()
    vae.requires_grad_(True)
    return vae.eval()


def _background_code(latent: torch.Tensor) -> torch.Tensor:
    """Each latent frame's background code [B, z, T, 1, 1] of latents [B, z, T, H, W]: its per-channel median over
    positions (objects cover a few of them)."""
    return latent.flatten(3).median(dim=3).values[..., None, None]


def _anchor_loss(vae: WanVAE, video: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between each latent frame of a clip and the code of the frame its chunk ends on
    (frames 0, 4, 8, ...) encoded alone as a picture, that code held fixed.

    Why: a causal video VAE codes the first latent frame from one picture and each later one from four frames, and
    reconstruction alone lets it code the same object differently in each (measured: median cosine 0.2-0.35 between
    an object's code in frame 0 and in later frames, often opposite). The transformer then cannot carry an object
    from one latent frame into the next, which image-to-video and a steady clip need. With this term the cosine is
    ~0.95 at the same reconstruction quality (benchmarks/latent_space.py). Keep it a plain, small distance to a
    fixed target, with fixed-size latent noise: versions with the target free or the distance divided by the
    latents' spread were met by coding every clip as one constant."""
    tc = vae.temporal_compression
    idx = list(range(0, video.shape[2], tc))                                     # one frame a chunk: its last
    n, c, k = video.shape[0], video.shape[1], len(idx)
    stills = video[:, :, idx].transpose(1, 2).reshape(n * k, c, 1, *video.shape[3:])
    with torch.no_grad(), _autocast(video.device):
        z = vae.encode(stills)
    z = z.float().reshape(n, k, *z.shape[1:]).squeeze(3).transpose(1, 2)          # [n, z, k, h, w]
    return (mu.float() - z).pow(2).mean()


@torch.no_grad()
def latent_stats(vae: WanVAE, seed: int, device, n: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents of n clips: the built-in family's normalisation constants."""
    video, _, _ = _clips(np.random.default_rng(seed + 1), n, FRAMES)
    with _autocast(device):
        zs = torch.cat([vae.encode(video[i:i + 8].to(device)).float() for i in range(0, n, 8)])
    zs = zs.transpose(0, 1).reshape(zs.shape[1], -1)
    return zs.mean(1).tolist(), zs.std(1).clamp_min(1e-3).tolist()


def attach_latent_stats(vae: WanVAE, seed: int, device, n: int) -> None:
    """Measure the latent statistics of a VAE fresh from training and set them in its config, so that
    normalize/denormalize work as they will in the exported file (export() writes that config)."""
    mean, std = latent_stats(vae, seed, device, n)
    vae.config = replace(vae.config, latents_mean=tuple(mean), latents_std=tuple(std))


def train_tokenizer(work: Path, seed: int, vocab_size: int) -> bytes:
    path = work / "spiece.model"
    if path.exists():
        return path.read_bytes()
    import sentencepiece as spm
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(4000):
        s = world.sample_scene(rng, 1 if rng.random() < 0.5 else 2)
        sentences.append(world.prompt(s))
        sentences.append(world.paraphrase(s, rng))
    sentences += sorted(world.vocabulary_words())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)   # one thread: the same pieces on every run
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@torch.no_grad()
def encode_pool(work: Path, vae: WanVAE, budget: Budget, seed: int, device, progress) -> dict:
    """Encode `pool_clips` clips once. Clip i is drawn from default_rng([seed, i]), so its scene (and every
    prompt for it) can be drawn again from its index instead of being stored."""
    stage = Stage(work, "latents")
    state = stage.load() or {"latents": [], "scenes": []}
    if stage.done:
        return state
    vae.eval()
    done = len(state["scenes"])
    bar, last_save = progress(budget.pool_clips, "latents", done), time.time()
    batch = 16
    while done < budget.pool_clips:
        n = min(batch, budget.pool_clips - done)
        scenes = [_pool_scene(seed, done + i, budget.free_start_share) for i in range(n)]
        video = np.stack([world.render(s, size=SIZE, frames=FRAMES) for s in scenes])
        video = evaluate.to_video(video).to(device)
        with _autocast(device):
            z = vae.encode(video)
        state["latents"].append(vae.normalize(z.float()).to(torch.bfloat16).cpu())
        state["scenes"].extend(scenes)
        done += n
        bar.update(n)
        if time.time() - last_save > 180 or done == budget.pool_clips:
            stage.save(state, done=done == budget.pool_clips)
            last_save = time.time()
    bar.close()
    return state


MIN_ROOM = 0.15    # W: a free-start clip's shortest travel, well clear of the evaluator's 0.08 W for standing still


def _pool_scene(seed: int, i: int, free_start_share: float):
    rng = np.random.default_rng([seed, i])
    scene = world.sample_scene(rng, 1 if rng.random() < 0.55 else 2)
    if rng.random() < free_start_share:
        scene = _free_start(rng, scene)
    return scene


def _free_start(rng, scene):
    """The scene's objects placed anew, each at a start anywhere in the frame (_start_anywhere), never meeting.

    In the world a moving object always starts on the side it moves away from, so a model can read the direction
    off the first frame and never learn it from the words; and the built-in transformer, which has no absolute
    position (only Wan's relative RoPE), cannot place a first frame's object by the words either. Measured on the
    recipe without these clips: generated first frames put the object in the same place whatever motion the
    prompt named, and the clip then moved it away from the nearer edge, the wrong way half the time (80 of the 163
    moving prompts went the opposite way). These clips make the words the only cue to the direction. Pairs need
    them as much: with free starts for single objects only, image-to-video from rendered two-object first frames
    moved each object its prompted way in 62% of cases, and in 9% (53% the opposite way) when the same first frames
    were mirrored (32 prompts, both objects moving); text-to-video pairs were at chance (35%)."""
    for _ in range(1000):     # pairs: draw again until the two stay apart (a few tries as a rule)
        placed = replace(scene, objects=tuple(_start_anywhere(rng, o) for o in scene.objects))
        if world.apart(placed):
            return placed
    return scene


def _start_anywhere(rng, obj):
    """One object at a start anywhere with at least MIN_ROOM of travel left along its motion, travelling as far as
    the frame leaves room for (at most the world's TRAVEL); a standing object anywhere."""
    dx, dy = world.MOTIONS[obj.motion]
    direction = dx + dy                                     # +1 towards the right or bottom edge, -1 the other way
    lo, hi = world.start_range(obj.side, 0)
    across = rng.uniform(lo, hi)
    if direction == 0:
        return replace(obj, start=(float(rng.uniform(lo, hi)), float(across)))
    along = rng.uniform(*world.start_range(obj.side, direction, MIN_ROOM))
    room = hi - along if direction > 0 else along - lo
    start = (along, across) if dx else (across, along)
    return replace(obj, start=(float(start[0]), float(start[1])), travel=min(world.TRAVEL, room))


def new_transformer(tokenizer: Tokenizer, budget: Budget, seed: int, device, dit_config: DiTConfig = DIT_CONFIG):
    """Stage 3's untrained text encoder and transformer, seeded, and their optimiser:
    (encoder, dit, te_config, params, opt)."""
    torch.manual_seed(seed + 2)
    te_config = replace(TEXT_CONFIG, vocab_size=tokenizer.vocab_size)
    encoder = UMT5Encoder(te_config).to(device)
    dit = WanModel(dit_config).to(device)
    # Wan's own initialisation of the output layer: zero, so the untrained model predicts no velocity at all
    # instead of noise, and the first steps are spent on the data rather than on undoing a random projection.
    torch.nn.init.zeros_(dit.head.head.weight)
    torch.nn.init.zeros_(dit.head.head.bias)
    params = list(encoder.parameters()) + list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=budget.lr_dit, weight_decay=0.01, betas=(0.9, 0.99))
    return encoder, dit, te_config, params, opt


def train_transformer(work: Path, pool: dict, spiece: bytes, budget: Budget, seed: int, device, progress,
                      first_half_only: bool = False):
    """Stage 3. The schedule's two halves are the stages transformer-1 and transformer-2, each under 90 minutes on
    a 2-core CPU: a checkpoint and a log line mark the half-way step, where `first_half_only` stops."""
    stage = Stage(work, "transformer")
    tokenizer = Tokenizer.from_bytes(spiece)
    encoder, dit, te_config, params, opt = new_transformer(tokenizer, budget, seed, device)
    probe = None
    if budget.clause_weight > 0:
        probe = ClauseProbe(te_config.dim).to(device)
        opt.add_param_group({"params": list(probe.parameters())})
        params = params + list(probe.parameters())
    ema = {"dit": copy.deepcopy(dit).eval(), "encoder": copy.deepcopy(encoder).eval()}
    step, rng = 0, np.random.default_rng(seed + 3)
    state = stage.load()
    if state is not None:
        stage.restore(dit, state["dit"])
        encoder.load_state_dict(state["encoder"])
        ema["dit"].load_state_dict(state["ema_dit"])
        ema["encoder"].load_state_dict(state["ema_encoder"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        if probe is not None:
            probe.load_state_dict(state["clause_probe"])
    if pool is None:       # --only export: take the latest checkpoint, finished or not
        if state is None:
            raise SystemExit(f"nothing to export: {stage.path} does not exist; train the transformer first")
        if not stage.done:
            log.warning("exporting an unfinished transformer stage (step %d)", step)
    half = budget.dit_steps // 2
    end = half if first_half_only else budget.dit_steps
    if stage.done or pool is None or step >= end:
        return ema["dit"], TextEncoder(ema["encoder"], tokenizer), te_config
    latents = torch.cat(pool["latents"])                                                 # [N, z, T', H', W']
    scenes = pool["scenes"]
    gen = torch.Generator().manual_seed(seed + 4 + step)
    dit.train()
    encoder.train()
    last_save, bar = time.time(), progress(end, "transformer", step)
    while step < end:
        lr = _set_cosine_lr(opt, step, budget.dit_steps, budget.lr_dit, warmup=200)
        idx = rng.integers(len(scenes), size=budget.dit_batch).tolist()
        loss = _flow_loss(dit, encoder, tokenizer, latents[idx].float().to(device), [scenes[i] for i in idx], rng,
                          gen, budget, device, i2v=True, clause_probe=probe)
        if budget.image_batch:
            # Images: the first latent frame of other clips (the causal VAE encodes frame 0 alone). Colour, shape,
            # size and background are learnt here at a fifth of a clip's cost; motion from the clips.
            idx = rng.integers(len(scenes), size=budget.image_batch).tolist()
            loss = loss + _flow_loss(dit, encoder, tokenizer, latents[idx, :, :1].float().to(device),
                                     [scenes[i] for i in idx], rng, gen, budget, device, i2v=False,
                                     clause_probe=probe)
        _optimizer_step(opt, loss, params)
        _ema_update(ema["dit"], dit, budget.ema if step > 1000 else 0.0)
        _ema_update(ema["encoder"], encoder, budget.ema if step > 1000 else 0.0)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            log.info("transformer step %d loss %.5f", step, loss.item())
        if time.time() - last_save > 180 or step in (half, end):
            stage.save({"dit": dit.state_dict(), "encoder": encoder.state_dict(), "ema_dit": ema["dit"].state_dict(),
                        "ema_encoder": ema["encoder"].state_dict(), "opt": opt.state_dict(), "step": step,
                        "rng": rng, **({"clause_probe": probe.state_dict()} if probe is not None else {})},
                       done=step == budget.dit_steps)
            last_save = time.time()
        if step in (half, budget.dit_steps):
            log.info("transformer-%d (to step %d) done", 1 if step == half else 2, step)
    bar.close()
    return ema["dit"], TextEncoder(ema["encoder"], tokenizer), te_config


def _flow_loss(dit, encoder, tokenizer, x0, scenes, rng, gen, budget: Budget, device, i2v: bool,
               clause_probe: ClauseProbe | None = None) -> torch.Tensor:
    """Flow-matching loss of one batch of latents [B, z, T', H', W'] and their scenes (prompts redrawn here), plus
    `budget.clause_weight` times the clause probe's loss on the text encoder's output when a probe is given."""
    prompts = ["" if rng.random() < budget.uncond_share else
               (world.prompt(s) if rng.random() < 0.5 else world.paraphrase(s, rng)) for s in scenes]
    ids, mask = tokenizer(prompts, max_length=DIT_CONFIG.text_len)
    b, _, f, h, w = x0.shape
    # Wan's parameterisation: x_s = (1 - s) x0 + s noise, target v = noise - x0.
    frame_sigma = _draw_sigmas(gen, budget.shift, b)[:, None].repeat(1, f)                 # [B, F]
    keep = torch.ones_like(x0[:, :1])
    if i2v and f > 1:
        mode = torch.rand(b, generator=gen)
        # Image-to-video: a clean first latent frame with timestep 0 on its tokens, left out of the loss.
        pinned = mode < budget.i2v_share
        frame_sigma[pinned, 0] = 0
        keep[pinned, :, 0] = 0
        # Every frame at a noise level of its own ("diffusion forcing"): each clip then teaches the model to carry
        # an object from its cleaner frames into its noisier ones, which image-to-video and a steady clip need and
        # which equal noise on all frames teaches only slowly.
        forced = (mode >= budget.i2v_share) & (mode < budget.i2v_share + budget.forcing_share)
        frame_sigma[forced] = _draw_sigmas(gen, budget.shift, int(forced.sum()), f)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    s = frame_sigma.to(device).view(b, 1, f, 1, 1)
    start, target = x0, noise - x0
    if budget.sharpen_share > 0:
        # A share of the samples noised from a blurred copy of their latent (frames at noise >= SHARPEN_FROM), the
        # target still the sharp latent: the clean estimate x_t - s v is x0 either way. The transformer's own path
        # reaches mid noise with a soft layout (a drawn square covered 24-25 object cells against 21.5, rounded), which
        # plain flow matching never shows it, so it kept the softness; taught to sharpen, picture runs drew
        # squares right 45% of the time against 21% (benchmarks/picture_training.py).
        chosen = (torch.rand(b, generator=gen) < budget.sharpen_share).view(b, 1)
        sharpen = (chosen & (frame_sigma >= SHARPEN_FROM)).to(device).view(b, 1, f, 1, 1).to(x0.dtype)
        start = x0 + sharpen * (_blur_latent(x0) - x0)
        target = target + (1 - s) / s.clamp_min(SHARPEN_FROM) * (start - x0)
    xt = (1 - s) * start + s * noise
    t = sampling.token_timesteps(1000.0, s[:, 0].expand(b, f, h, w), patch=dit.config.patch_size)
    with _autocast(device):
        emb = encoder(ids.to(device), mask.to(device))
        context = [e[: int(m.sum())] for e, m in zip(emb, mask)]
        v = dit(xt, t, context)
    weight = keep * _latent_object_weight(x0, budget.object_weight, budget.outline_weight)
    loss = (((v.float() - target) ** 2) * weight).sum() / (weight.sum() * x0.shape[1])
    if clause_probe is not None:
        loss = loss + budget.clause_weight * clause_probe.loss(emb, _clause_targets(tokenizer, prompts, mask).to(device))
    return loss


CLAUSE_CLASSES = (len(world.COLOURS), len(world.SHAPES), len(world.SIZES), len(world.MOTIONS))


class ClauseProbe(torch.nn.Module):
    """Linear heads that read, from every token of an object phrase, that object's colour, shape, size and motion
    (training only; not exported).

    Trained against them, the text encoder writes each object's attributes into all of its phrase's tokens. Without
    them it bound colour and shape (a linear probe on a colour word's token read its phrase's shape every time) but
    not motion: the colour word's token gave its object's motion 41% of the time, the motion words' their object's
    colour 44% (chance about 20%; `benchmarks/transformer_probe.py --only binding`). The transformer's cross-attention has no positions on the text, so an object's
    image tokens, which find their phrase by its colour and shape, could not tell which motion was theirs: in
    two-object clips each object took the other's motion as often as its own."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = torch.nn.Linear(dim, sum(CLAUSE_CLASSES))

    def loss(self, emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the four attributes over the labelled tokens; emb [B, L, D], targets [B, L, 4]
        (-1: no object phrase)."""
        if not bool((targets[..., 0] >= 0).any()):
            return emb.sum() * 0
        logits = self.head(emb.float()).split(CLAUSE_CLASSES, dim=-1)
        return sum(F.cross_entropy(lg.flatten(0, 1), targets[..., k].flatten(), ignore_index=-1)
                   for k, lg in enumerate(logits)) / len(CLAUSE_CLASSES)


def _clause_targets(tokenizer: Tokenizer, prompts: list[str], mask: torch.Tensor) -> torch.Tensor:
    """[B, L, 4] class indices (colour, shape, size, motion) of the object phrase each token belongs to, -1 for
    the others (the background phrase, 'and', EOS, padding, empty prompts)."""
    targets = torch.full((*mask.shape, len(CLAUSE_CLASSES)), -1, dtype=torch.long)
    colours, sizes, motions = list(world.COLOURS), list(world.SIZES), list(world.MOTIONS)
    for b, text in enumerate(prompts):
        if not text:
            continue
        words = clean_prompt(text).split(" ")
        ends = word_token_ends(tokenizer, words)
        if ends[-1] + 1 != int(mask[b].sum()):          # truncated: its tokens no longer line up with its words
            continue
        objects = world.parse_prompt(text).objects
        for start, end, k in zip([0] + ends[:-1], ends, world.object_phrase_of_words(words)):
            if k >= 0:
                o = objects[k]
                targets[b, start:end] = torch.tensor(
                    [colours.index(o.colour), world.SHAPES.index(o.shape), sizes.index(o.size), motions.index(o.motion)])
    return targets


def word_token_ends(tokenizer: Tokenizer, words: list[str]) -> list[int]:
    """For each word of a cleaned prompt split on spaces, the index after its last token (SentencePiece splits on
    spaces, so a prompt's tokens are its words' tokens in order, then EOS)."""
    ends, end = [], 0
    for w in words:
        end += len(tokenizer.processor.encode(w))
        ends.append(end)
    return ends


SHARPEN_FROM = 0.3   # lowest noise level _flow_loss starts from a blurred latent: below it the gap to the sharp
                     # latent would dominate the velocity target (it grows as (1 - s) / s)


def _draw_sigmas(gen: torch.Generator, shift: float, *shape: int) -> torch.Tensor:
    """Training noise levels: uniform, then shifted as the built-in model's sampler shifts its schedule, so the
    steps it takes at high noise are the ones trained most."""
    return sampling.shift_sigmas(torch.rand(*shape, generator=gen), shift).float()


def _latent_object_weight(x0: torch.Tensor, strength: float, outline: float = 0.0) -> torch.Tensor:
    """Per-position loss weight [B, 1, T, H, W]: 1 on the background, up to 1 + strength where the latent departs
    most from the clip's background. A small object covers one or two tokens of a 64-token frame, so an unweighted
    loss is met almost entirely by drawing the background, and objects are learnt last (or never).

    With `outline`, up to `outline` more where the departure changes most from a neighbouring position (same frame):
    an object's edge cells. Those hold a square's corners and a triangle's flanks, and weigh least under `strength`
    alone (a partly covered cell departs less than the object's middle)."""
    if strength <= 0 and outline <= 0:
        return torch.ones_like(x0[:, :1])
    background = _background_code(x0)
    departure = (x0 - background).norm(dim=1, keepdim=True)                              # [B, 1, T, H, W]
    peak = departure.flatten(1).amax(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
    weight = 1 + strength * departure / peak
    if outline > 0:
        padded = F.pad(departure, (1, 1, 1, 1, 0, 0), mode="replicate")
        steps = torch.stack([(padded[..., 1:-1, 2:] - departure).abs(), (padded[..., 1:-1, :-2] - departure).abs(),
                             (padded[..., 2:, 1:-1] - departure).abs(), (padded[..., :-2, 1:-1] - departure).abs()])
        weight = weight + outline * steps.amax(dim=0) / peak
    return weight


@torch.no_grad()
def _ema_update(ema_model, model, decay: float):
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def _optimizer_step(opt, loss: torch.Tensor, params) -> None:
    """One step of `opt` on `loss`, the gradient norm of `params` clipped to 1 (every stage's update)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _set_cosine_lr(opt, step: int, total: int, peak: float, warmup: int) -> float:
    """Set every parameter group of `opt` to _cosine's learning rate for `step`, and return it."""
    lr = _cosine(step, total, peak, warmup)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _cosine(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def export(out: Path, vae: WanVAE, dit: WanModel, text_encoder: TextEncoder, te_config, spiece: bytes):
    """Write the three files in the official layouts our loaders read, configs in the header metadata. The VAE's
    config carries its latent statistics (attach_latent_stats)."""
    from safetensors.torch import save_file

    from ..checkpoints import config_metadata
    out.mkdir(parents=True, exist_ok=True)

    def half(sd):   # bf16 halves the repository size; the models compute in float32 on a CPU by default
        return {k: v.detach().to(torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous().cpu()
                for k, v in sd.items()}

    name = "Zoetrope built-in (Shapes World)"
    stats = {"latents_mean": list(vae.config.latents_mean), "latents_std": list(vae.config.latents_std)}
    save_file(half(vae.state_dict()), str(out / builtin.VAE.name),
              metadata=config_metadata(vae.config, "builtin", name))
    save_file(half(dit.state_dict()), str(out / builtin.TRANSFORMER.name),
              metadata=config_metadata(DIT_CONFIG, "builtin", name, **stats, **builtin.DEFAULTS))
    te_sd = half(text_encoder.encoder.state_dict())
    te_sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(te_sd, str(out / builtin.TEXT_ENCODER.name), metadata=config_metadata(te_config, "builtin", name))


# Budget fields the command line may override (--vae-steps etc.).
_BUDGET_FLAGS = ("vae_steps", "wide_decoder_steps", "decoder_steps", "dit_steps", "pool_clips", "dit_batch",
                 "image_batch", "vae_batch")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zoetrope train-builtin", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="builtin-training", help="folder for checkpoints and the log (resumable)")
    ap.add_argument("--out", default=str(builtin.FOLDER), help="where the three safetensors files are written")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (seconds), for tests")
    for f in _BUDGET_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: all cores; 1 is faster when other programs share the cores)")
    ap.add_argument("--only", choices=("vae", "transformer", "transformer-1", "transformer-2", "export"),
                    default=None,
                    help="run one stage (the VAE's first when it is not done; 'transformer-1' is the first half of "
                         "the transformer's steps, 'transformer-2' the rest); 'export' writes the files from the "
                         "stages' checkpoints")
    args = ap.parse_args(argv)
    budget = SMOKE if args.smoke else Budget()
    overrides = {f: getattr(args, f) for f in _BUDGET_FLAGS if getattr(args, f) is not None}
    budget = replace(budget, **overrides)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(work / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device()
    log.info("train-builtin seed %d on %s (%s), budget %s", args.seed, device,
             "bf16" if ops.bf16_native(device) else "fp32: no native bf16 here", budget)

    from tqdm import tqdm

    def progress(total, name, initial):
        return tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, disable=args.smoke)

    t0 = time.time()
    only = args.only
    vae = train_vae(work, budget, args.seed, device, progress)
    if budget.wide_decoder_steps > 0:
        vae = train_wide_decoder(work, vae, budget, args.seed, device, progress)
    if budget.decoder_steps > 0:
        vae = tune_decoder(work, vae, budget, args.seed, device, progress)
    attach_latent_stats(vae, args.seed, device, budget.stats_clips)
    log.info("vae done at %.1f min", (time.time() - t0) / 60)
    if only != "vae":
        spiece = train_tokenizer(work, args.seed, TEXT_CONFIG.vocab_size)
        pool = encode_pool(work, vae, budget, args.seed, device, progress) if only != "export" else None
        log.info("latent pool done at %.1f min", (time.time() - t0) / 60)
        dit, text_encoder, te_config = train_transformer(work, pool, spiece, budget, args.seed, device, progress,
                                                         first_half_only=only == "transformer-1")
    if only in (None, "export"):
        export(Path(args.out), vae, dit, text_encoder, te_config, spiece)
        log.info("exported to %s after %.1f min", args.out, (time.time() - t0) / 60)
        print(f"wrote the built-in model to {args.out} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
