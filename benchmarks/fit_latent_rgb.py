"""Fit the built-in model's latent-to-RGB preview projection from its VAE, and store it in latent_rgb.json.

Shapes World clips (the world the built-in model was trained on) are encoded by the built-in VAE; the latents are
standardised as the transformer samples them, and least squares finds the 16x3 factors and the bias that best
map each latent pixel to the mean colour of the pixels it encodes (nodes/preview.py fit_projection). Rerun it
whenever the built-in VAE is retrained:

    python benchmarks/fit_latent_rgb.py                 # pipeline/builtin/zoetrope_builtin_vae.safetensors
    python benchmarks/fit_latent_rgb.py --vae FILE --clips 96 --dry-run

It prints how much of the colour the projection explains (R^2 on clips it was not fitted on).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from zoetrope.nodes import preview
from zoetrope.pipeline import builtin, load_vae
from zoetrope.pipeline import world


def clips(n: int, seed: int, frames: int) -> torch.Tensor:
    """n Shapes World clips [n, 3, frames, 64, 64] in -1..1, one or two objects each."""
    rng = np.random.default_rng(seed)
    video = np.stack([world.render(world.sample_scene(rng, 1 + int(rng.random() < 0.5)), frames=frames)
                      for _ in range(n)])                                        # [n, T, H, W, 3] uint8
    return world.to_video(video)


@torch.no_grad()
def encode(vae, video: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Model-space latents of the clips (standardised with the VAE's own statistics)."""
    return torch.cat([vae.normalize(vae.encode(video[i:i + batch])) for i in range(0, len(video), batch)])


def explained(projection: preview.Projection, latents: torch.Tensor, video: torch.Tensor, temporal: int,
              spatial: int) -> float:
    """R^2 of the projected colours against the pooled pixels."""
    target = preview.pool_to_latent_grid(video, temporal, spatial).movedim(1, -1).reshape(-1, 3)
    factors = torch.tensor(projection.factors)
    guess = latents.movedim(1, -1).reshape(-1, latents.shape[1]) @ factors + torch.tensor(projection.bias)
    return float(1 - ((guess - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, default=builtin.VAE, help="the built-in VAE file")
    parser.add_argument("--clips", type=int, default=64, help="clips to fit on (as many again are held out)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="print the fit, do not write latent_rgb.json")
    args = parser.parse_args(argv)
    if not args.vae.is_file():
        print(f"error: no VAE at {args.vae}; train the built-in model first (`zoetrope train-builtin`) or pass --vae",
              file=sys.stderr)
        return 2

    torch.set_grad_enabled(False)
    vae = load_vae(args.vae, device="cpu", dtype=torch.float32)
    tc, sc = vae.temporal_compression, vae.spatial_compression
    fit_video, test_video = clips(args.clips, args.seed, args.frames), clips(args.clips, args.seed + 1, args.frames)
    projection = preview.fit_projection(encode(vae, fit_video), fit_video, tc, sc, "builtin")
    r2_fit = explained(projection, encode(vae, fit_video), fit_video, tc, sc)
    r2_test = explained(projection, encode(vae, test_video), test_video, tc, sc)
    print(f"built-in VAE {args.vae.name}: {vae.z_dim} channels, {tc}x{sc}x{sc} compression; "
          f"R^2 {r2_fit:.3f} on the {args.clips} fitted clips, {r2_test:.3f} on {args.clips} held-out clips")
    print("bias", projection.bias)
    if not args.dry_run:
        preview.save_projection(projection, f"least squares from the built-in VAE ({args.vae.name}) on "
                                            f"{args.clips} Shapes World clips; held-out R^2 {r2_test:.3f}")
        print(f"written to {preview.DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
