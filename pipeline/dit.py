"""The Wan video transformer (`WanModel`) of Wan 2.1 and Wan 2.2, in plain PyTorch.

Follows the official Wan 2.1 / 2.2 `WanModel` (wan/modules/model.py): same module names, so a state_dict's keys
are the official checkpoint keys one to one, and the same numerics: the timestep sinusoid in float64 with cos
first, time embedding, norms, modulation, the residual stream and the output head in float32; everything else
(projections, attention, FFN) in the compute dtype of the weights.

Differences from the official code, none larger than float32 rounding:
- RoPE tables are built once per latent grid (and cached), and applied in float32 rather than float64 inside
  every block.
- Per-token timesteps (Wan 2.2 TI2V) are embedded once per distinct value and gathered per token, so a
  [B, L] timestep costs a few rows of time embedding instead of B*L rows of float64 and float32.
- All sequences in a batch share one grid, so there is no per-sample loop or padding to `seq_len`.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import DiTConfig

CLIP_DIM = 1280  # width of the CLIP ViT-H image tokens that the Wan 2.1 I2V `img_emb` projects


# ----------------------------------------------------------------------------------------------------------
# Helpers: embeddings and RoPE
# ----------------------------------------------------------------------------------------------------------

def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep embedding [N] -> [N, dim] in float64: `[cos(t*f), sin(t*f)]`, f = 10000^(-i/(dim/2))."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    angles = torch.outer(position, freqs)                                      # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)            # [N, dim]


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """How many rotary (complex) pairs of a head go to the frame, height and width axes (22/21/21 at 128)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_frequencies(head_dim: int, grid: Sequence[int], device=None, theta: float = 10000.0) -> torch.Tensor:
    """Rotations of every token of an (f, h, w) grid, in token order: complex64 [F*H*W, 1, head_dim/2].

    Each axis has its own frequency ladder 1/theta^(2i/d_axis) over its own share d_axis of the head, as in
    the official `rope_params`. The angles are taken in float64 on the small per-axis tables only, then the
    complex64 tables are broadcast over the grid.
    """
    tables = []
    for axis, (n, pairs) in enumerate(zip(grid, rope_axis_pairs(head_dim))):
        d_axis = 2 * pairs
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, d_axis, 2, dtype=torch.float64).div(d_axis))
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)   # [n, pairs]
        table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)
        shape = [1, 1, 1, pairs]
        shape[axis] = n
        tables.append(table.view(shape).expand(*grid, pairs))
    return torch.cat(tables, dim=-1).reshape(math.prod(grid), 1, head_dim // 2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, n, d] (float32) by freqs [L, 1, d/2] (complex64)."""
    rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs         # [B, L, n, d/2]
    return torch.view_as_real(rotated).flatten(-2)                             # [B, L, n, d]


# In bf16 on a CPU (training under autocast), attention whose score matrix holds at most this many entries is
# computed as two matrix products and a softmax instead of PyTorch's fused kernel. benchmarks/attention_cpu.py, 2
# threads: the fused kernel is 1.6-3 times slower for short keys (a picture's 64 tokens, 48 text tokens) and faster
# for a 320-token clip alone (explicit 0.5x forward, 0.86x forward + backward); a whole built-in training step went
# from 1.20 s to 1.01 s (choosing by key length <= 64 instead measured the same within this machine's noise).
# In fp32 the fused kernel is as fast or faster, so sampling keeps it.
SMALL_ATTENTION = 1 << 22


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) softmax attention, q [B, Lq, n, d], k/v [B, Lk, n, d] -> [B, Lq, n*d]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)             # [B, n, L, d]
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_ATTENTION):
        out = explicit_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)                                      # [B, Lq, n*d]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products, the softmax in float32; q [B, n, Lq, d], k/v [B, n, Lk, d]."""
    scores = torch.matmul(q, k.transpose(-1, -2) * q.shape[-1] ** -0.5)          # [B, n, Lq, Lk]
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, all float32; shift/scale [B, 1 or L, C] broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)


def pad_context(context: torch.Tensor | Sequence[torch.Tensor], text_len: int) -> torch.Tensor:
    """Text embeddings, a tensor [B, L, D] or a list of [L_i, D], zero-padded at the end to [B, text_len, D].

    Wan attends to the padding rows (there is no mask), so padding to exactly `text_len` is part of the
    model's numerics, not an optimisation. Longer contexts are kept whole: nothing in the model depends on
    the context length, but the released models never saw more than `text_len` tokens.
    """
    rows = list(context.unbind(0)) if isinstance(context, torch.Tensor) and context.ndim == 3 else list(context)
    if not rows or any(not isinstance(u, torch.Tensor) or u.ndim != 2 for u in rows):
        raise ValueError("the text context must be a [B, L, D] tensor or a non-empty list of [L_i, D] tensors "
                         "(one per prompt, as the text encoder returns them)")
    length = max(text_len, max(u.shape[0] for u in rows))
    return torch.stack([F.pad(u, (0, 0, 0, length - u.shape[0])) for u in rows])  # [B, text_len, D]


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class PatchEmbedding(nn.Conv3d):
    """Conv3d that, like ops.Linear, casts its stored weight (e.g. fp8) to the input's dtype on the fly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class WanRMSNorm(nn.Module):
    """RMS norm over the whole projection (all heads together), computed and returned in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] -> [B, L, C] float32
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed and returned in float32, whatever the dtype of its input or affine weights."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, device=None, dtype=None):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] -> [B, L, C] float32
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = ops.Linear(dim, dim, **kw)
        self.k = ops.Linear(dim, dim, **kw)
        self.v = ops.Linear(dim, dim, **kw)
        self.o = ops.Linear(dim, dim, **kw)
        self.norm_q = WanRMSNorm(dim, eps, **kw)
        self.norm_k = WanRMSNorm(dim, eps, **kw)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] compute dtype; freqs: [L, 1, d/2] complex64
        heads = (self.num_heads, self.head_dim)
        # The norm and the rotation run in float32 (the official code rotates in float64); one rounding after.
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), freqs).to(x.dtype)   # [B, L, n, d]
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), freqs).to(x.dtype)   # [B, L, n, d]
        v = self.v(x).unflatten(2, heads)                                               # [B, L, n, d]
        return self.o(attention(q, k, v))                                               # [B, L, C]


class WanCrossAttention(WanSelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C], context: [B, L_text, C], both compute dtype
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).to(x.dtype).unflatten(2, heads)                    # [B, L, n, d]
        k = self.norm_k(self.k(context)).to(x.dtype).unflatten(2, heads)              # [B, L_text, n, d]
        v = self.v(context).unflatten(2, heads)                                        # [B, L_text, n, d]
        return self.o(attention(q, k, v))                                              # [B, L, C]


class WanI2VCrossAttention(WanCrossAttention):
    """Wan 2.1 I2V cross-attention: text keys plus 257 CLIP image keys. Built so such checkpoints load."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(dim, num_heads, eps, device=device, dtype=dtype)
        self.k_img = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.v_img = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.norm_k_img = WanRMSNorm(dim, eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(_CLIP_BRANCH_UNSUPPORTED)


class MLPProj(nn.Module):
    """Wan 2.1 I2V projection of CLIP image tokens into the model width (`img_emb`)."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim, **kw), ops.Linear(in_dim, in_dim, **kw), nn.GELU(),
            ops.Linear(in_dim, out_dim, **kw), nn.LayerNorm(out_dim, **kw))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(_CLIP_BRANCH_UNSUPPORTED)


_CLIP_BRANCH_UNSUPPORTED = (
    "the Wan 2.1 I2V CLIP image branch is not supported yet; use Wan 2.2 I2V A14B or TI2V-5B for image-to-video")


def _per_token(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a per-timestep table [U, C] for each token: index [B, T] -> [B, T, C] (T is 1 or L)."""
    return table[index]


class WanAttentionBlock(nn.Module):
    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        dim, eps = config.dim, config.eps
        cross_attention = WanI2VCrossAttention if config.image_embedding else WanCrossAttention
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, eps, **kw)
        # Official names: norm3 is the affine pre-cross-attention norm, norm2 the pre-FFN one.
        # The small affine and modulation tensors stay float32: they are applied in float32 anyway.
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True, device=device, dtype=torch.float32)
        self.cross_attn = cross_attention(dim, config.num_heads, eps, **kw)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            ops.Linear(dim, config.ffn_dim, **kw), nn.GELU(approximate="tanh"), ops.Linear(config.ffn_dim, dim, **kw))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim, device=device, dtype=torch.float32) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, index: torch.Tensor, context: torch.Tensor,
                freqs: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] float32 residual stream; e0: [U, 6, C] float32, one row per distinct timestep;
        # index: [B, 1 or L] which row each token uses; context: [B, L_text, C] compute dtype; freqs: [L, 1, d/2]
        dtype = context.dtype
        mod = self.modulation.float() + e0                     # [U, 6, C]: shift, scale, gate (attn); same (FFN)
        y = self.self_attn(modulate(self.norm1(x), _per_token(mod[:, 0], index),
                                    _per_token(mod[:, 1], index)).to(dtype), freqs)
        x = x + y * _per_token(mod[:, 2], index)               # [B, L, C] float32
        x = x + self.cross_attn(self.norm3(x).to(dtype), context)
        y = self.ffn(modulate(self.norm2(x), _per_token(mod[:, 3], index),
                              _per_token(mod[:, 4], index)).to(dtype))
        return x + y * _per_token(mod[:, 5], index)            # [B, L, C] float32


class Head(nn.Module):
    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        dim = config.dim
        self.norm = WanLayerNorm(dim, config.eps)
        self.head = ops.Linear(dim, config.out_dim * math.prod(config.patch_size), device=device, dtype=dtype)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim, device=device, dtype=torch.float32) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] float32; e: [U, C] float32 time embedding (not the 6x projection); index: [B, 1 or L]
        mod = self.modulation.float() + e.unsqueeze(1)         # [U, 2, C]: shift, scale
        x = modulate(self.norm(x), _per_token(mod[:, 0], index), _per_token(mod[:, 1], index))
        return self.head(x)                                    # [B, L, out_dim*pt*ph*pw], float32 like the official head


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

class WanModel(nn.Module):
    """Wan 2.1 / 2.2 diffusion transformer: predicts the flow velocity (noise - x0) of a video latent.

    `dtype` is the compute dtype of the big layers (float32, bfloat16 or float16); the modulation tables
    and affine norms are kept in float32. A loader may replace Linear weights by fp8 ones (see ops.Linear).
    """

    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of an even size "
                             f"(RoPE rotates channel pairs); check the DiTConfig")
        kw = dict(device=device, dtype=dtype)
        self.config = config
        dim = config.dim
        self.patch_embedding = PatchEmbedding(config.in_dim, dim, kernel_size=config.patch_size,
                                              stride=config.patch_size, **kw)
        self.text_embedding = nn.Sequential(
            ops.Linear(config.text_dim, dim, **kw), nn.GELU(approximate="tanh"), ops.Linear(dim, dim, **kw))
        self.time_embedding = nn.Sequential(ops.Linear(config.freq_dim, dim, **kw), nn.SiLU(), ops.Linear(dim, dim, **kw))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, **kw))
        self.blocks = nn.ModuleList(WanAttentionBlock(config, **kw) for _ in range(config.num_layers))
        self.head = Head(config, **kw)
        if config.image_embedding:
            self.img_emb = MLPProj(CLIP_DIM, dim, **kw)
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """The RoPE table of a grid, built once: a sampler calls the model many times on the same grid."""
        key = (grid, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 4:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_frequencies(self.config.head_dim, grid, device)
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | Sequence[torch.Tensor]
                ) -> torch.Tensor:
        """x [B, in_dim, F, H, W] latent; t [B] timesteps in [0, 1000] or [B, F*(H/2)*(W/2)] per token, in
        (f, h, w) order; context [B, L, text_dim] or a list of [L_i, text_dim] (zero-padded to text_len here).
        Returns the velocity [B, out_dim, F, H, W] in x's dtype."""
        cfg = self.config
        if cfg.image_embedding:
            raise NotImplementedError(_CLIP_BRANCH_UNSUPPORTED)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(_describe_input_mismatch(tuple(x.shape), cfg.in_dim))
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent frames x height x width {f}x{h}x{w} must be multiples of the patch size "
                             f"{pt}x{ph}x{pw}; pick a video size whose latent divides evenly")
        grid = (f // pt, h // ph, w // pw)
        dtype = ops.compute_dtype_of(self)

        # Time: embed each distinct timestep once (float64 sinusoid, float32 MLP), then index per token.
        levels, index = timestep_levels(t, b, math.prod(grid), x.device)        # [U], [B, 1 or L]
        with torch.autocast(x.device.type, enabled=False):
            # a few rows of float64, taken on the CPU (not every accelerator has float64)
            sinusoid = sinusoidal_embedding_1d(cfg.freq_dim, levels.cpu()).to(x.device, torch.float32)
            e = self.time_embedding(sinusoid)                                               # [U, C]
            e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))                          # [U, 6, C]

        context = pad_context(context, cfg.text_len).to(device=x.device, dtype=dtype)      # [B, L_text, D]
        if context.shape[0] != b or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"text context of shape {tuple(context.shape)} does not fit: expected {b} prompts "
                             f"of width {cfg.text_dim} (the umT5-XXL encoder output for Wan)")
        context = self.text_embedding(context)                                              # [B, L_text, C]

        hidden = self.patch_embedding(x.to(dtype))                                          # [B, C, F', H', W']
        hidden = hidden.flatten(2).transpose(1, 2).contiguous().float()                     # [B, L, C] float32
        freqs = self.rope(grid, x.device)                                                   # [L, 1, d/2]
        for block in self.blocks:
            hidden = block(hidden, e0, index, context, freqs)                               # [B, L, C] float32

        with torch.autocast(x.device.type, enabled=False):
            out = self.head(hidden, e, index)                                               # [B, L, pt*ph*pw*c]
        out = out.view(b, *grid, pt, ph, pw, cfg.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_dim, f, h, w)        # [B, c, F, H, W]
        return out.to(x.dtype)


def timestep_levels(t: torch.Tensor | float, batch: int, tokens: int, device=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct timesteps [U] and, per sample and token, which one applies: index [B, 1] or [B, tokens]."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        t = t.reshape(1, 1).expand(batch, 1)
    elif t.ndim == 1 and t.shape[0] == batch:
        t = t[:, None]
    elif t.ndim == 2 and t.shape[1] == tokens and t.shape[0] in (1, batch):
        t = t.expand(batch, tokens)
    else:
        raise ValueError(f"timestep of shape {tuple(t.shape)} does not fit a batch of {batch} with {tokens} tokens: "
                         f"expected [B] (one per sample) or [B, {tokens}] (one per token, in (f, h, w) order)")
    levels, index = torch.unique(t, return_inverse=True)
    return levels, index


def _describe_input_mismatch(shape: tuple, in_dim: int) -> str:
    if len(shape) == 5 and in_dim == 36 and shape[1] == 16:
        return ("this is an image-to-video model (in_dim 36): the input must be the 16 noise channels, a 4-channel "
                "first-frame mask and 16 image-latent channels concatenated on dim 1; got 16 channels")
    return f"latent of shape {shape} does not fit this model: expected [B, {in_dim}, frames, height, width]"


# ----------------------------------------------------------------------------------------------------------
# Checkpoint key names: official <-> diffusers (`WanTransformer3DModel`)
# ----------------------------------------------------------------------------------------------------------

# Module (or parameter) names; "#" stands for a block index. Follows diffusers'
# scripts/convert_wan_to_diffusers.py. Mind norm3 <-> norm2 and head.modulation <-> the top-level table.
_OFFICIAL_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "blocks.#.modulation": "blocks.#.scale_shift_table",
    "blocks.#.norm3": "blocks.#.norm2",
    "blocks.#.ffn.0": "blocks.#.ffn.net.0.proj",
    "blocks.#.ffn.2": "blocks.#.ffn.net.2",
    **{f"blocks.#.{ours}.{a}": f"blocks.#.{theirs}.{b}"
       for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "blocks.#.cross_attn.k_img": "blocks.#.attn2.add_k_proj",
    "blocks.#.cross_attn.v_img": "blocks.#.attn2.add_v_proj",
    "blocks.#.cross_attn.norm_k_img": "blocks.#.attn2.norm_added_k",
}
_DIFFUSERS_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_DIFFUSERS.items()}
# Present in some diffusers Wan 2.1 I2V files, unused by diffusers itself and absent from the official model.
_DIFFUSERS_UNUSED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")

V = TypeVar("V")


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    block = _BLOCK.match(key)
    generic = f"blocks.#.{key[block.end():]}" if block else key
    module, _, param = generic.rpartition(".")
    if generic in table:                     # a parameter that is its own module entry (modulation tables)
        new = table[generic]
    elif module in table:
        new = f"{table[module]}.{param}"
    else:
        return None
    return new.replace("#", block.group(1)) if block else new


def _rename_all(state_dict: Mapping[str, V], table: Mapping[str, str], source: str) -> dict[str, V]:
    out, unknown = {}, []
    for key, value in state_dict.items():
        if source == "diffusers" and _DIFFUSERS_UNUSED.match(key):
            continue
        new = _rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not {source} Wan transformer keys, e.g. {unknown[:5]}; "
                         f"strip any prefix (such as 'model.diffusion_model.') and pass only the transformer's "
                         f"weights")
    return out


def map_diffusers_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename a diffusers `WanTransformer3DModel` state_dict to the official Wan names (values untouched)."""
    return _rename_all(state_dict, _DIFFUSERS_TO_OFFICIAL, "diffusers")


def official_to_diffusers_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename an official Wan transformer state_dict to diffusers `WanTransformer3DModel` names."""
    return _rename_all(state_dict, _OFFICIAL_TO_DIFFUSERS, "official")
