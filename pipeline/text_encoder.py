"""The umT5-XXL encoder that conditions Wan, and the text-encoder object the pipeline uses.

Follows the official Wan 2.1 T5 encoder (wan/modules/t5.py, `umt5_xxl(encoder_only=True)`), module names
included, so the official `models_t5_umt5-xxl-enc-bf16.pth` loads 1:1. The Hugging Face `UMT5EncoderModel`
layout (ComfyUI's umt5_xxl files, diffusers' text_encoder/) goes through `map_hf_keys` first.

What makes it umT5 rather than T5: every layer owns its relative position bias (T5 shares layer 0's), the
attention logits are not scaled by 1/sqrt(d), and the FFN is gated with the tanh GELU.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import TextEncoderConfig
from .tokenizer import MAX_LENGTH, Tokenizer


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # Activations of the real model overflow fp16 in a few channels; clamping keeps them finite. No other
    # dtype needs (or gets) it, so bf16/fp32 results are untouched.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of `key - query` offsets: half the buckets per direction, of which the first
    half are exact offsets and the rest grow logarithmically up to `max_distance` (then saturate)."""
    num_buckets //= 2
    buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = rel_pos.abs()
    max_exact = num_buckets // 2
    # log(0) = -inf for offset 0 is harmless: torch.where picks the exact branch there.
    large = max_exact + (torch.log(rel_pos.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; the mean square is taken in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C]
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # Half-precision weights bring the activations back to their dtype; fp32 weights keep fp32.
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """A learned scalar per (bucket, head), added to the attention logits."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128, device=None, dtype=None):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel_pos = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]  # [Lq, Lk]
        buckets = relative_position_bucket(rel_pos, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, N, Lq, Lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = ops.Linear(dim, dim_attn, bias=False, device=device, dtype=dtype)
        self.k = ops.Linear(dim, dim_attn, bias=False, device=device, dtype=dtype)
        self.v = ops.Linear(dim, dim_attn, bias=False, device=device, dtype=dtype)
        self.o = ops.Linear(dim_attn, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C]; mask: [B, L] (1 = token, 0 = padding) or None; pos_bias: [1, N, L, L]
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c)  # [B, L, N, c]
        k = self.k(x).view(b, -1, n, c)
        v = self.v(x).view(b, -1, n, c)

        bias = pos_bias.to(x.dtype).expand(b, -1, -1, -1)  # [B, N, L, L]
        if mask is not None:
            # Padding is hidden as a key only: padded query rows still compute, and are dropped by the caller.
            bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)

        # T5 folds the scale into its initialisation: no 1/sqrt(c) here.
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias  # [B, N, L, L]
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        x = torch.einsum("bnij,bjnc->binc", attn, v)  # [B, L, N, c]
        return self.o(x.reshape(b, -1, n * c))  # [B, L, C]


class T5FeedForward(nn.Module):
    """Gated FFN: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int, device=None, dtype=None):
        super().__init__()
        # A Sequential only so that the checkpoint key is `gate.0.weight`, as in the official model.
        self.gate = nn.Sequential(ops.Linear(dim, dim_ffn, bias=False, device=device, dtype=dtype),
                                  nn.GELU(approximate="tanh"))
        self.fc1 = ops.Linear(dim, dim_ffn, bias=False, device=device, dtype=dtype)
        self.fc2 = ops.Linear(dim_ffn, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] -> [B, L, dim_ffn] -> [B, L, C]
        return self.fc2(self.fc1(x) * self.gate(x))


class T5SelfAttention(nn.Module):
    """One encoder block: pre-norm self-attention with its own relative bias, then pre-norm FFN."""

    def __init__(self, config: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim, config.eps, device=device, dtype=dtype)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads, device=device, dtype=dtype)
        self.norm2 = T5LayerNorm(config.dim, config.eps, device=device, dtype=dtype)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn, device=device, dtype=dtype)
        self.pos_embedding = T5RelativeEmbedding(config.num_buckets, config.num_heads, config.max_distance,
                                                 device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, L, C]
        pos_bias = self.pos_embedding(x.size(1), x.size(1))  # [1, N, L, L]
        x = fp16_clamp(x + self.attn(self.norm1(x), mask, pos_bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: token embedding, `num_layers` blocks, final RMS norm. The official model's
    dropout is only active in training, so inference leaves it out."""

    def __init__(self, config: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(T5SelfAttention(config, device=device, dtype=dtype)
                                    for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim, config.eps, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # ids: [B, L] int; mask: [B, L], nonzero for tokens, 0 for padding
        # An fp8-stored embedding is looked up as fp8 and cast, like ops.Linear does for weights.
        x = self.token_embedding(ids).to(ops.compute_dtype_of(self))  # [B, L, C]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)  # [B, L, C]


# Hugging Face / ComfyUI module paths -> official Wan ones. A key keeps whatever follows the module path
# (`weight`, and in fp8 files `scale_weight` / `weight_scale` ...), so quantisation extras map with it.
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.layer\.([01])\.(.+)$")
_HF_BLOCK_MODULES = {
    ("0", "layer_norm"): "norm1",
    ("0", "SelfAttention.q"): "attn.q",
    ("0", "SelfAttention.k"): "attn.k",
    ("0", "SelfAttention.v"): "attn.v",
    ("0", "SelfAttention.o"): "attn.o",
    ("0", "SelfAttention.relative_attention_bias"): "pos_embedding.embedding",
    ("1", "layer_norm"): "norm2",
    ("1", "DenseReluDense.wi_0"): "ffn.gate.0",  # the GELU branch
    ("1", "DenseReluDense.wi_1"): "ffn.fc1",     # the linear branch
    ("1", "DenseReluDense.wo"): "ffn.fc2",
}
_HF_TOP_MODULES = {"shared": "token_embedding", "encoder.embed_tokens": "token_embedding",
                   "encoder.final_layer_norm": "norm"}
# ComfyUI stores the SentencePiece model beside the weights; the tokenizer reads it, the encoder does not.
TOKENIZER_KEY = "spiece_model"


def _map_hf_key(key: str) -> str:
    m = _HF_BLOCK.match(key)
    if m:
        index, layer, rest = m.groups()
        module, _, leaf = rest.rpartition(".")
        ours = _HF_BLOCK_MODULES.get((layer, module))
        return f"blocks.{index}.{ours}.{leaf}" if ours else key
    module, _, leaf = key.rpartition(".")
    ours = _HF_TOP_MODULES.get(module)
    return f"{ours}.{leaf}" if ours else key


def map_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `UMT5EncoderModel` state dict (ComfyUI's umt5_xxl files, diffusers'
    text_encoder/) to the official Wan names that `UMT5Encoder` uses. Tensors are not copied.

    `shared.weight` and `encoder.embed_tokens.weight` are one tied tensor: the first wins and the second is
    dropped; either alone is used. `spiece_model` is left out. Keys already in Wan naming, and keys this
    mapping does not know, pass through unchanged, so that a strict load names anything unexpected."""
    has_shared = any(k.startswith("shared.") for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == TOKENIZER_KEY or (has_shared and key.startswith("encoder.embed_tokens.")):
            continue
        out[_map_hf_key(key)] = value
    return out


class TextEncoder:
    """umT5 encoder + its tokenizer: prompts in, one embedding matrix per prompt out."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: Tokenizer, max_length: int = MAX_LENGTH):
        if tokenizer.vocab_size > encoder.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the encoder embeds only "
                f"{encoder.config.vocab_size}: they do not belong together. Use the spiece.model of this "
                "umT5 checkpoint (for ComfyUI files, the `spiece_model` tensor inside it).")
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes (and returns) in; fp8 storage does not count."""
        return ops.compute_dtype_of(self.encoder)

    def to(self, *args, **kwargs) -> "TextEncoder":
        self.encoder.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> list[torch.Tensor]:
        """One [L_i, dim] tensor per prompt: the rows of its tokens and of the closing EOS, no padding.

        The batch runs padded to its longest prompt with the padding masked out as keys, which gives each
        prompt the same rows as running it alone (relative positions do not depend on the padding)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        ids, mask = self.tokenizer(prompts, max_length=self.max_length)  # [B, L], [B, L]
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.encoder(ids, mask)  # [B, L, dim]
        lengths = mask.sum(dim=1).tolist()
        return [x[i, :n] for i, n in enumerate(lengths)]
