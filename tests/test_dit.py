"""The Wan transformer: checkpoint layouts at the real sizes, and parity with diffusers' WanTransformer3DModel.

The parity models are tiny but keep every structural feature: two heads of 28 channels (so RoPE splits the
head 12/8/8 between frames, height and width), a non-square latent, a batch of two with different prompts and
timesteps, text shorter than text_len. Every tensor is randomised, including the output projection and the
modulation tables that the official initialisation zeroes or leaves near-trivial. Weights reach our model only
through `map_diffusers_keys`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zoetrope.pipeline import dit, ops
from zoetrope.pipeline.config import DiTConfig

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"

# The released configurations (wan-notes §2.1; the official config.json of each model).
REAL_CONFIGS = {
    "wan2.1_t2v_1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1_t2v_14B": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1_i2v_14B": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                                image_embedding=True),
    "wan2.2_t2v_A14B_expert": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2_i2v_A14B_expert": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
    "wan2.2_ti2v_5B": DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
}


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    tensors = {k: tuple(v["shape"]) for k, v in data["tensors"].items()}
    assert len(tensors) == data["num_tensors"]
    return tensors


def layout_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_state_dict_matches_the_official_checkpoint_layout(name):
    ours = layout_of(dit.WanModel(REAL_CONFIGS[name], device="meta"))
    expected = manifest(name)
    assert sorted(set(ours) - set(expected)) == [], "tensors the checkpoint does not have"
    assert sorted(set(expected) - set(ours)) == [], "checkpoint tensors we do not have"
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}, "shape mismatches"
    assert len(ours) == len(expected)


def test_diffusers_layout_maps_onto_ours():
    diffusers_layout = manifest("diffusers_wan2.1_t2v_1.3B_transformer")
    mapped = dit.map_diffusers_keys(diffusers_layout)
    assert len(mapped) == len(diffusers_layout)
    assert {k: tuple(v) for k, v in mapped.items()} == layout_of(
        dit.WanModel(REAL_CONFIGS["wan2.1_t2v_1.3B"], device="meta"))


def test_key_maps_are_inverse_and_cover_the_i2v_clip_branch():
    official = layout_of(dit.WanModel(REAL_CONFIGS["wan2.1_i2v_14B"], device="meta"))
    to_diffusers = dit.official_to_diffusers_keys(official)
    assert "blocks.3.attn2.add_k_proj.weight" in to_diffusers
    assert "blocks.3.norm2.bias" in to_diffusers and "scale_shift_table" in to_diffusers
    assert dit.map_diffusers_keys(to_diffusers) == official


def test_unknown_keys_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="model.diffusion_model"):
        dit.map_diffusers_keys({"model.diffusion_model.blocks.0.attn1.to_q.weight": 0})


# ------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------------------

TEXT_DIM = 32


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor random, at scales that keep activations O(1) through the tiny net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "scale_shift_table" not in name:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight"):          # norm gains
                p.copy_(1 + 0.2 * r)
            else:                                  # biases and modulation tables
                p.copy_(0.3 * r)


def tiny_pair(in_dim: int = 16, out_dim: int = 16, seed: int = 0):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=28, in_channels=in_dim,
        out_channels=out_dim, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    randomise_(reference, seed)
    ours = dit.WanModel(DiTConfig(dim=56, ffn_dim=64, num_heads=2, num_layers=2, in_dim=in_dim, out_dim=out_dim,
                                  text_dim=TEXT_DIM)).eval()
    ours.load_state_dict(dit.map_diffusers_keys(reference.state_dict()), strict=True)
    return ours, reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def prompts(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(7, TEXT_DIM, generator=generator), torch.randn(12, TEXT_DIM, generator=generator)]


def compare(ours, reference, x, t, context) -> float:
    padded = dit.pad_context(context, 512)                 # diffusers pads in its pipeline, not its model
    assert padded.shape == (x.shape[0], 512, TEXT_DIM) and padded[0, 7:].abs().max() == 0
    with torch.no_grad():
        got = ours(x, t, context)
        expected = reference(x, t, padded).sample
    assert got.shape == expected.shape == (x.shape[0], reference.config.out_channels, *x.shape[2:])
    err = relative_error(got, expected)
    print(f"max relative error {err:.2e}")
    return err


def test_t2v_matches_diffusers():
    ours, reference = tiny_pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 12, generator=g)          # non-square: grid 3 x 4 x 6
    assert compare(ours, reference, x, torch.tensor([999, 421]), prompts(g)) < 1e-4


def test_i2v_concatenated_channels_match_diffusers():
    ours, reference = tiny_pair(in_dim=36, out_dim=16, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 36, 2, 6, 10, generator=g)
    assert compare(ours, reference, x, torch.tensor([875.5, 3.25]), prompts(g)) < 1e-4


def test_per_token_timesteps_match_diffusers():
    """Wan 2.2 TI2V: the clean first frame is pinned at t=0, the rest of the tokens at the sample's t."""
    ours, reference = tiny_pair(seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    tokens_per_frame, tokens = 2 * 3, 3 * 2 * 3
    t = torch.tensor([[700.0] * tokens, [250.0] * tokens])
    t[:, :tokens_per_frame] = 0
    assert compare(ours, reference, x, t, prompts(g)) < 1e-4


def test_per_token_timesteps_equal_to_one_per_sample_give_the_same_output():
    ours, _ = tiny_pair(seed=6)
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 16, 2, 4, 4, generator=g), prompts(g)
    with torch.no_grad():
        per_sample = ours(x, torch.tensor([600, 30]), context)
        per_token = ours(x, torch.tensor([600, 30])[:, None].expand(2, 8), context)
    torch.testing.assert_close(per_token, per_sample, rtol=1e-5, atol=1e-5)


def test_context_list_and_padded_tensor_are_the_same_input():
    ours, _ = tiny_pair(seed=8)
    g = torch.Generator().manual_seed(9)
    x, context = torch.randn(2, 16, 1, 4, 4, generator=g), prompts(g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([500, 500]), context),
                                   ours(x, 500, dit.pad_context(context, 512)), rtol=1e-5, atol=1e-5)


def test_bfloat16_is_finite_and_close_to_float32():
    ours, _ = tiny_pair(seed=10)
    g = torch.Generator().manual_seed(11)
    x, t, context = torch.randn(2, 16, 3, 8, 12, generator=g), torch.tensor([999, 421]), prompts(g)
    half = dit.WanModel(ours.config, dtype=torch.bfloat16).eval()
    half.load_state_dict(ours.state_dict())
    assert half.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert half.blocks[0].modulation.dtype == torch.float32  # applied in float32, kept in float32
    with torch.no_grad():
        reference = ours(x, t, context)
        got = half(x, t, [c.bfloat16() for c in context])
    assert got.dtype == x.dtype and torch.isfinite(got).all()
    err = relative_error(got, reference)
    print(f"bf16 vs fp32 max relative error {err:.2e}")
    assert err < 3e-2


@pytest.mark.parametrize("lq,lk", [(40, 40), (40, 7), (300, 300)])
def test_short_bf16_attention_on_a_cpu_stays_within_bf16_precision_of_the_exact_result(lq, lk):
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, lq, 3, 16, generator=g)
    k, v = torch.randn(2, lk, 3, 16, generator=g), torch.randn(2, lk, 3, 16, generator=g)
    assert 2 * 3 * lq * lk <= dit.SMALL_ATTENTION
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2).flatten(2)
    got = dit.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    fused = torch.nn.functional.scaled_dot_product_attention(
        *(x.bfloat16().transpose(1, 2) for x in (q, k, v))).transpose(1, 2).flatten(2)
    assert got.dtype == torch.bfloat16 and got.shape == (2, lq, 48)
    # Within bf16's precision of the float64 result: the scores are rounded to bf16 before the softmax (the fused
    # kernel keeps them in fp32), which costs up to twice its error; a wrong scale or layout would be off by O(1).
    err, fused_err = relative_error(got.double(), reference), relative_error(fused.double(), reference)
    print(f"bf16 attention {lq}x{lk}: explicit {err:.1e}, fused {fused_err:.1e} max relative error")
    assert err < 2.5e-2
    torch.testing.assert_close(dit.attention(q, k, v), reference.float(), rtol=1e-5, atol=1e-5)   # fp32: fused


def test_fp8_weights_stay_fp8_and_match_the_dequantised_model():
    model, _ = tiny_pair(seed=12)
    quantised = dit.WanModel(model.config).eval()
    quantised.load_state_dict(model.state_dict())
    dequantised = dit.WanModel(model.config).eval()
    dequantised.load_state_dict(model.state_dict())
    with torch.no_grad():
        for q, d in zip(quantised.modules(), dequantised.modules()):
            if isinstance(q, ops.Linear):          # scaled fp8, one scale per layer
                scale = q.weight.abs().max() / torch.finfo(torch.float8_e4m3fn).max
                q.weight = torch.nn.Parameter((q.weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
                q.weight_scale = scale
                d.weight.copy_(q.weight.float() * scale)
    assert quantised.blocks[1].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert quantised.head.head.weight.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(13)
    x, t, context = torch.randn(2, 16, 2, 4, 6, generator=g), torch.tensor([999, 421]), prompts(g)
    with torch.no_grad():
        got, expected, unquantised = quantised(x, t, context), dequantised(x, t, context), model(x, t, context)
    err = relative_error(got, expected)
    print(f"fp8-stored vs dequantised fp32 max relative error {err:.2e}")
    assert err < 1e-5
    assert relative_error(got, unquantised) > 1e-4  # the weights really were rounded to fp8


# ------------------------------------------------------------------------------------------------------------
# Numerics that parity cannot see (diffusers computes these in float32)
# ------------------------------------------------------------------------------------------------------------

def test_sinusoid_is_cos_first_in_float64():
    emb = dit.sinusoidal_embedding_1d(256, torch.tensor([0, 999]))
    assert emb.dtype == torch.float64 and emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128, dtype=torch.float64))   # cos(0)
    assert torch.equal(emb[0, 128:], torch.zeros(128, dtype=torch.float64))  # sin(0)
    assert emb[1, 0].item() == pytest.approx(math.cos(999.0), abs=1e-12)


def test_rope_splits_a_128_channel_head_44_42_42_with_adjacent_pairs():
    assert dit.rope_axis_pairs(128) == (22, 21, 21)
    freqs = dit.rope_frequencies(128, (2, 3, 5))                  # [30, 1, 64]
    assert freqs.shape == (30, 1, 64) and freqs.dtype == torch.complex64
    token = lambda f, h, w: (f * 3 + h) * 5 + w                    # (f, h, w) row-major order
    # moving along w only rotates the last 21 pairs, along h only the middle 21, along f only the first 22
    origin = freqs[token(0, 0, 0), 0]
    assert torch.equal(freqs[token(1, 0, 0), 0, 22:], origin[22:]) and not torch.equal(freqs[token(1, 0, 0), 0], origin)
    assert torch.equal(freqs[token(0, 2, 0), 0, :22], origin[:22]) and torch.equal(freqs[token(0, 2, 0), 0, 43:], origin[43:])
    assert torch.equal(freqs[token(0, 0, 4), 0, :43], origin[:43]) and not torch.equal(freqs[token(0, 0, 4), 0], origin)
    # w axis: pair i of its 42 channels turns by 1/10000^(2i/42) radians per step
    angle = torch.angle(freqs[token(0, 0, 1), 0, 43 + 3]).item()
    assert angle == pytest.approx(1 / 10000 ** (6 / 42), rel=1e-6)
    x = torch.zeros(1, 30, 1, 128)
    x[..., 0] = 1.0                                               # first channel of the first pair
    rotated = dit.apply_rope(x, freqs)
    assert torch.allclose(rotated[0, token(1, 0, 0), 0, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_errors_name_what_to_do():
    model = dit.WanModel(DiTConfig(dim=56, ffn_dim=64, num_heads=2, num_layers=1, in_dim=36, text_dim=TEXT_DIM))
    context = [torch.randn(3, TEXT_DIM)]
    with pytest.raises(ValueError, match="image-to-video model"):
        model(torch.randn(1, 16, 1, 4, 4), torch.tensor([1]), context)
    with pytest.raises(ValueError, match="per token"):
        model(torch.randn(1, 36, 1, 4, 4), torch.zeros(1, 5), context)
    clip = dit.WanModel(DiTConfig(dim=56, ffn_dim=64, num_heads=2, num_layers=1, in_dim=36, text_dim=TEXT_DIM,
                                  image_embedding=True))
    with pytest.raises(NotImplementedError, match="Wan 2.2 I2V A14B or TI2V-5B"):
        clip(torch.randn(1, 36, 1, 4, 4), torch.tensor([1]), context)


def test_backward_reaches_every_parameter():
    """The built-in model trains this same module: gradients must flow to every weight."""
    model, _ = tiny_pair(seed=14)
    model.train()
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    model(x, torch.tensor([10.0, 800.0]), prompts(g)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
