"""The `zoetrope` command: generate, run, inspect, train-builtin, evaluate-builtin.

Heavy imports happen inside each command so that `zoetrope --help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate(argv) -> int:
    ap = argparse.ArgumentParser(prog="zoetrope generate", description="Make a video from a prompt. With no model "
                                 "flags it uses the built-in model (runs on a CPU in seconds).")
    ap.add_argument("prompt")
    ap.add_argument("-o", "--output", default="zoetrope.mp4", help="mp4, webm, webp or gif (default %(default)s)")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=None, help="4k+1 frames (others are rounded)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale")
    ap.add_argument("--shift", type=float, default=None, help="flow shift of the sigma schedule")
    ap.add_argument("--solver", choices=("unipc", "euler"), default=None)
    ap.add_argument("--fps", type=int, default=None)
    ap.add_argument("--image", default=None, help="a first frame (PNG/JPEG) for image-to-video")
    ap.add_argument("--model", default=None, help="transformer file (diffusion_models)")
    ap.add_argument("--vae", default=None, help="VAE file")
    ap.add_argument("--text-encoder", default=None, help="text-encoder file (umT5)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    args = ap.parse_args(argv)

    from .pipeline import generate as gen
    from .pipeline import load_text_encoder, load_transformer, load_vae
    from .pipeline.builtin import DEFAULTS, TEXT_ENCODER, TRANSFORMER, VAE
    from .pipeline.video_io import write_video

    t0 = time.time()
    builtin = args.model is None
    if builtin and (args.vae or args.text_encoder):
        raise SystemExit("--vae and --text-encoder go with --model; without --model the built-in model is used")
    if not builtin and not (args.vae and args.text_encoder):
        raise SystemExit("--model needs --vae and --text-encoder too (the files from ComfyUI's vae/ and "
                         "text_encoders/ folders)")
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dit = load_transformer(args.model or TRANSFORMER, device=device, dtype=dtype)
    vae = load_vae(args.vae or VAE, device=device, dtype=dtype)
    te = load_text_encoder(args.text_encoder or TEXT_ENCODER, device=device, dtype=dtype)
    defaults = DEFAULTS if builtin else _variant_defaults(dit)
    settings = {k: (getattr(args, k) if getattr(args, k) is not None else defaults[k])
                for k in ("frames", "width", "height", "steps", "cfg", "shift", "solver", "fps")}
    if builtin:
        unknown = te.tokenizer.unknown_words(args.prompt)
        if unknown:
            logging.warning("the built-in model does not know the words %s; it will do what it can",
                            ", ".join(repr(w) for w in unknown))
    first = None
    if args.image:
        from PIL import Image
        import numpy as np
        first = torch.from_numpy(np.asarray(Image.open(args.image).convert("RGB"))).float()[None] / 255
    fps = settings.pop("fps")
    frames = gen.generate(dit, vae, te, args.prompt, negative_prompt=args.negative, seed=args.seed,
                          first_frame=first, **settings)
    path = write_video(frames, args.output, fps=fps)
    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps} fps) "
          f"in {time.time() - t0:.1f} s")
    return 0


def _variant_defaults(dit) -> dict:
    v = getattr(getattr(dit, "info", None), "variant", None)
    if v is None:
        return dict(frames=33, width=480, height=480, steps=30, cfg=5.0, shift=5.0, solver="unipc", fps=16)
    return dict(frames=v.frames, width=v.width, height=v.height, steps=v.steps, cfg=v.cfg, shift=v.shift,
                solver="unipc", fps=v.fps)


def _inspect(argv) -> int:
    from .pipeline.inspect_cli import main
    return main(argv)


def _train(argv) -> int:
    from .pipeline.world.train import main
    return main(argv)


def _evaluate(argv) -> int:
    from .pipeline.world.report import main
    return main(argv)


def _run(argv) -> int:
    from .nodes.runner import main
    return main(argv)


COMMANDS = {
    "generate": (_generate, "make a video from a prompt (built-in model by default)"),
    "run": (_run, "run a workflow JSON (UI or API format) headless"),
    "inspect": (_inspect, "what is this model file: family, variant, precision, folder"),
    "train-builtin": (_train, "train the built-in model from scratch (resumable)"),
    "evaluate-builtin": (_evaluate, "score the built-in model on fresh prompts: JSON report and contact sheet"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: zoetrope COMMAND [ARGS]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:18s}{text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]][0](argv[1:]) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
