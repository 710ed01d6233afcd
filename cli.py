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
                                 "flags it uses the built-in model (runs on a CPU in seconds). It runs the same node "
                                 "graph as the text-to-video workflow, and the file carries that graph: drop it on "
                                 "ComfyUI to get the graph back.")
    ap.add_argument("prompt")
    ap.add_argument("-o", "--output", default="zoetrope.mp4", help="mp4, webm, webp or gif (default %(default)s); "
                    "an existing file is kept and the next free name is used")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=None, help="4k+1 frames (others are rounded)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    ap.add_argument("--cfg", type=float, default=None,
                    help="guidance scale (default: the model's; the built-in model's first-frame picture has its own)")
    ap.add_argument("--shift", type=float, default=None, help="flow shift of the sigma schedule")
    ap.add_argument("--solver", choices=("unipc", "euler", "euler_ancestral"), default=None)
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--image", default=None, help="a first frame (PNG/JPEG) for image-to-video")
    ap.add_argument("--image-first", action=argparse.BooleanOptionalAction, default=None,
                    help="draw the first frame as a picture, then animate it (image-to-video): for models trained on "
                         "pictures and pinned first frames too; the built-in model's default")
    ap.add_argument("--model", default=None, help="transformer file (diffusion_models)")
    ap.add_argument("--vae", default=None, help="VAE file")
    ap.add_argument("--text-encoder", default=None, help="text-encoder file (umT5)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    args = ap.parse_args(argv)
    if args.image and args.image_first:
        ap.error("--image gives the first frame, --image-first draws one: choose one")
    if args.image_first is None:
        from .pipeline import builtin
        args.image_first = args.model is None and not args.image and builtin.IMAGE_FIRST
    if args.model is None and (args.vae or args.text_encoder):
        ap.error("--vae and --text-encoder go with --model; without --model the built-in model is used")
    if args.model is not None and not (args.vae and args.text_encoder):
        ap.error("--model needs --vae and --text-encoder too (the files from ComfyUI's vae/ and text_encoders/ "
                 "folders)")
    import shutil
    import tempfile
    from pathlib import Path

    from .nodes.runner import NodeError, WorkflowError, run_workflow, saved_files
    from .pipeline.video_io import FORMATS, free_path

    out = Path(args.output)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        ap.error(f"cannot write {out.name!r}: the formats are {', '.join(FORMATS)}")
    t0 = time.time()
    graph = text_to_video_graph(args, fmt)
    with tempfile.TemporaryDirectory(prefix="zoetrope-") as tmp:
        try:
            uis = run_workflow(graph, output_dir=tmp, input_dir=str(Path(args.image).resolve().parent)
                               if args.image else None, progress=sys.stderr.isatty())
        except (WorkflowError, NodeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        made = saved_files(uis, Path(tmp))[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        target = free_path(out)
        shutil.move(str(made), target)
    if target != out:
        print(f"{out} exists: kept it and wrote {target} instead", file=sys.stderr)
    print(f"wrote {target} in {time.time() - t0:.1f} s")
    return 0


def text_to_video_graph(args, fmt: str) -> dict:
    """The API-format graph of the built-in text-to-video workflow (image-to-video with --image; with
    args.image_first, the built-in model's default, a first sampler draws the start picture, with the built-in
    model's picture settings), filled in from the command line. 0 / "auto" widgets take the model's recommended
    settings."""
    from .pipeline.builtin import DEFAULTS, PICTURE

    def pick(value, default):
        return default if value is None else value

    builtin = args.model is None
    size_default = DEFAULTS if builtin else {"width": 832, "height": 480, "frames": 33, "fps": 16}
    g = {
        "1": {"class_type": "ZoetropeModelLoader",
              "inputs": {"model_name": args.model or "builtin", "precision": "auto", "device": args.device}},
        "2": {"class_type": "ZoetropeTextEncoderLoader",
              "inputs": {"text_encoder_name": args.text_encoder or "builtin", "precision": "auto",
                         "device": args.device}},
        "3": {"class_type": "ZoetropeVAELoader",
              "inputs": {"vae_name": args.vae or "builtin", "precision": "auto", "device": args.device}},
        "4": {"class_type": "ZoetropeTextEncode", "inputs": {"text_encoder": ["2", 0], "text": args.prompt}},
        "5": {"class_type": "ZoetropeTextEncode", "inputs": {"text_encoder": ["2", 0], "text": args.negative}},
        "6": {"class_type": "ZoetropeVideoNoise",
              "inputs": {"vae": ["3", 0], "width": pick(args.width, size_default["width"]),
                         "height": pick(args.height, size_default["height"]),
                         "frames": pick(args.frames, size_default["frames"]), "batch": 1, "seed": args.seed}},
        "7": {"class_type": "ZoetropeSampler",
              "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent": ["6", 0],
                         "steps": pick(args.steps, 0), "cfg": pick(args.cfg, 0.0), "shift": pick(args.shift, 0.0),
                         "solver": pick(args.solver, "auto"), "denoise": 1.0, "high_noise_cfg": 0.0}},
        "8": {"class_type": "ZoetropeVAEDecode",
              "inputs": {"vae": ["3", 0], "latent": ["7", 0], "tile_size": 0, "overlap": 32}},
        "9": {"class_type": "ZoetropeSaveVideo",
              "inputs": {"frames": ["8", 0], "fps": float(pick(args.fps, size_default["fps"])), "format": fmt,
                         "crf": 19, "filename_prefix": "zoetrope"}},
    }
    if args.image:
        from pathlib import Path
        g["10"] = {"class_type": "LoadImage", "inputs": {"image": Path(args.image).name}}
        g["11"] = {"class_type": "ZoetropeVAEEncode",
                   "inputs": {"vae": ["3", 0], "image": ["10", 0], "width": g["6"]["inputs"]["width"],
                              "height": g["6"]["inputs"]["height"]}}
        g["7"]["inputs"]["first_frame"] = ["11", 0]
    if args.image_first:
        # The same prompt and seed drawn as a one-frame clip (a picture), whose latent is the clip's first frame.
        g["12"] = {"class_type": "ZoetropeVideoNoise", "inputs": {**g["6"]["inputs"], "frames": 1}}
        g["13"] = {"class_type": "ZoetropeSampler", "inputs": {**g["7"]["inputs"], "latent": ["12", 0]}}
        if builtin:     # the built-in model's picture settings (builtin.PICTURE); --cfg and --solver are the clip's
            g["13"]["inputs"].update(PICTURE)
        g["7"]["inputs"]["first_frame"] = ["13", 0]
    return g


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
