"""How a built-in VAE codes the Shapes World: what its reconstructions score, and how alike one object's code is from
one latent frame to the next.

The transformer has to carry an object from latent frame to latent frame. With Wan's causal VAE the first latent
frame codes one picture and each later one four frames, and nothing in reconstruction training makes the codes of
the same object agree across them. This script measures that, on rendered single-object clips:

- reconstruction: the evaluator's verdict on the decoded clips (the ceiling for anything the model generates), and
  per shape, moving and standing, how much of its bounding box the decoded object fills against the rendered one,
  and for moving squares and triangles that fill frame by frame;
- per latent frame, the size of the object's code (its departure from the clip's background code, at its peak);
- per latent frame, the cosine between that code and the first frame's (1 = the same direction);
- blending: the decoded average of two clips' latents against the average of their pictures. Early in sampling the
  transformer's estimate of the clean latent is an average over the clips the prompt allows; a decoder that turns
  averaged codes into other colours (measured: cyan objects averaged decoded yellow) misleads every step after.

    python benchmarks/latent_space.py                          # pipeline/builtin/zoetrope_builtin_vae.safetensors
    python benchmarks/latent_space.py --vae builtin-training/vae.pt --clips 48

A `.pt` file is a `zoetrope train-builtin` checkpoint (the vae stage); its latent statistics are
measured here as the training command does.
"""
from __future__ import annotations

import argparse
import numpy as np
import torch

from zoetrope.pipeline import builtin, load_vae
from zoetrope.pipeline.vae import WanVAE
from zoetrope.pipeline.world import evaluate, scene as world, train


def load(path: str) -> WanVAE:
    if not path.endswith(".pt"):
        return load_vae(path, dtype=torch.float32)
    vae = WanVAE(train.VAE_CONFIG)
    vae.load_state_dict(torch.load(path, weights_only=False)["model"])
    vae.eval()
    train.attach_latent_stats(vae, 1234, torch.device("cpu"), 32)
    return vae


def object_codes(z: torch.Tensor) -> torch.Tensor:
    """z [z, T', H', W'] normalised latent of a one-object clip -> [T', z]: the object's code in each latent
    frame, taken where the latent departs most from the frame's background (its median code)."""
    background = z.flatten(2).median(dim=2).values[..., None, None]
    departure = z - background
    peak = departure.norm(dim=0).flatten(1).argmax(dim=1)                      # [T'] flat positions
    return torch.stack([departure[:, f].flatten(1)[:, int(i)] for f, i in enumerate(peak)])


def median_fill(clips: list[np.ndarray], frame: int) -> float:
    """Median bounding-box fill of the object in one frame of each clip (uint8 [T, H, W, 3]); nan if never found."""
    found = [objects[0].fill for objects in (evaluate.analyse(c[frame:frame + 1]).objects for c in clips) if objects]
    return float(np.median(found)) if found else float("nan")


def channel_error(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Mean over the pixels `where` of the largest channel difference, in 0-255 steps (frames in -1..1)."""
    return (a - b).abs().amax(dim=1, keepdim=True)[where].mean().item() * 127.5


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default=str(builtin.VAE))
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = load(args.vae)
    rng = np.random.default_rng(args.seed)
    scenes = [world.sample_scene(rng, 1) for _ in range(args.clips)]
    moving = [s.objects[0].motion != "standing still" for s in scenes]
    rendered = np.stack([world.render(s) for s in scenes])                                # uint8 [n, T, H, W, 3]
    video = evaluate.to_video(rendered)
    z = vae.normalize(vae.encode(video))
    decoded = vae.decode(vae.denormalize(z))
    decoded_frames = [evaluate.to_frames(d) for d in decoded]                            # uint8 [T, H, W, 3] each
    scores = [evaluate.score(f, world.prompt(s)) for f, s in zip(decoded_frames, scenes)]
    verdict = evaluate.summarise(scores)
    # Each clip blended half and half with the next one; errors in 0-255 steps, on the pixels where either clip
    # shows an object (the backgrounds are easy and would hide the difference).
    blend = vae.decode(vae.denormalize(0.5 * (z + z.roll(1, dims=0))))
    target = 0.5 * (video + video.roll(1, dims=0))
    objects = train._object_weight(video) > 1
    recon_error = channel_error(decoded, video, objects)
    blend_error = channel_error(blend, target, objects | objects.roll(1, dims=0))
    codes = [object_codes(c) for c in z]
    size = np.stack([c.norm(dim=1).numpy() for c in codes])
    cosine = np.stack([torch.nn.functional.cosine_similarity(c[:1], c, dim=1).numpy() for c in codes])
    print(f"{args.vae}: {args.clips} clips")
    print(f"reconstruction judged correct: all {verdict['single_all']:.0%}, colour {verdict['single_colour']:.0%}, "
          f"shape {verdict['single_shape']:.0%}, motion {verdict['single_motion']:.0%}")
    # Shape is judged by how much of its bounding box an object fills; a decoder that rounds corners and apexes
    # moves squares and triangles towards the disc's 0.79.
    print("per shape: judged right; median bounding-box fill, decoded / rendered")
    for shape in world.SHAPES:
        for moves in (True, False):
            picked = [(r, clip) for r, clip, s, m in zip(scores, rendered, scenes, moving)
                      if s.objects[0].shape == shape and m == moves]
            found = [r["objects"][0]["detected"].fill for r, _ in picked if r["objects"][0]["detected"] is not None]
            if found:
                truth = [evaluate.analyse(clip).objects[0].fill for _, clip in picked]
                right = np.mean([r["objects"][0]["shape"] for r, _ in picked])
                print(f"  {shape:<9}{'moving' if moves else 'standing':<9}{right:5.0%} of {len(picked):3d}; "
                      f"fill {np.median(found):.2f} / {np.median(truth):.2f}")
    # Frame by frame: the first latent frame codes one picture, each later one several frames of the motion.
    print("moving objects' median fill by frame, decoded / rendered (median of frames)")
    for shape in ("square", "triangle"):
        chosen = [i for i, s in enumerate(scenes) if s.objects[0].shape == shape and moving[i]]
        if not chosen:
            continue
        per_frame = [median_fill([decoded_frames[i] for i in chosen], t) for t in range(rendered.shape[1])]
        truth = np.median([median_fill([rendered[i] for i in chosen], t) for t in range(rendered.shape[1])])
        print(f"  {shape:<9}" + " ".join(f"{v:.2f}" for v in per_frame) + f" / {truth:.2f}")
    print(f"object pixels, mean largest channel error (0-255): reconstruction {recon_error:.1f}, "
          f"half-and-half blend of two clips {blend_error:.1f}")
    print("latent frame                    " + " ".join(f"{f:>6d}" for f in range(size.shape[1])))
    print("object code size (median)       " + " ".join(f"{v:6.2f}" for v in np.median(size, 0)))
    print("cosine to frame 0 (median)      " + " ".join(f"{v:6.2f}" for v in np.median(cosine, 0)))
    print("cosine to frame 0 (worst clip)  " + " ".join(f"{v:6.2f}" for v in cosine.min(0)))


if __name__ == "__main__":
    main()
