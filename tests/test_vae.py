"""The Wan VAE against the checkpoint layouts and against diffusers' AutoencoderKLWan.

Parity runs tiny random-weight models in float32 with weights carried over only through `map_diffusers_keys`,
so a wrong key mapping, a wrong block order or a wrong chunk/cache rule all show up as a mismatch.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from zoetrope.pipeline.config import WAN21_VAE, WAN22_VAE, VAEConfig
from zoetrope.pipeline.vae import WanVAE, map_diffusers_keys

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"


def layout(name: str) -> dict[str, list[int]]:
    tensors = json.loads((LAYOUTS / f"{name}.json").read_text())["tensors"]
    return {k: v["shape"] for k, v in tensors.items()}


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# 1. Layouts at the real sizes


@pytest.mark.parametrize("config,name", [(WAN21_VAE, "wan2.1_vae"), (WAN22_VAE, "wan2.2_vae")])
def test_state_dict_equals_official_layout(config, name):
    assert shapes(WanVAE(config, device="meta")) == layout(name)


def test_diffusers_wan21_layout_maps_onto_ours():
    mapped = map_diffusers_keys(layout("diffusers_wan2.1_vae"))
    assert mapped == shapes(WanVAE(WAN21_VAE, device="meta"))


def test_diffusers_wan22_layout_maps_onto_official():
    # diffusers' own Wan 2.2 VAE at the released size (the config its convert script uses)
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16)
    assert map_diffusers_keys(shapes(ref)) == layout("wan2.2_vae")


@pytest.mark.parametrize("name", ["wan2.1_vae", "wan2.2_vae"])
def test_official_keys_pass_through_unchanged(name):
    official = layout(name)
    assert map_diffusers_keys(official) == official


def test_latent_statistics_are_not_weights():
    vae = WanVAE(WAN21_VAE, device="meta")
    assert not any("mean" in k or "std" in k for k in vae.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# 2. Numerical parity with diffusers on tiny random weights

TINY = {
    # Wan 2.1 topology: the flat indices (Resample at 3/7/11, the decoder shortcut at 4) of the real model
    "wan2.1": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True]),
               VAEConfig(dim=8, dec_dim=8, z_dim=4), (32, 48)),
    # Wan 2.2 topology: 2x2 patchify, residual stages, a decoder wider than the encoder
    "wan2.2": (dict(base_dim=8, decoder_base_dim=12, z_dim=8, is_residual=True, in_channels=12, out_channels=12,
                    patch_size=2, scale_factor_spatial=16),
               VAEConfig(dim=8, dec_dim=12, z_dim=8, patch_size=2, residual=True), (64, 96)),
    # a built-in-sized model: three stages (4x spatial), one block each, 2x in time
    "small": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True]),
              VAEConfig(dim=8, dec_dim=8, z_dim=4, dim_mult=(1, 2, 4), num_res_blocks=1,
                        temporal_downsample=(False, True)), (16, 24)),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every tensor drawn afresh, gains included, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


@functools.cache
def tiny_pair(kind: str) -> tuple[AutoencoderKLWan, WanVAE]:
    ref_kwargs, config, _ = TINY[kind]
    z = config.z_dim
    ref = AutoencoderKLWan(**ref_kwargs, latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()
    randomise(ref, seed=1)
    ours = WanVAE(config).eval()
    ours.load_state_dict(map_diffusers_keys(ref.state_dict()), strict=True)
    return ref, ours


def clip(kind: str, frames: int, batch: int = 1) -> torch.Tensor:
    height, width = TINY[kind][2]
    g = torch.Generator().manual_seed(frames)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [1, 5, 9])
@pytest.mark.parametrize("kind", list(TINY))
def test_encode_matches_diffusers(kind, frames):
    ref, ours = tiny_pair(kind)
    video = clip(kind, frames, batch=2 if kind == "small" else 1)
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.mean
        got = ours.encode(video)
    assert got.shape == expected.shape == (video.shape[0], *ours.latent_shape(*video.shape[2:]))
    err = rel_err(got, expected)
    print(f"encode {kind} T={frames}: max rel err {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("frames", [1, 5, 9])
@pytest.mark.parametrize("kind", list(TINY))
def test_decode_matches_diffusers(kind, frames):
    ref, ours = tiny_pair(kind)
    shape = ours.latent_shape(frames, *TINY[kind][2])
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(100 + frames))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == expected.shape == (1, 3, frames, *TINY[kind][2])
    assert got.abs().max() <= 1.0
    err = rel_err(got, expected)
    print(f"decode {kind} T={frames}: max rel err {err:.2e}")
    assert err < 1e-4


def test_posterior_sample_matches_diffusers():
    ref, ours = tiny_pair("wan2.1")
    video = clip("wan2.1", 5)
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        got = ours.encode(video, sample=True, generator=torch.Generator().manual_seed(7))
        mean = ours.encode(video, sample=False)
    assert rel_err(got, expected) < 1e-4
    assert not torch.equal(got, mean)


# ---------------------------------------------------------------------------------------------------------------
# 3. Progress callback and cancellation


class Cancelled(Exception):
    pass


def test_callback_runs_once_per_chunk():
    _, vae = tiny_pair("wan2.1")
    calls = []
    with torch.no_grad():
        z = vae.encode(clip("wan2.1", 9), callback=lambda done, total: calls.append((done, total)))
        assert calls == [(1, 3), (2, 3), (3, 3)]
        calls.clear()
        vae.decode(z, callback=lambda done, total: calls.append((done, total)))
        assert calls == [(1, 3), (2, 3), (3, 3)]


def test_cancelling_from_the_callback_leaves_the_model_usable():
    _, vae = tiny_pair("wan2.1")
    video = clip("wan2.1", 9)

    def cancel_at_2(done, total):
        if done == 2:
            raise Cancelled

    with torch.no_grad():
        fresh_z = vae.encode(video)
        fresh_video = vae.decode(fresh_z)
        with pytest.raises(Cancelled):
            vae.encode(video, callback=cancel_at_2)
        assert torch.equal(vae.encode(video), fresh_z)
        with pytest.raises(Cancelled):
            vae.decode(fresh_z, callback=cancel_at_2)
        assert torch.equal(vae.decode(fresh_z), fresh_video)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation, sizes, precision, errors


def test_normalize_is_the_official_scaling():
    vae = WanVAE(WAN21_VAE, device="meta")
    z = torch.randn(2, 16, 3, 4, 5)
    mean = torch.tensor(WAN21_VAE.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_VAE.latents_std).view(1, 16, 1, 1, 1)
    # the official WanVAE's encode scaling: (mu - mean) * (1 / std)
    torch.testing.assert_close(vae.normalize(z), (z - mean) * (1.0 / std))
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)


def test_normalize_without_statistics_is_identity():
    vae = WanVAE(VAEConfig(dim=8, dec_dim=8, z_dim=4), device="meta")
    z = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(vae.normalize(z), z) and torch.equal(vae.denormalize(z), z)


def test_sizes():
    v21, v22 = WanVAE(WAN21_VAE, device="meta"), WanVAE(WAN22_VAE, device="meta")
    assert (v21.z_dim, v21.temporal_compression, v21.spatial_compression) == (16, 4, 8)
    assert (v22.z_dim, v22.temporal_compression, v22.spatial_compression) == (48, 4, 16)
    assert v21.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert v22.latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    small = WanVAE(TINY["small"][1], device="meta")
    assert (small.temporal_compression, small.spatial_compression) == (2, 4)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_half_precision_follows_float32(dtype, tolerance):
    _, vae32 = tiny_pair("wan2.2")
    vae = WanVAE(vae32.config, dtype=dtype)
    vae.load_state_dict(vae32.state_dict())
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z32, z = vae32.encode(video), vae.encode(video.to(dtype))
        assert z.dtype == dtype
        x32, x = vae32.decode(z32), vae.decode(z32.to(dtype))
    assert x.dtype == dtype and torch.isfinite(z).all() and torch.isfinite(x).all()
    assert rel_err(z.float(), z32) < tolerance and rel_err(x.float(), x32) < tolerance


def test_wrong_sizes_are_refused():
    _, vae = tiny_pair("wan2.1")
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 6, 32, 48))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 36, 48))
    with pytest.raises(ValueError, match="z_dim 4"):
        vae.decode(torch.zeros(1, 16, 2, 4, 6))


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAE(VAEConfig(dim_mult=(1, 2, 4)), device="meta")
    with pytest.raises(ValueError, match="latents_mean"):
        WanVAE(VAEConfig(z_dim=4, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 4), device="meta")
