"""The Wan causal 3D VAE (Wan 2.1 and Wan 2.2) and the mapping of diffusers checkpoints onto it.

Follows the official Wan 2.1 `WanVAE_` (wan/modules/vae.py) and Wan 2.2 `WanVAE_` (wan/modules/vae2_2.py):
same class and module names, so a state_dict's keys are those of the official and ComfyUI files. The two
differ only in Wan 2.2's 2x2 pixel patchify, its residual down/up stages (`Down_ResidualBlock`,
`Up_ResidualBlock` with the parameter-free `AvgDown3D` / `DupUp3D` shortcuts) and a wider decoder; one set of
modules builds both, and any smaller config of the same shape (fewer stages, fewer blocks, thinner channels).

Video is processed in time chunks, frames [0:1], [1:5], [5:9], ... on encode and one latent frame at a time on
decode. Every causal convolution sees the last frames of the previous chunk through a `CausalCache`, which makes
the chunked result the one the model was trained with; it has to be reproduced exactly, down to the first
chunk's special cases, to match the released weights.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .ops import compute_dtype_of

CACHE_T = 2  # frames of the previous chunk a causal 3x3x3 convolution needs

ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------------
# The chunk cache


class CausalCache:
    """What each causal layer saw at the end of the previous chunk.

    Every chunk runs the same layers in the same order, so the layers' calls are numbered afresh in each chunk
    (`start_chunk`) and the n-th call reads and replaces slot n. It lives only for one encode or decode call, so
    an exception part-way (a cancelled job) leaves nothing behind in the model.
    """

    def __init__(self):
        self.slots: list[torch.Tensor] = []
        self.pos = 0
        self.chunk = 0

    def start_chunk(self, index: int) -> None:
        self.chunk = index
        self.pos = 0

    @property
    def first_chunk(self) -> bool:
        return self.chunk == 0

    def past(self) -> torch.Tensor | None:
        """This layer's frames from the previous chunk; None in the first chunk."""
        return self.slots[self.pos] if self.pos < len(self.slots) else None

    def keep(self, frames: torch.Tensor) -> None:
        """Store this layer's frames for the next chunk and move on to the next layer."""
        if self.pos < len(self.slots):
            self.slots[self.pos] = frames
        else:
            self.slots.append(frames)
        self.pos += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """Run a causal conv on a chunk, fed the previous chunk's last frames instead of zero padding."""
        past = self.past()
        kept = x[:, :, -CACHE_T:].clone()
        if kept.shape[2] < CACHE_T and past is not None:
            # a one-frame chunk: carry the older frame over so the next chunk still sees two
            kept = torch.cat([past[:, :, -1:].to(kept.device), kept], dim=2)
        out = conv(x, past)
        self.keep(kept)
        return out

    def clear(self) -> None:
        self.slots.clear()
        self.pos = 0


# ----------------------------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding is all on the past side, so frame t never sees frames after t.

    `past` (frames of the previous chunk) stands in for as much of that padding as it covers.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._padding = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, then T (past, future)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        padding = list(self._padding)
        if past is not None and padding[4] > 0:
            x = torch.cat([past.to(x.device), x], dim=2)
            padding[4] -= past.shape[2]
        return super().forward(F.pad(x, padding))


class RMS_norm(nn.Module):
    """L2 normalisation over channels times sqrt(C) and a learned gain: the RMS of the channels becomes gamma.

    Not an eps-RMSNorm: F.normalize's 1e-12 floor is the only epsilon. `images=True` is the per-frame 2D form.
    """

    def __init__(self, dim: int, images: bool = True, device=None, dtype=None):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W] or [B, C, H, W]. The sum of squares overflows float16, so normalise in float32.
        x = F.normalize(x.float(), dim=1).to(x.dtype)
        return x * self.scale * self.gamma


class Upsample(nn.Upsample):
    """Nearest-exact upsampling computed in float32, as the official code does for bfloat16 support."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """2x spatial down/upsampling, and for the '3d' modes 2x in time too, through a causal temporal conv.

    The first chunk is never resampled in time: on encode that keeps the first frame on its own as the first
    latent frame, on decode the first latent frame becomes one frame, not two.
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"Resample mode {mode!r} is not one of upsample2d/3d, downsample2d/3d")
        self.dim = dim
        self.mode = mode
        dd = dict(device=device, dtype=dtype)
        if mode.startswith("upsample"):
            # Wan 2.1 halves the channels here; Wan 2.2 keeps them
            out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, out_dim, 3, padding=1, **dd))
            if mode == "upsample3d":
                # 2C outputs = two frames per input frame, interleaved in forward
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), **dd)
        else:
            # pad right/bottom only, so a stride-2 3x3 conv halves even sizes exactly
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2), **dd))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0), **dd)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, C, T, H, W]
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if cache.first_chunk:
                # The official code stores a 'Rep' marker here; on the next chunk it then pads with zeros and
                # carries zeros over, which is exactly what two zero frames of "past" do.
                cache.keep(x.new_zeros(b, c, CACHE_T, h, w))
            else:
                x = cache.conv(self.time_conv, x)                       # [B, 2C, T, H, W]
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
                x = x.reshape(b, c, 2 * t, h, w)

        t = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)            # frames as a batch of images
        x = self.resample(x)                                            # [B*T, C', H', W']
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)           # [B, C', T, H', W']

        if self.mode == "downsample3d":
            past = cache.past()
            kept = x[:, :, -1:].clone()
            if past is not None:
                # stride 2 over (previous last frame, this chunk): 4 frames -> 2, 2 -> 1
                x = self.time_conv(torch.cat([past, x], dim=2))
            cache.keep(kept)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        dd = dict(device=device, dtype=dtype)
        # Sequential indices (0, 2, 3, 6) are the checkpoint's key names
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False, **dd),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1, **dd),
            RMS_norm(out_dim, images=False, **dd),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1, **dd),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1, **dd) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        h = self.shortcut(x)
        for layer in self.residual:
            x = cache.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (never across frames: stays causal)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim, device=device, dtype=dtype)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1, device=device, dtype=dtype)
        self.proj = nn.Conv2d(dim, dim, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x))                                   # [B*T, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2)     # [B*T, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)                       # [B*T, 1, HW, C] each
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)                  # [B, C, T, H, W]
        return x + identity


# ----------------------------------------------------------------------------------------------------------------
# Wan 2.2: patchify and the parameter-free shortcuts of the residual stages


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H*p, W*p] -> [B, C*p*p, T, H, W], channels ordered (c, column offset, row offset)."""
    if p == 1:
        return x
    b, c, t, hp, wp = x.shape
    x = x.view(b, c, t, hp // p, p, wp // p, p)        # [B, C, T, H, q, W, r]
    x = x.permute(0, 1, 6, 4, 2, 3, 5)                 # [B, C, r, q, T, H, W]
    return x.reshape(b, c * p * p, t, hp // p, wp // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w)       # [B, C, r, q, T, H, W]
    x = x.permute(0, 1, 4, 5, 3, 6, 2)                 # [B, C, T, H, q, W, r]
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class AvgDown3D(nn.Module):
    """Space/time-to-channels folding followed by averaging groups of channels: a downsampling shortcut."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.factor = factor_t * factor_s * factor_s
        if in_channels * self.factor % out_channels:
            raise ValueError(
                f"residual down stage {in_channels}->{out_channels} channels with a {self.factor}x fold: "
                f"in_channels x fold must be a multiple of out_channels; choose dim/dim_mult accordingly")
        self.group_size = in_channels * self.factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C_out, T/ft, H/fs, W/fs]; a short chunk is zero-padded at the past side
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)          # [B, C, ft, fs, fs, T', H', W']
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Channels-to-space/time unfolding of repeated channels: the upsampling shortcut, inverse of AvgDown3D."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.factor = factor_t * factor_s * factor_s
        if out_channels * self.factor % in_channels:
            raise ValueError(
                f"residual up stage {in_channels}->{out_channels} channels with a {self.factor}x unfold: "
                f"out_channels x unfold must be a multiple of in_channels; choose dec_dim/dim_mult accordingly")
        self.repeats = out_channels * self.factor // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C_out, T*ft, H*fs, W*fs]
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)          # [B, C_out, T, ft, H, fs, W, fs]
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        if first_chunk:
            # the main path does not upsample the first chunk in time; keep the shortcut's last frame to match
            x = x[:, :, ft - 1:]
        return x


class Down_ResidualBlock(nn.Module):
    """Wan 2.2 encoder stage: residual blocks and a Resample, plus an AvgDown3D shortcut around them all."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, mult: int, temperal_downsample: bool = False,
                 down_flag: bool = False, device=None, dtype=None):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temperal_downsample else 1,
                                      factor_s=2 if down_flag else 1)
        blocks: list[nn.Module] = []
        for _ in range(mult):
            blocks.append(ResidualBlock(in_dim, out_dim, dropout, device=device, dtype=dtype))
            in_dim = out_dim
        if down_flag:
            mode = "downsample3d" if temperal_downsample else "downsample2d"
            blocks.append(Resample(out_dim, mode, device=device, dtype=dtype))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T', H', W']
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class Up_ResidualBlock(nn.Module):
    """Wan 2.2 decoder stage: residual blocks and a Resample, plus a DupUp3D shortcut when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, mult: int, temperal_upsample: bool = False,
                 up_flag: bool = False, device=None, dtype=None):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temperal_upsample else 1, factor_s=2)
                             if up_flag else None)
        blocks: list[nn.Module] = []
        for _ in range(mult):
            blocks.append(ResidualBlock(in_dim, out_dim, dropout, device=device, dtype=dtype))
            in_dim = out_dim
        if up_flag:
            mode = "upsample3d" if temperal_upsample else "upsample2d"
            blocks.append(Resample(out_dim, mode, upsample_out_dim=out_dim, device=device, dtype=dtype))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T', H', W']
        shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, first_chunk=cache.first_chunk)
        for block in self.upsamples:
            x = block(x, cache)
        return x if shortcut is None else x + shortcut


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_downsample: tuple[bool, ...], in_channels: int = 3, residual: bool = False,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dims = [dim * u for u in (1, *dim_mult)]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1, **dd)

        # Wan 2.1: one flat Sequential of blocks; Wan 2.2: one Down_ResidualBlock per stage
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if residual:
                blocks.append(Down_ResidualBlock(in_dim, out_dim, dropout, num_res_blocks,
                                                 temperal_downsample=i != last and temperal_downsample[i],
                                                 down_flag=i != last, **dd))
                continue
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout, **dd))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d", **dd))
        self.downsamples = nn.Sequential(*blocks)

        out_dim = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout, **dd), AttentionBlock(out_dim, **dd),
                                    ResidualBlock(out_dim, out_dim, dropout, **dd))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False, **dd), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1, **dd))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, C_in, T, H, W] (one chunk) -> [B, 2z, T', H/2^k, W/2^k]
        x = cache.conv(self.conv1, x)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        for layer in self.head:
            x = cache.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_upsample: tuple[bool, ...], out_channels: int = 3, residual: bool = False,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1, **dd)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout, **dd), AttentionBlock(dims[0], **dd),
                                    ResidualBlock(dims[0], dims[0], dropout, **dd))

        # Wan 2.1: one flat Sequential of blocks; Wan 2.2: one Up_ResidualBlock per stage
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if residual:
                blocks.append(Up_ResidualBlock(in_dim, out_dim, dropout, num_res_blocks + 1,
                                               temperal_upsample=i != last and temperal_upsample[i],
                                               up_flag=i != last, **dd))
                continue
            if i > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout, **dd))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d", **dd))
        self.upsamples = nn.Sequential(*blocks)

        self.head = nn.Sequential(RMS_norm(dims[-1], images=False, **dd), nn.SiLU(),
                                  CausalConv3d(dims[-1], out_channels, 3, padding=1, **dd))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # x: [B, z, 1, h, w] (one latent frame) -> [B, C_out, 1 (first chunk) or 4, h*2^k, w*2^k]
        x = cache.conv(self.conv1, x)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        for layer in self.head:
            x = cache.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The VAE


class WanVAE(nn.Module):
    """Wan causal video VAE: video [B, 3, T, H, W] in [-1, 1] <-> raw latent [B, z, 1 + (T-1)/4, H/s, W/s].

    `encode` returns the raw posterior mean, as ComfyUI's LATENT holds it; `normalize` / `denormalize` convert
    to and from the unit-variance latent the transformer works in. Encode and decode compute in the weights'
    dtype and on their device, and return the result in the input's floating dtype. Gradients follow the
    caller's grad mode (wrap calls in torch.no_grad() for inference).
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        stages = len(config.dim_mult)
        if stages < 1 or len(config.temporal_downsample) != stages - 1:
            raise ValueError(
                f"VAEConfig has {stages} stages (dim_mult={config.dim_mult}) and temporal_downsample="
                f"{config.temporal_downsample}; expected one temporal_downsample flag per downsampling, "
                f"i.e. {max(stages - 1, 0)} of them")
        for name in ("latents_mean", "latents_std"):
            n = len(getattr(config, name))
            if n not in (0, config.z_dim):
                raise ValueError(f"VAEConfig.{name} has {n} values for z_dim {config.z_dim}; give one per "
                                 f"latent channel, or none for an unnormalised latent")
        self.config = config
        dd = dict(device=device, dtype=dtype)
        pixel_channels = 3 * config.patch_size ** 2
        temperal_upsample = tuple(config.temporal_downsample[::-1])
        self.encoder = Encoder3d(config.dim, config.z_dim * 2, config.dim_mult, config.num_res_blocks,
                                 config.temporal_downsample, pixel_channels, config.residual, **dd)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1, **dd)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1, **dd)
        self.decoder = Decoder3d(config.dec_dim, config.z_dim, config.dim_mult, config.num_res_blocks,
                                 temperal_upsample, pixel_channels, config.residual, **dd)

    # -- sizes --------------------------------------------------------------------------------------------------

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z, latent frames, latent height, latent width) of a clip of this size."""
        return self.config.latent_shape(frames, height, width)

    # -- latent normalisation ------------------------------------------------------------------------------------

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected a latent [B, {self.z_dim}, T, H, W], got shape {tuple(z.shape)}")
        shape = (1, self.z_dim, 1, 1, 1)
        mean = self.config.latents_mean or (0.0,) * self.z_dim
        std = self.config.latents_std or (1.0,) * self.z_dim
        return (torch.tensor(mean, device=z.device, dtype=torch.float32).view(shape),
                torch.tensor(std, device=z.device, dtype=torch.float32).view(shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the per-channel standardised latent the transformer samples."""
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        mean, std = self._stats(z)
        return (z.float() * std + mean).to(z.dtype)

    # -- encode / decode -----------------------------------------------------------------------------------------

    def _weights(self) -> tuple[torch.device, torch.dtype]:
        return self.conv1.weight.device, compute_dtype_of(self)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> raw latent [B, z, 1 + k, H/s, W/s].

        (4 stands for the temporal compression and s for the spatial one.)

        Returns the posterior mean, or with `sample=True` a draw from the posterior (using `generator`).
        `callback(done, total)` runs after every chunk of frames; it may raise to cancel.
        """
        c, s = self.temporal_compression, self.spatial_compression
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        if (frames - 1) % c or height % s or width % s:
            raise ValueError(
                f"cannot encode {frames} frames of {width}x{height}: this VAE needs 1 + {c}k frames (1, {1 + c}, "
                f"{1 + 2 * c}, ...) and a width and height that are multiples of {s}; trim or pad the clip")
        device, dtype = self._weights()
        x = patchify(video.to(device=device, dtype=dtype), self.config.patch_size)  # [B, 3p^2, T, H/p, W/p]

        # the first frame alone, then c frames per chunk: each chunk gives one latent frame
        bounds = [(0, 1)] + [(1 + c * i, 1 + c * (i + 1)) for i in range((frames - 1) // c)]
        cache = CausalCache()
        try:
            outs = []
            for i, (start, stop) in enumerate(bounds):
                cache.start_chunk(i)
                outs.append(self.encoder(x[:, :, start:stop], cache))   # [B, 2z, 1, h, w]
                if callback is not None:
                    callback(i + 1, len(bounds))
        finally:
            cache.clear()  # free the cached activations now, also when a callback cancelled the job
        mu, log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)  # [B, z, T', h, w] each
        if sample:
            std = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype,
                                device=generator.device if generator is not None else mu.device)
            mu = mu + std * noise.to(mu.device)
        return mu.to(video.dtype) if video.is_floating_point() else mu

    def decode(self, z: torch.Tensor, callback: ProgressCallback | None = None, clamp: bool = True) -> torch.Tensor:
        """raw latent [B, z, T', h, w] -> video [B, 3, 1 + 4(T'-1), h*s, w*s], clamped to [-1, 1].

        `callback(done, total)` runs after every latent frame; it may raise to cancel. Training passes
        clamp=False: a clamped pixel has no gradient, so an overshoot could never be pulled back.
        """
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected a raw latent [B, {self.z_dim}, T, H, W] for this VAE (z_dim "
                             f"{self.z_dim}), got shape {tuple(z.shape)}")
        device, dtype = self._weights()
        x = self.conv2(z.to(device=device, dtype=dtype))                # [B, z, T', h, w]
        latent_frames = x.shape[2]
        cache = CausalCache()
        try:
            outs = []
            for i in range(latent_frames):
                cache.start_chunk(i)
                outs.append(self.decoder(x[:, :, i:i + 1], cache))      # [B, 3p^2, 1 or 4, h*s/p, w*s/p]
                if callback is not None:
                    callback(i + 1, latent_frames)
        finally:
            cache.clear()
        video = unpatchify(torch.cat(outs, dim=2), self.config.patch_size)
        if clamp:
            video = video.clamp(-1.0, 1.0)
        return video.to(z.dtype) if z.is_floating_point() else video


# ----------------------------------------------------------------------------------------------------------------
# diffusers -> official key names

# diffusers' WanResidualBlock attribute -> the official ResidualBlock's Sequential index
_RESNET_NAMES = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                 ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_BLOCK = re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets\.(\d+)\.|downsampler\.|upsampler\.|"
                    r"upsamplers\.0\.)?(.*)")
_MIDDLE = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)")
_RENAMES = (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2."),
            ("encoder.conv_in.", "encoder.conv1."), ("decoder.conv_in.", "decoder.conv1."),
            ("encoder.norm_out.", "encoder.head.0."), ("decoder.norm_out.", "decoder.head.0."),
            ("encoder.conv_out.", "encoder.head.2."), ("decoder.conv_out.", "decoder.head.2."))


def _resnet_part(rest: str) -> str:
    for old, new in _RESNET_NAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def map_diffusers_keys(state_dict: dict) -> dict:
    """A diffusers `AutoencoderKLWan` state_dict (Wan 2.1 or 2.2 layout) with the official/ComfyUI key names.

    Keys that are not diffusers names are kept as they are, so an official state_dict passes through unchanged.
    Only the keys change; the values are the same objects. Block counts are read off the keys, so smaller
    configs map too.
    """
    # Wan 2.2's residual stages nest their blocks (down_blocks.N.resnets.M), Wan 2.1's encoder is flat
    residual = any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.", k) or ".upsampler." in k for k in state_dict)
    resnets: dict[tuple[str, int], int] = {}  # (encoder|decoder, block) -> residual blocks in it
    resampled: set[int] = set()               # decoder blocks that end in a Resample
    for key in state_dict:
        m = _BLOCK.fullmatch(key)
        if not m:
            continue
        part, n = m.group(1), int(m.group(2))
        if m.group(4) is not None:
            resnets[part, n] = max(resnets.get((part, n), 0), int(m.group(4)) + 1)
        elif m.group(3) is not None and part == "decoder":
            resampled.add(n)
    # Wan 2.1's decoder is one flat Sequential: where each diffusers up block starts in it
    start, offset = {}, 0
    for n in sorted({n for part, n in resnets if part == "decoder"} | resampled):
        start[n] = offset
        offset += resnets.get(("decoder", n), 0) + (n in resampled)

    def official(key: str) -> str:
        for old, new in _RENAMES:
            if key.startswith(old):
                return new + key[len(old):]
        m = _MIDDLE.fullmatch(key)
        if m:
            part, kind, i, rest = m.groups()
            if kind == "resnets":
                return f"{part}.middle.{2 * int(i)}.{_resnet_part(rest)}"
            return f"{part}.middle.{2 * int(i) + 1}.{rest}"
        m = _BLOCK.fullmatch(key)
        if not m:
            return key
        part, n, sub, m_idx, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if part == "encoder":
            if not residual:  # flat in both layouts: index kept
                return f"encoder.downsamples.{n}.{_resnet_part(rest)}"
            if m_idx is not None:
                return f"encoder.downsamples.{n}.downsamples.{m_idx}.{_resnet_part(rest)}"
            if sub == "downsampler.":
                return f"encoder.downsamples.{n}.downsamples.{resnets.get(('encoder', n), 0)}.{rest}"
            return key
        if m_idx is not None:
            index, rest = int(m_idx), _resnet_part(rest)
        elif sub is not None:  # the stage's Resample comes after its residual blocks
            index = resnets.get(("decoder", n), 0)
        else:
            return key
        if residual:
            return f"decoder.upsamples.{n}.upsamples.{index}.{rest}"
        return f"decoder.upsamples.{start[n] + index}.{rest}"

    mapped = {}
    for key, value in state_dict.items():
        new = official(key)
        if new in mapped:
            raise ValueError(f"two checkpoint tensors map to the VAE key {new!r} (the second is {key!r}); "
                             f"the file mixes official and diffusers names")
        mapped[new] = value
    return mapped
