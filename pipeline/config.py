"""Model configurations: frozen dataclasses, one per architecture, and the released variants as data.

Every number here is read off the reference implementations (official Wan code, diffusers configs). A loader
never trusts a file name: it derives the config from the tensors (see checkpoints.py) and then looks up which
released variant, if any, has that shape, for the recommended sampler settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DiTConfig:
    """Wan transformer (`WanModel`)."""
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16            # 16 t2v; 36 i2v (noise + mask + image latents); 48 ti2v-5B
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512         # context is zero-padded to this many rows and attended without a mask
    eps: float = 1e-6
    rope_max_len: int = 1024    # positions per axis covered by the RoPE tables
    image_embedding: bool = False  # Wan 2.1 i2v CLIP branch (img_emb, k_img/v_img); not supported yet

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """Wan causal 3D VAE. Wan 2.1: z 16, 4x8x8. Wan 2.2: z 48, 2x2 patchify + residual blocks, 4x16x16."""
    dim: int = 96
    dec_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 1          # 2 for Wan 2.2 (pixels are patchified 2x2 before the encoder)
    residual: bool = False       # Wan 2.2's AvgDown3D / DupUp3D shortcut blocks
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z, latent frames, latent height, latent width) of a clip."""
        s = self.spatial_compression
        return (self.z_dim, 1 + (frames - 1) // self.temporal_compression, height // s, width // s)


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder: relative position bias in every layer, gated-GELU FFN, no 1/sqrt(d) scaling."""
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Wan 2.2 VAE (z 48) constants, from the official Wan2_2_VAE and diffusers' vae22 config.
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

WAN21_VAE = VAEConfig(dim=96, dec_dim=96, z_dim=16, latents_mean=WAN21_LATENT_MEAN, latents_std=WAN21_LATENT_STD)
WAN22_VAE = VAEConfig(dim=160, dec_dim=256, z_dim=48, patch_size=2, residual=True,
                      latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD)
UMT5_XXL = TextEncoderConfig()


@dataclass(frozen=True)
class Variant:
    """A released transformer and what its authors recommend for sampling it."""
    name: str                  # user-facing, e.g. "Wan 2.1 T2V 1.3B"
    family: str                # "wan2.1" | "wan2.2" | "builtin"
    kind: str                  # "t2v" | "i2v" | "ti2v"
    dim: int
    in_dim: int
    num_layers: int
    vae: str                   # "wan2.1" | "wan2.2" | "builtin"
    steps: int = 50
    cfg: float = 5.0
    shift: float = 5.0
    fps: int = 16
    frames: int = 81
    width: int = 832
    height: int = 480
    size_multiple: int = 16    # width/height must be multiples of this (VAE stride x patch)
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


VARIANTS = (
    Variant("Wan 2.1 T2V 1.3B", "wan2.1", "t2v", 1536, 16, 30, "wan2.1", steps=50, cfg=6.0, shift=8.0),
    Variant("Wan 2.1 T2V 14B", "wan2.1", "t2v", 5120, 16, 40, "wan2.1", steps=50, cfg=5.0, shift=8.0,
            width=1280, height=720),
    Variant("Wan 2.1 I2V 14B", "wan2.1", "i2v", 5120, 36, 40, "wan2.1", steps=40, cfg=5.0, shift=3.0),
    Variant("Wan 2.2 A14B (one expert)", "wan2.2", "t2v", 5120, 16, 40, "wan2.1", steps=40, cfg=4.0, shift=12.0,
            width=1280, height=720, notes="high-noise and low-noise experts switch at t = 875",
            extra={"boundary": 0.875, "cfg_high": 4.0, "cfg_low": 3.0}),
    Variant("Wan 2.2 I2V A14B (one expert)", "wan2.2", "i2v", 5120, 36, 40, "wan2.1", steps=40, cfg=3.5,
            shift=5.0, width=1280, height=720, extra={"boundary": 0.9, "cfg_high": 3.5, "cfg_low": 3.5}),
    Variant("Wan 2.2 TI2V 5B", "wan2.2", "ti2v", 3072, 48, 30, "wan2.2", steps=50, cfg=5.0, shift=5.0, fps=24,
            frames=121, width=1280, height=704, size_multiple=32),
)


def find_variant(dim: int, in_dim: int, num_layers: int) -> Variant | None:
    for v in VARIANTS:
        if (v.dim, v.in_dim, v.num_layers) == (dim, in_dim, num_layers):
            return v
    return None
