"""`zoetrope evaluate-builtin`: generate clips for fresh prompts of the Shapes World and judge them from pixels.

Prompts are drawn from the grammar with a seed the model never trained on; each clip is scored by
world.evaluate (which knows nothing of the model) and the totals are written as a JSON report beside a contact
sheet (first, middle and last frame of each clip, with its prompt). Image-to-video is scored too: a first frame
rendered from the world, and the scene's prompt, which names the motion to continue.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import sampling
from ..generate import frames_to_video, plan, sample, seeded_noise
from . import evaluate, scene as world


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


@torch.no_grad()
def generate_clips(dit, vae, te, prompts: list[str], first_frames: np.ndarray | None, *, seed: int, steps: int,
                   cfg: float, shift: float, solver: str, high_noise_cfg: float | None = None, batch: int = 16,
                   image_first: bool = False,
                   picture: dict | None = None, latents: list | None = None) -> np.ndarray:
    """Clips for many prompts, `batch` at a time: uint8 [N, T, H, W, 3]. first_frames: uint8 [N, H, W, 3].
    image_first (text-to-video only): draw each first frame as a one-frame clip, then continue it, as
    `zoetrope generate` does for the built-in model (builtin.IMAGE_FIRST); `picture` overrides the clip's sampler
    settings for that first frame (builtin.PICTURE: solver and guidance). `latents`, when given, collects each batch's
    normalised latents [b, z, T', h, w] before decoding."""
    p = plan(vae, world.FRAMES, world.SIZE, world.SIZE, patch=dit.config.patch_size)
    picture_shape = plan(vae, 1, world.SIZE, world.SIZE, patch=dit.config.patch_size).latent_shape
    device = next(dit.parameters()).device
    empty = te.encode([""])[0].to(device)
    out = []
    for start, chunk in _batches(prompts, batch):
        cond = [e.to(device) for e in te.encode(chunk)]
        uncond = [empty] * len(chunk)       # the sampler runs it only where the guidance needs it
        noise = seeded_noise((len(chunk), *p.latent_shape), seed + start).to(device)
        first = None
        if first_frames is not None:
            images = torch.from_numpy(first_frames[start:start + len(chunk)]).float() / 255      # [b, H, W, 3]
            video = torch.cat([frames_to_video(im[None]) for im in images])                      # [b, 3, 1, H, W]
            first = vae.normalize(vae.encode(video.to(device)).float())
        settings = dict(steps=steps, cfg=cfg, shift=shift, solver=solver, seed=seed + start,
                        high_noise_cfg=high_noise_cfg)
        if first_frames is None and image_first:
            drawn = {**settings, **(picture or {})}
            first = sample(dit, seeded_noise((len(chunk), *picture_shape), seed + start).to(device), cond, uncond,
                           **drawn)
        x = sample(dit, noise, cond, uncond, first_latent=first, **settings)
        if latents is not None:
            latents.append(x.cpu())
        video = vae.decode(vae.denormalize(x))
        out.extend(evaluate.to_frames(v) for v in video)
    return np.stack(out)


def run(dit, vae, te, *, single: int, two: int, i2v: int, seed: int, steps: int, cfg: float, shift: float,
        solver: str, out: Path, image_first: bool, high_noise_cfg: float | None = None, picture: dict | None = None,
        batch: int = 16, progress=print) -> dict:
    rng = np.random.default_rng(seed)
    cases = ([("single", world.sample_scene(rng, 1)) for _ in range(single)]
             + [("two", world.sample_scene(rng, 2)) for _ in range(two)]
             + [("i2v", world.sample_scene(rng, 1)) for _ in range(i2v)])
    t0 = time.time()
    results, clips = [], []
    for kind in ("single", "two", "i2v"):
        scenes = [s for k, s in cases if k == kind]
        if not scenes:
            continue
        prompts = [world.prompt(s) for s in scenes]
        firsts = np.stack([world.render(s, world.SIZE, 1)[0] for s in scenes]) if kind == "i2v" else None
        made = generate_clips(dit, vae, te, prompts, firsts, seed=seed + len(results), steps=steps, cfg=cfg,
                              high_noise_cfg=high_noise_cfg, shift=shift, solver=solver, batch=batch,
                              image_first=image_first, picture=picture)
        for prompt, clip in zip(prompts, made):
            s = evaluate.score(clip, prompt, image_to_video=kind == "i2v")
            s.pop("detections")
            results.append({"kind": kind, **_jsonable(s)})
            clips.append(clip)
        progress(f"{kind}: {len(scenes)} clips scored ({time.time() - t0:.0f} s)")
    summary = evaluate.summarise(results)
    report = {"settings": dict(seed=seed, steps=steps, cfg=cfg, high_noise_cfg=high_noise_cfg, shift=shift,
                               solver=solver, single=single, two=two, i2v=i2v, image_first=image_first,
                               picture=picture if image_first else None),
              "summary": summary, "seconds": round(time.time() - t0, 1), "clips": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    labels = [f"{'i2v: ' if r['kind'] == 'i2v' else ''}{r['prompt']}{'' if r['correct'] else '  [wrong]'}"
              for r in results]
    evaluate.contact_sheet(clips, labels, out / "contact_sheet.png")
    return report


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    return value


def main(argv=None) -> int:
    from .. import builtin, load_text_encoder, load_transformer, load_vae
    d = builtin.DEFAULTS
    ap = argparse.ArgumentParser(prog="zoetrope evaluate-builtin", description=__doc__.split("\n")[0])
    ap.add_argument("--single", type=int, default=200, help="one-object text-to-video prompts")
    ap.add_argument("--two", type=int, default=100, help="two-object text-to-video prompts")
    ap.add_argument("--i2v", type=int, default=100, help="image-to-video clips (first frame + prompt)")
    ap.add_argument("--seed", type=int, default=20261126, help="prompts and noise (the training never used it)")
    ap.add_argument("--steps", type=int, default=d["steps"])
    ap.add_argument("--cfg", type=float, default=d["cfg"])
    ap.add_argument("--high-noise-cfg", type=float, default=d["cfg_high"],
                    help="the clip's guidance for its noisiest steps (timestep 900 and up); --cfg after "
                         "(default %(default)s)")
    ap.add_argument("--shift", type=float, default=d["shift"])
    ap.add_argument("--solver", default=d["solver"], choices=sorted(sampling.SOLVERS))
    ap.add_argument("--image-first", action=argparse.BooleanOptionalAction, default=builtin.IMAGE_FIRST,
                    help="text-to-video draws each first frame as a picture, then animates it (as generate does; "
                         "default %(default)s)")
    ap.add_argument("--picture-solver", default=builtin.PICTURE["solver"], choices=sorted(sampling.SOLVERS),
                    help="the first-frame picture's solver, with --image-first (default %(default)s)")
    ap.add_argument("--picture-cfg", type=float, default=builtin.PICTURE["cfg"],
                    help="the first-frame picture's guidance, with --image-first (default %(default)s)")
    ap.add_argument("--picture-high-noise-cfg", type=float, default=builtin.PICTURE["high_noise_cfg"],
                    help="the first-frame picture's guidance for its noisiest steps (timestep 900 and up), with "
                         "--image-first (default %(default)s)")
    ap.add_argument("--model", default=str(builtin.TRANSFORMER))
    ap.add_argument("--vae", default=str(builtin.VAE))
    ap.add_argument("--text-encoder", default=str(builtin.TEXT_ENCODER))
    ap.add_argument("-o", "--out", default="builtin-eval", help="folder for report.json and contact_sheet.png")
    args = ap.parse_args(argv)
    dtype = torch.float32
    dit, vae = load_transformer(args.model, dtype=dtype), load_vae(args.vae, dtype=dtype)
    te = load_text_encoder(args.text_encoder, dtype=dtype)
    report = run(dit, vae, te, single=args.single, two=args.two, i2v=args.i2v, seed=args.seed, steps=args.steps,
                 cfg=args.cfg, high_noise_cfg=args.high_noise_cfg, shift=args.shift, solver=args.solver,
                 out=Path(args.out), image_first=args.image_first,
                 picture=dict(solver=args.picture_solver, cfg=args.picture_cfg,
                              high_noise_cfg=args.picture_high_noise_cfg))
    print(json.dumps(report["summary"], indent=1))
    print(f"report and contact sheet in {args.out}/ ({report['seconds']} s)")
    return 0
