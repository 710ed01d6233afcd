"""Picture-only training runs of the built-in transformer: compare a recipe change in ten minutes, not three hours.

Text-to-video with the built-in model first draws its first frame as a picture (builtin.IMAGE_FIRST), so a clip's
shape, colour and size are decided there, and the full recipe's weak point, shape, can be studied on pictures
alone: the transformer and text encoder of train.py, trained on the first latent frames of the latent pool only
(64 tokens a sample instead of 320 plus pictures), then measured:

- VAE round trip and one-step estimates: the scenes' pictures through the VAE alone, and the transformer's one-step
  estimate of them from noise 0.5 / 0.8 / 0.95 (does it keep a shape it is shown?);
- words: the loss with each picture's own prompt, and its rise with the shape, colour or size word swapped;
- SDEdit: the true picture noised part-way (denoise d) and sampled down with its prompt;
- drawn: pictures sampled from pure noise, at each SOLVER:STEPS:SHIFT:CFG of --settings; a contact sheet of the
  first setting's first 24 pictures.
Per shape: how often the evaluator names it right, and the median bounding-box fill (square 1, circle 0.79,
triangle 0.5; a ragged blob reads about 0.65).

    zoetrope train-builtin --work W --only vae       # the VAE stage and the latent pool, once (about 30 min)
    python benchmarks/picture_training.py --work W --out runs/shift3 --shift 3
    python benchmarks/picture_training.py --work W --out runs/shift3 --eval-only --settings euler:40:3:1

Measured on a 2-core CPU with the recipe's VAE (2000 steps of 32 pictures, about 10 min each; 96 scenes, default
settings unipc:20:SHIFT:4). Drawn pictures, shape right (square / triangle / circle), median fill of squares:
  training shift 8:               29%  (0% / 25% / 67%), fill 0.67
  training shift 3:               39%  (0% / 48% / 67%), fill 0.68
  half shift 8, half shift 1:     32%  (0% / 45% / 48%), fill 0.66
  training shift 1:               35%  (3% / 45% / 56%), fill 0.65
  shift 3, no object weighting:   31%  (0% / 28% / 70%), fill 0.70
  shift 3, patch 1 (4x tokens, 16 pictures a step, 20 min): 34% (0% / 30% / 78%), fill 0.68
Every drawn object is a ragged blob (fill 0.65-0.69 whatever its shape; looked at: irregular outlines, often in
two pieces, often cut by the frame's edge), and no sampling setting changes that: with the shift-3 model, sampling
shift 3 or 8, 20 or 40 steps, UniPC or Euler, guidance 1, 1.5, 2 or 4, or a schedule that jumps to the clean
estimate from 0.5, 0.3 or 0.15 all land within 5 points (33-41%). The words are read (swapping the shape word raises
the loss by 8% at noise 0.8, colour by 160%, size by 27%), and a shape the model is shown survives one step (from
noise 0.5: 77% right, squares' fill 0.91) but not a sampling path (SDEdit from denoise 0.5: 41%, squares' fill
0.83). So the outline is made at high noise, by the sampling path building the object out of the noise's own
fluctuations; neither the noise schedule nor four times the tokens changes that at this budget.
The VAE's latent is about 5-dimensional (98% of the variance of the normalised latents in 5 principal directions of
16; decoding from the top 4 keeps 98% of shapes right), and projecting drawn latents onto those 5 directions before
decoding changes nothing (40% against 39%): the raggedness is in the layout, not in unused latent directions.

A VAE that also names each latent cell's shape (--vae-shape-probe, train.Budget.vae_shape_probe; measured with one
trained 1627 steps at weight 0.05, then 2373 at 0.5 (the flag's run keeps one weight throughout); its read-out names
84% of object cells right, and noise up to 0.3 on its latents leaves 94% of shapes right) makes the transformer read
the shape word (swapping it raises the loss by 177% at noise 0.8, 262% at 0.95, against 8%), and its drawn latents
carry the prompt's shape (the read-out names it in 87-93% of object cells, as in true latents). Drawn pictures are no
better: 41% (0% / 40% / 85%; squares' fill 0.74), because the decoder draws the outline the layout gives, not the
code, and the layout is wrong: sheets show oversized, merged or doubled blobs (an extra object in 21% of pictures,
47% with guidance 1). Decoders tuned on the frozen encoder's latents (1000 steps of noise up to 0.2 and 3x3 blurs; or
always a [1,2,1] blur; or 800 steps on the transformer's own SDEdit outputs from 0.3-0.9 with the true pictures as
targets) give 36-50%, squares 0% in all; guidance only for noise in [0.5, 1] or [0.7, 0.95] changes nothing. Even
from a true picture noised to 0.3, the one-step estimate keeps 85% of shapes (squares 97%) but the sampled path 74%
(guidance 1) or 59% (guidance 4). Trained on the pool's one-object scenes alone (same VAE, same 2000 steps), the
transformer draws one compact object (an extra one in 3% of pictures against 21%; colour and size 100%), so the doubled
and merged blobs come from the two-object scenes; but its outlines stay rounded (shape 39%: 3% / 22% / 100%), and
several objects are cut by the frame's edge. So the outline itself is still what fails, with the shape word read and
the shape code drawn right.

A decoder that must also draw from blurred codes (--vae-decoder-blur 0.5: on half the VAE's steps the decoder reads
the latents blurred by [1,2,1]x[1,2,1]), with the probe at 0.5, trained on one-object scenes (--one-object), drawn at
unipc:20:3:4 / unipc:20:3:1 (shape right; squares, triangles; circles 100% in all):
  the recipe's clip VAE, 2500 steps (--vae-steps 2500):  40% / 60%  (squares 3% / 7%, triangles 25% / 72%)
  a picture-only VAE (a scratch run: 3500 steps of single frames, 16 crops a step): 60% / 73%  (squares 24% / 17%,
  triangles 60% / 95%); its one-step estimate from noise 0.8 keeps 95% of shapes (the clip VAE's 69%), SDEdit from 0.5
  90% (66%)
  the same picture-only VAE without probe or blur: 30% / 34%  (squares 0% / 0%, triangles 22% / 40%)
against 39% at guidance 4 for the probe VAE without blur. Sheets: triangles now drawn as triangles and squares as
rounded squares (fill 0.84-0.87, under the evaluator's 0.9), edges crisp; guidance 1 draws shapes better than 4 in
every run. (Measured with the pool encoded as first frames only, its statistics from first frames.)

The transformer and the decoder on that clip VAE (the one-object run above, 40% / 60%; decoders tuned with the
encoder frozen, so the model's latents keep their meaning; scratch runs, their settings here):
  the decoder against a patch critic (3 convolutions to 128 channels, hinge loss, its weight VQGAN's adaptive one
  at the decoder's last layer), reading latents warped by a smooth random field of up to 0.6 cells (60% of them),
  blurred (half) and with per-cell noise of up to half each channel's spread; 1200 steps of single frames: 56% / 66%
  (squares 14% / 10%). Over clips of up to 17 frames, 600 steps, without the noise: 48% / 66%
  the decoder against a shape-conditional critic on the transformer's own drawn pictures, 800 steps: 44% / 59%
  the decoder taught to draw the shape the probe names on another shape's layout (each scene encoded also with its
  object's shape swapped; that latent, its component in the probe's span replaced by the true scene's, decoded to
  the true scene), 1000 steps: 48% / 62%; with warps and double blurs on top: 52% / 64%
  the transformer with --outline-weight 8 (train.Budget.outline_weight: objects' edge cells weigh up to 8 more):
  48% / 72% (squares 21% / 24%, triangles 32% / 88%); with the critic-tuned decoder above 57% / 78% (guidance 2: 66%)
  the transformer with --outline-weight 8 --sharpen-share 0.3 (train.Budget.sharpen_share: 30% of the pictures at
  noise >= 0.3 noised from a blurred latent, the target still the sharp one): 62% / 81% (guidance 2: 72%), squares
  45% / 48% (55%), triangles 50% / 92% (65%); one step from noise 0.8 keeps 97% of shapes (69% before)
The drawn latents carry the right code (the probe reads 0.92 of a drawn square's object cells as square, true
squares 0.91) but a drawn square covers 24-25 object cells against 21.5 for a true one: the layout fails, not the
code. The decoders tuned here add 4-16 points; teaching the transformer to draw and to sharpen outlines adds 22.
The last run's command (the one before it without --sharpen-share). Their pool was encoded as first frames only,
which changes only the latent statistics (a causal VAE codes frame 0 alone). train.tune_decoder is the critic tuning's
form in the recipe (Budget.decoder_steps); it mixes 5-frame clips in, and is measured only within the recipe's
full run (train.Budget), not alone here.
    python benchmarks/picture_training.py --work W --out R --one-object --vae-steps 2500 --vae-shape-probe 0.5 \
        --vae-decoder-blur 0.5 --shift 3 --outline-weight 8 --sharpen-share 0.3 \
        --settings unipc:20:3:4,unipc:20:3:1,unipc:20:3:2
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zoetrope.pipeline import generate, sampling
from zoetrope.pipeline.text_encoder import TextEncoder
from zoetrope.pipeline.tokenizer import Tokenizer
from zoetrope.pipeline.world import evaluate, scene as world, train
from transformer_probe import swapped      # benchmarks/: the probe's attribute swap

SEED = 1234     # train-builtin's default: the VAE stage and pool of its work folder


def quiet(total, name, initial):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=True)


def prepare(work: Path, budget: train.Budget = train.Budget()):
    """The finished VAE (trained here with `budget` when the work folder has none), the tokenizer and the latent
    pool."""
    device = torch.device("cpu")
    vae = train.train_vae(work, budget, SEED, device, quiet)
    train.attach_latent_stats(vae, SEED, device, budget.stats_clips)
    vae.eval()
    spiece = train.train_tokenizer(work, SEED, train.TEXT_CONFIG.vocab_size)
    pool = train.encode_pool(work, vae, budget, SEED, device, quiet)
    return vae, Tokenizer.from_bytes(spiece), pool


def train_pictures(pool, tokenizer, budget: train.Budget, dit_config, steps: int, batch: int,
                   one_object: bool = False):
    """The transformer stage's loop on first latent frames only (with `one_object`, of the pool's one-object scenes
    only); returns the EMA models (decay 0.998 from a quarter of the way, so that a short run's average is not mostly
    its first steps)."""
    device = torch.device("cpu")
    pictures = torch.cat(pool["latents"])[:, :, :1].float()
    scenes = pool["scenes"]
    if one_object:
        keep = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
        pictures, scenes = pictures[keep], [scenes[i] for i in keep]
    encoder, dit, _, params, opt = train.new_transformer(tokenizer, budget, SEED, device, dit_config)
    ema_dit, ema_encoder = copy.deepcopy(dit).eval(), copy.deepcopy(encoder).eval()
    rng, gen = np.random.default_rng(SEED + 3), torch.Generator().manual_seed(SEED + 4)
    start = time.time()
    for step in range(steps):
        train._set_cosine_lr(opt, step, steps, budget.lr_dit, warmup=100)
        idx = rng.integers(len(scenes), size=batch).tolist()
        loss = train._flow_loss(dit, encoder, tokenizer, pictures[idx], [scenes[i] for i in idx], rng, gen, budget,
                                device, i2v=False)
        train._optimizer_step(opt, loss, params)
        decay = 0.998 if step > steps // 4 else 0.0
        train._ema_update(ema_dit, dit, decay)
        train._ema_update(ema_encoder, encoder, decay)
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    print(f"trained {steps} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    return ema_dit, ema_encoder


@torch.no_grad()
def measure(dit, vae, te, settings: list[str], n: int, out: Path) -> dict:
    rng = np.random.default_rng(99)
    scenes = [world.sample_scene(rng, 1) for _ in range(n)]
    prompts = [world.prompt(s) for s in scenes]
    cond, uncond = te.encode(prompts), te.encode([""] * n)
    x0 = vae.normalize(vae.encode(evaluate.to_video(np.stack([world.render(s, frames=1) for s in scenes]))))
    results = {}

    def score(latents: torch.Tensor, name: str) -> None:
        right = {s: [] for s in world.SHAPES}
        fill = {s: [] for s in world.SHAPES}
        colour, size = [], []
        for picture, scene, prompt in zip(vae.decode(vae.denormalize(latents)), scenes, prompts):
            verdict = evaluate.score(evaluate.to_frames(picture), prompt)["objects"][0]
            shape = scene.objects[0].shape
            right[shape].append(bool(verdict["shape"]))
            colour.append(bool(verdict["colour"]))
            size.append(bool(verdict["size"]))
            if verdict["detected"] is not None:
                fill[shape].append(verdict["detected"].fill)
        overall = float(np.mean([r for rs in right.values() for r in rs]))
        per_shape = {s: float(np.mean(r)) if r else None for s, r in right.items()}    # None: no scene of it
        cells = "  ".join(f"{s} {per_shape[s]:4.0%} fill {np.median(fill[s]) if fill[s] else float('nan'):.2f}"
                          for s in world.SHAPES if right[s])
        print(f"{name:<26} shape {overall:4.0%} | {cells} | colour {np.mean(colour):4.0%} size {np.mean(size):4.0%}",
              flush=True)
        results[name] = dict(shape=overall, colour=float(np.mean(colour)), size=float(np.mean(size)),
                             per_shape=per_shape)

    score(x0, "VAE round trip")
    gen = torch.Generator().manual_seed(5)
    for sigma in (0.5, 0.8, 0.95):
        xt = sampling.noise_latent(x0, torch.randn(x0.shape, generator=gen), sigma)
        score(xt - sigma * dit(xt, torch.full((n,), sigma * 1000), cond), f"one step from {sigma}")

    swaps = {a: te.encode([world.prompt(swapped(s, a, rng)) for s in scenes]) for a in ("shape", "colour", "size")}
    for sigma in (0.3, 0.5, 0.8, 0.95):
        noise = torch.randn(x0.shape, generator=gen)
        xt, t = sampling.noise_latent(x0, noise, sigma), torch.full((n,), sigma * 1000)
        loss = {k: ((dit(xt, t, c) - (noise - x0)) ** 2).mean().item() for k, c in {"own": cond, **swaps}.items()}
        rises = "  ".join(f"{a} {100 * (loss[a] / loss['own'] - 1):+5.1f}%" for a in swaps)
        print(f"words at noise {sigma}: loss {loss['own']:.4f}, swapped {rises}", flush=True)

    for denoise in (0.5, 0.7, 0.85, 0.95):
        latents = generate.sample(dit, generate.seeded_noise(x0.shape, 8), cond, uncond, steps=20, cfg=4.0,
                                  shift=3.0, solver="unipc", init_latent=x0, denoise=denoise)
        score(latents, f"SDEdit denoise {denoise}")

    for k, setting in enumerate(settings):
        solver, steps, shift, cfg = setting.split(":")
        estimates = {}      # the first setting's clean estimates, step by step
        keep = (lambda step, total, x0_est: estimates.__setitem__(step, x0_est.clone())) if k == 0 else None
        latents = generate.sample(dit, generate.seeded_noise(x0.shape, 7), cond, uncond, steps=int(steps),
                                  cfg=float(cfg), shift=float(shift), solver=solver, seed=7, progress=keep)
        if k == 0:      # the first setting's path: its clean estimate every few steps
            sigmas = sampling.default_sigmas(solver, int(steps), float(shift))
            for step in range(1, int(steps), max(1, int(steps) // 5)):
                score(estimates[step], f"  estimate at {float(sigmas[step - 1]):.2f}")
        score(latents, f"drawn {setting}")
        if k == 0:
            sheet = Image.new("RGB", (8 * 66, 3 * 66), "white")
            for i, picture in enumerate(vae.decode(vae.denormalize(latents[:24]))):
                sheet.paste(Image.fromarray(evaluate.to_frames(picture)[0]), ((i % 8) * 66, (i // 8) * 66))
            sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out / "drawn.png")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a train-builtin work folder (its VAE stage is used)")
    ap.add_argument("--out", type=Path, required=True, help="folder for model.pt, results.json and drawn.png")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shift", type=float, default=train.Budget.shift, help="training's noise-level shift")
    ap.add_argument("--object-weight", type=float, default=train.Budget.object_weight)
    ap.add_argument("--outline-weight", type=float, default=train.Budget.outline_weight,
                    help="extra loss weight on objects' edge cells (train.Budget.outline_weight)")
    ap.add_argument("--sharpen-share", type=float, default=train.Budget.sharpen_share,
                    help="share of pictures noised from a blurred latent, to be sharpened (train.Budget.sharpen_share)")
    ap.add_argument("--lr", type=float, default=train.Budget.lr_dit)
    ap.add_argument("--vae-shape-probe", type=float, default=train.Budget.vae_shape_probe,
                    help="the shape probe's weight when this run trains the work folder's VAE (train.Budget)")
    ap.add_argument("--vae-decoder-blur", type=float, default=train.Budget.vae_decoder_blur,
                    help="share of VAE steps whose decoder reads blurred latents, when this run trains the VAE")
    ap.add_argument("--vae-steps", type=int, default=train.Budget.vae_steps,
                    help="VAE steps when this run trains the work folder's VAE")
    ap.add_argument("--one-object", action="store_true", help="train on the pool's one-object scenes only")
    ap.add_argument("--patch", type=int, default=train.DIT_CONFIG.patch_size[1], help="the transformer's patch side")
    ap.add_argument("--scenes", type=int, default=96)
    ap.add_argument("--settings", default="unipc:20:8:4,unipc:20:3:4,unipc:40:3:4,unipc:20:3:2,euler:40:3:4",
                    help="SOLVER:STEPS:SHIFT:CFG, comma-separated: how pictures are drawn")
    ap.add_argument("--eval-only", action="store_true", help="measure the model.pt already in --out")
    ap.add_argument("--vae", type=Path, default=None,
                    help="a VAE state to measure with instead of the work folder's (one with the same encoder, its "
                         "decoder tuned, so that the model's latents still mean what they meant in training)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = replace(train.Budget(), shift=args.shift, object_weight=args.object_weight,
                     outline_weight=args.outline_weight, sharpen_share=args.sharpen_share, lr_dit=args.lr,
                     vae_shape_probe=args.vae_shape_probe, vae_decoder_blur=args.vae_decoder_blur,
                     vae_steps=args.vae_steps)
    vae, tokenizer, pool = prepare(args.work, budget)
    if args.vae is not None:
        vae.load_state_dict(torch.load(args.vae, weights_only=False)["model"])
    dit_config = replace(train.DIT_CONFIG, patch_size=(1, args.patch, args.patch))
    checkpoint = args.out / "model.pt"
    if args.eval_only:
        state = torch.load(checkpoint)
        encoder, dit, *_ = train.new_transformer(tokenizer, budget, SEED, torch.device("cpu"), dit_config)
        dit.load_state_dict(state["dit"])
        encoder.load_state_dict(state["encoder"])
    else:
        dit, encoder = train_pictures(pool, tokenizer, budget, dit_config, args.steps, args.batch, args.one_object)
        torch.save({"dit": dit.state_dict(), "encoder": encoder.state_dict()}, checkpoint)
    results = measure(dit.eval(), vae, TextEncoder(encoder.eval(), tokenizer), args.settings.split(","),
                      args.scenes, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
