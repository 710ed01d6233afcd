"""What a built-in transformer knows at each noise level, measured on rendered clips of the Shapes World.

Scores of generated clips say that a model fails; these two probes say where along the noise schedule, which is
what decides the next change to its training:

- words: the flow-matching loss with the clip's own prompt, and how much it rises when one attribute of the prompt
  (colour, shape, size, motion) is swapped for another. A word the transformer uses raises the loss when swapped;
  a word it ignores leaves it flat.
- image-to-video: the first latent frame pinned clean (as `--image` does), the rest noised to a level, and the
  transformer's one-step estimate of the clean clip decoded. Per direction, how far the object's centroid travels
  along it (the world moves 0.45 W; for `still`, how far it drifts) and how often the evaluator calls the motion
  right. The world is deterministic given its first frame and its prompt, so a perfect transformer scores 0.45 (no
  drift) and 100% at every level, pure noise included; where it falls short is where sampling loses the motion.
- directions: text-to-video as `zoetrope generate` makes it (default settings), each scene twice from the same
  noise, once moving one way and once the opposite way. A transformer that reads the direction from the words sends
  the two clips opposite ways; one that reads it from where it happened to draw the object sends both the same way
  (in the world a moving object starts on the side it leaves, so position alone predicts the direction there).
- pictures: where a picture's shape is lost. The scenes' first frames through the VAE alone, then the transformer's
  one-step estimate of them from each noise level, then pictures drawn from pure noise at the default settings; per
  shape, how often the evaluator names it right and the object's bounding-box fill (square 1, circle 0.79, triangle
  0.5). A shape kept by the VAE and by the one-step estimates but lost in drawn pictures is lost along the sampling
  path, not in decoding or in denoising from a known layout.
- shape codes (with --vae-checkpoint, the VAE stage's checkpoint, which holds its shape probe): text-to-video clips
  of the moving scenes as `zoetrope generate` makes them, and the same scenes rendered and encoded. Per shape, the
  share of latent frames whose code names the prompted shape (the probe averaged over the cells it reads as object),
  and how often the evaluator names it from the decoded pixels. A code drawn right and decoded wrong is lost in the
  decoder.
- binding: the text encoder alone, on two-object prompts. Linear probes fitted on its output read each object's
  motion from the token of its colour word, and its colour from the tokens of its motion words. The transformer's
  cross-attention has no positions on the text, so an object can only take its own motion if its phrase's tokens
  carry it; where these read near chance (about 20%), each of two objects takes either phrase's motion.

    python benchmarks/transformer_probe.py                        # the model in pipeline/builtin
    python benchmarks/transformer_probe.py --folder EXPORT --clips 48 --vae-checkpoint WORK/vae.pt
    python benchmarks/transformer_probe.py --folder EXPORT --clips 96 --vae-checkpoint WORK/vae.pt --only shape-codes
    python benchmarks/transformer_probe.py --folder EXPORT --only binding

EXPORT is a folder with the three files that `zoetrope train-builtin --only export --out EXPORT` writes, WORK the
folder of its checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from zoetrope.pipeline import builtin, generate, load_text_encoder, load_transformer, load_vae, sampling
from zoetrope.pipeline.world import evaluate, scene as world

ATTRIBUTES = {"colour": world.COLOURS, "shape": world.SHAPES, "size": world.SIZES, "motion": world.MOTIONS}
SETTINGS = {**{k: builtin.DEFAULTS[k] for k in ("steps", "cfg", "shift", "solver")},
            "high_noise_cfg": builtin.DEFAULTS["cfg_high"]}                            # what `zoetrope generate` uses
PROBES = ("words", "image-to-video", "directions", "pictures", "shape-codes", "binding")


def load(folder: Path):
    files = [folder / f.name for f in (builtin.TRANSFORMER, builtin.VAE, builtin.TEXT_ENCODER)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: pass --folder with an export of `zoetrope train-builtin`")
    return (load_transformer(files[0], dtype=torch.float32), load_vae(files[1], dtype=torch.float32),
            load_text_encoder(files[2], dtype=torch.float32))


def swapped(scene: world.Scene, attribute: str, rng) -> world.Scene:
    """The scene with its object's `attribute` replaced by another value (the clip stays the same)."""
    obj = scene.objects[0]
    others = [v for v in ATTRIBUTES[attribute] if v != getattr(obj, attribute)]
    changed = dataclasses.replace(obj, **{attribute: others[rng.integers(len(others))]})
    return dataclasses.replace(scene, objects=(changed,))


@torch.no_grad()
def word_use(dit, te, x0, scenes, levels, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prompts = {"own": [world.prompt(s) for s in scenes]}
    prompts.update({a: [world.prompt(swapped(s, a, rng)) for s in scenes] for a in ATTRIBUTES})
    context = {k: te.encode(p) for k, p in prompts.items()}
    gen = torch.Generator().manual_seed(seed)
    print("words: loss with the clip's own prompt, and its rise with one attribute swapped")
    for sigma in levels:
        noise = torch.randn(x0.shape, generator=gen)
        xt = sampling.noise_latent(x0, noise, sigma)
        t = torch.full((len(scenes),), sigma * 1000)
        loss = {k: ((dit(xt, t, c) - (noise - x0)) ** 2).mean().item() for k, c in context.items()}
        rises = "  ".join(f"{a} {100 * (loss[a] / loss['own'] - 1):+5.1f}%" for a in ATTRIBUTES)
        print(f"  noise {sigma:.2f}: loss {loss['own']:.4f}  {rises}")


@torch.no_grad()
def image_to_video(dit, vae, te, x0, scenes, levels, seed: int) -> None:
    n, _, f, h, w = x0.shape
    context = te.encode([world.prompt(s) for s in scenes])
    mask = torch.ones(n, f, h, w)
    mask[:, 0] = 0
    gen = torch.Generator().manual_seed(seed)
    print("image-to-video, one step from each noise level: travel along the prompt's direction (0.45 W) / motion right")
    for sigma in levels:
        noise = torch.randn(x0.shape, generator=gen)
        xt = sampling.noise_latent(x0, noise, sigma)
        xt[:, :, :1] = x0[:, :, :1]
        estimate = xt - sigma * dit(xt, sampling.token_timesteps(sigma * 1000, mask, dit.config.patch_size), context)
        estimate[:, :, :1] = x0[:, :, :1]
        clips = [evaluate.to_frames(v) for v in vae.decode(vae.denormalize(estimate))]
        travel: dict[str, list[float]] = {m: [] for m in world.MOTIONS}
        right: dict[str, list[bool]] = {m: [] for m in world.MOTIONS}
        for clip, scene in zip(clips, scenes):
            motion = scene.objects[0].motion
            verdict = evaluate.score(clip, world.prompt(scene), image_to_video=True)["objects"][0]
            found = verdict["detected"]
            dx, dy = world.MOTIONS[motion]
            if found is not None:
                ddx, ddy = found.displacement
                travel[motion].append(ddx * dx + ddy * dy if (dx or dy) else float(np.hypot(ddx, ddy)))
            right[motion].append(bool(verdict["motion"]))
        cells = "  ".join(f"{m.split()[-1]} {np.mean(travel[m]) if travel[m] else float('nan'):+.2f}/"
                          f"{np.mean(right[m]):4.0%}" for m in world.MOTIONS if right[m])
        print(f"  noise {sigma:.2f}: {cells}")


@torch.no_grad()
def directions(dit, vae, te, scenes, seed: int) -> None:
    from zoetrope.pipeline.world import report
    print("directions: text to video, each scene from the same noise with the prompt's direction and its opposite")
    for one, other in (("moving right", "moving left"), ("moving down", "moving up")):
        pair = [[world.prompt(dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], motion=m),)))
                 for s in scenes] for m in (one, other)]
        clips = [report.generate_clips(dit, vae, te, prompts, None, seed=seed, image_first=True,
                                       picture=builtin.PICTURE, **SETTINGS)
                 for prompts in pair]
        verdicts = [[evaluate.score(c, p)["objects"][0] for c, p in zip(cs, ps)] for cs, ps in zip(clips, pair)]
        both = np.mean([a["motion"] and b["motion"] for a, b in zip(*verdicts)])
        seen = [(a["detected"], b["detected"]) for a, b in zip(*verdicts)]
        same = np.mean([a is not None and b is not None and a.motion == b.motion != "standing still" for a, b in seen])
        print(f"  {one.split()[-1]}/{other.split()[-1]}: both as the words say {both:4.0%}  "
              f"both the same way {same:4.0%}")


@torch.no_grad()
def pictures(dit, vae, te, x0, scenes, levels, seed: int) -> None:
    first = x0[:, :, :1]
    context = te.encode([world.prompt(s) for s in scenes])
    gen = torch.Generator().manual_seed(seed)

    def report(name: str, latents: torch.Tensor) -> None:
        right: dict[str, list[bool]] = {s: [] for s in world.SHAPES}
        fill: dict[str, list[float]] = {s: [] for s in world.SHAPES}
        for picture, scene in zip(vae.decode(vae.denormalize(latents)), scenes):
            verdict = evaluate.score(evaluate.to_frames(picture), world.prompt(scene))["objects"][0]
            shape = scene.objects[0].shape
            right[shape].append(bool(verdict["shape"]))
            if verdict["detected"] is not None:
                fill[shape].append(verdict["detected"].fill)
        cells = "  ".join(f"{s} {np.mean(right[s]):4.0%} fill {np.median(fill[s]) if fill[s] else float('nan'):.2f}"
                          for s in world.SHAPES if right[s])
        print(f"  {name:<22} {cells}")

    print("pictures: shape right / median fill, per shape")
    report("VAE round trip", first)
    n = len(scenes)
    for sigma in levels:
        xt = sampling.noise_latent(first, torch.randn(first.shape, generator=gen), sigma)
        report(f"one step from {sigma:.2f}", xt - sigma * dit(xt, torch.full((n,), sigma * 1000), context))
    drawn = generate.sample(dit, generate.seeded_noise(first.shape, seed), context, te.encode([""] * n),
                            seed=seed, **SETTINGS)
    report("drawn from noise", drawn)


@torch.no_grad()
def shape_codes(dit, vae, te, x0, scenes, probe, seed: int) -> None:
    from zoetrope.pipeline.world import report
    moving = [i for i, s in enumerate(scenes) if s.objects[0].motion != "standing still"]
    prompts = [world.prompt(scenes[i]) for i in moving]
    drawn: list[torch.Tensor] = []
    clips = report.generate_clips(dit, vae, te, prompts, None, seed=seed, image_first=builtin.IMAGE_FIRST,
                                  picture=builtin.PICTURE, latents=drawn, **SETTINGS)

    def named_right(latents: torch.Tensor) -> list[list[bool]]:
        """Per clip, per latent frame: whether the probe, averaged over its object cells, names the prompt's shape."""
        p = probe(vae.denormalize(latents).float()).softmax(1)              # [n, 1 + shapes, T', h, w]
        out = []
        for clip, i in zip(p, moving):
            want = world.SHAPES.index(scenes[i].objects[0].shape)
            frames = []
            for t in range(clip.shape[1]):
                cells = clip[0, t] < 0.5                                     # cells read as object
                frames.append(bool(cells.any()) and int(clip[1:, t][:, cells].mean(1).argmax()) == want)
            out.append(frames)
        return out

    codes = {"drawn": named_right(torch.cat(drawn)), "rendered": named_right(x0[moving])}
    pixels = [bool(evaluate.score(c, p)["objects"][0]["shape"]) for c, p in zip(clips, prompts)]
    print("shape codes of moving objects: latent frames whose code names the prompt's shape, drawn / rendered; "
          "decoded pixels judged right")
    for shape in world.SHAPES:
        idx = [k for k, i in enumerate(moving) if scenes[i].objects[0].shape == shape]
        if idx:
            share = {k: np.mean([v for j in idx for v in codes[k][j]]) for k in codes}
            print(f"  {shape:<9} {len(idx):3d} clips  codes {share['drawn']:4.0%} / {share['rendered']:4.0%}  "
                  f"pixels {np.mean([pixels[j] for j in idx]):4.0%}")


@torch.no_grad()
def binding(te, seed: int, fit: int = 3000, test: int = 1000) -> None:
    from zoetrope.pipeline.tokenizer import clean_prompt
    from zoetrope.pipeline.world import train
    rng = np.random.default_rng(seed)
    motion_words = {w for phrase in world.MOTIONS for w in phrase.split()} | {
        w for ws in world._DIRECTION_WORDS.values() for w in ws} | set(world._VERBS) | {"still"}

    def rows(n: int) -> dict[str, list]:
        """Per word kind (colour, motion): [(its last token's embedding, its object's colour, its object's motion)]"""
        found: dict[str, list] = {"colour": [], "motion": []}
        for start in range(0, n, 250):
            texts = [world.paraphrase(s, rng) if rng.random() < 0.5 else world.prompt(s)
                     for s in (world.sample_scene(rng, 2) for _ in range(min(250, n - start)))]
            _, mask = te.tokenizer(texts, max_length=train.DIT_CONFIG.text_len)
            targets = train._clause_targets(te.tokenizer, texts, mask)       # [B, L, (colour, shape, size, motion)]
            for b, e in enumerate(te.encode(texts)):
                words = clean_prompt(texts[b]).split(" ")
                for word, end in zip(words, train.word_token_ends(te.tokenizer, words)):
                    kind = "colour" if word in world.COLOURS else "motion" if word in motion_words else None
                    if kind and targets[b, end - 1, 0] >= 0:              # a word of an object phrase
                        found[kind].append((e[end - 1].float().cpu(), int(targets[b, end - 1, 0]),
                                            int(targets[b, end - 1, 3])))
        return found

    def fitted_accuracy(train_rows, test_rows, column: int) -> float:
        x = torch.stack([r[0] for r in train_rows])
        mean, std = x.mean(0), x.std(0) + 1e-6
        y = torch.tensor([r[column] for r in train_rows])
        head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(300):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head((x - mean) / std), y).backward()
                opt.step()
        xt = (torch.stack([r[0] for r in test_rows]) - mean) / std
        return float((head(xt).argmax(1) == torch.tensor([r[column] for r in test_rows])).float().mean())

    fitted, held_out = rows(fit), rows(test)
    print(f"binding: linear probes on the text encoder's output, {fit} two-object prompts fitted, {test} held out")
    print(f"  object's motion from its colour word:  {fitted_accuracy(fitted['colour'], held_out['colour'], 2):4.0%}")
    print(f"  object's colour from its motion words: {fitted_accuracy(fitted['motion'], held_out['motion'], 1):4.0%}")


def clip_probes(dit, vae, te, args, only: set[str]) -> None:
    """The probes that read the transformer on rendered single-object clips."""
    probe = None
    if "shape-codes" in only:
        from zoetrope.pipeline.world import train
        state = torch.load(args.vae_checkpoint, weights_only=False)
        if "probe" not in state:
            raise SystemExit(f"{args.vae_checkpoint} holds no shape probe (trained with vae_shape_probe 0?)")
        probe = train.ShapeProbe(vae.z_dim)
        probe.load_state_dict(state["probe"])
    rng = np.random.default_rng(args.seed)
    scenes = [world.sample_scene(rng, 1) for _ in range(args.clips)]
    video = evaluate.to_video(np.stack([world.render(s) for s in scenes]))
    with torch.no_grad():
        x0 = vae.normalize(vae.encode(video))
    levels = [float(v) for v in args.levels.split(",")]
    if "words" in only:
        word_use(dit, te, x0, scenes, levels, args.seed)
    if "image-to-video" in only:
        image_to_video(dit, vae, te, x0, scenes, levels, args.seed)
    if "directions" in only:
        directions(dit, vae, te, scenes, args.seed)
    if "pictures" in only:
        pictures(dit, vae, te, x0, scenes, levels, args.seed)
    if "shape-codes" in only:
        shape_codes(dit, vae, te, x0, scenes, probe, args.seed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, default=builtin.FOLDER, help="the three files of a built-in model")
    ap.add_argument("--clips", type=int, default=48, help="rendered single-object clips")
    ap.add_argument("--prompts", type=int, default=4000,
                    help="two-object prompts for the binding probe (three quarters fitted, a quarter held out)")
    ap.add_argument("--levels", default="0.1,0.3,0.5,0.7,0.9,0.95,1.0", help="noise levels, comma-separated")
    ap.add_argument("--seed", type=int, default=11, help="seeds the scenes, the swaps and the noise")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--vae-checkpoint", type=Path, default=None,
                    help="the VAE stage's checkpoint (WORK/vae.pt of train-builtin): adds the shape-code probe")
    ap.add_argument("--only", default=None,
                    help="probes to run, comma-separated: " + ", ".join(PROBES) + " (default: all that can run)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(PROBES) - (set() if args.vae_checkpoint else {"shape-codes"})
    if only - set(PROBES):
        ap.error(f"unknown probe {', '.join(sorted(only - set(PROBES)))}; the probes are {', '.join(PROBES)}")
    if "shape-codes" in only and args.vae_checkpoint is None:
        ap.error("the shape-codes probe reads the VAE's shape probe: give --vae-checkpoint WORK/vae.pt")
    if args.threads:
        torch.set_num_threads(args.threads)
    dit, vae, te = load(args.folder)
    if only - {"binding"}:
        clip_probes(dit, vae, te, args, only)
    if "binding" in only:
        binding(te, args.seed, fit=args.prompts * 3 // 4, test=args.prompts - args.prompts * 3 // 4)


if __name__ == "__main__":
    main()
