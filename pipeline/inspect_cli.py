"""`zoetrope inspect FILE ...`: what a model file is (family, variant, precision, which ComfyUI folder and
which of our loaders take it), read from its header alone, so that it answers at once for a 30 GB file.

Exit status: 0 when every file is one our loaders take, 2 when any is not (the reason goes to stderr, in the
words the loader would use).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import CheckpointError, ModelInfo, detect, weight_files
from .config import DiTConfig, TextEncoderConfig, VAEConfig

_TASKS = {"t2v": "text-to-video", "i2v": "image-to-video", "ti2v": "text-and-image-to-video"}
_PARTS = ("transformer", "transformer_2", "vae", "text_encoder")  # a diffusers pipeline folder's model parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zoetrope inspect",
        description="Tell what a model file is: family, variant, size, precision, layout, the ComfyUI folder it "
                    "belongs in and the Zoetrope loader that takes it. Reads headers only.")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="a .safetensors / .pth file, a sharded .safetensors.index.json, or a folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    args = parser.parse_args(argv)

    status = 0
    for target in (t for f in args.files for t in _targets(Path(f))):
        try:
            info = detect(target)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        fields = summary(info)
        print(json.dumps(fields) if args.json else _text(fields))
        if info.problem:
            print(f"error: {info.problem}", file=sys.stderr)
            status = 2
    return status


def _targets(path: Path) -> list[Path]:
    """A folder stands for the model files in it: each part of a diffusers pipeline, or each weights file."""
    if not path.is_dir():
        return [path]
    if (path / "model_index.json").is_file():
        return [path / part for part in _PARTS if (path / part).is_dir()] or [path]
    return weight_files(path) or [path]


def summary(info: ModelInfo) -> dict:
    """The facts `inspect` prints, as plain strings and numbers."""
    variant = info.variant
    kind = info.kind.replace("_", " ")
    if variant is not None:
        kind += f" ({_TASKS.get(variant.kind, variant.kind)})"
    fields = {
        "file": info.path,
        "model": info.name,
        "kind": kind,
        "family": info.family or "-",
        "variant": variant.name if variant else "-",
        "size": _size(info),
        "precision": info.precision or "-",
        "layout": info.layout + (f" (prefix `{info.prefix}` stripped)" if info.prefix else ""),
        "config": _config(info.config),
        "ComfyUI folder": f"models/{info.folder}" if info.folder else "-",
        "loader": info.loader or "none (see the error)",
    }
    if variant is not None:
        fields["recommended"] = (f"{variant.steps} steps, cfg {variant.cfg}, shift {variant.shift}, "
                                 f"{variant.width}x{variant.height}, {variant.frames} frames at {variant.fps} fps")
    for i, note in enumerate(info.notes):
        fields[f"note {i + 1}" if len(info.notes) > 1 else "note"] = note
    return {k: v for k, v in fields.items() if v}


def _text(fields: dict) -> str:
    lines = [str(fields.get("file") or "state dict")]
    lines += [f"  {key:<15} {value}" for key, value in fields.items() if key != "file"]
    return "\n".join(lines)


def _size(info: ModelInfo) -> str:
    n = info.num_params
    params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"
    text = f"{params} parameters"
    if info.file_size is not None:
        size = info.file_size
        text += f", {size / 1e9:.2f} GB on disk" if size >= 1e9 else f", {size / 1e6:.1f} MB on disk"
    return text


def _config(config) -> str:
    if isinstance(config, DiTConfig):
        return (f"dim {config.dim}, ffn {config.ffn_dim}, {config.num_heads} heads, {config.num_layers} layers, "
                f"in {config.in_dim}, out {config.out_dim}, patch {'x'.join(map(str, config.patch_size))}")
    if isinstance(config, VAEConfig):
        t, s = config.temporal_compression, config.spatial_compression
        return (f"z {config.z_dim}, base {config.dim} (decoder {config.dec_dim}), dim_mult "
                f"{'-'.join(map(str, config.dim_mult))}, {config.num_res_blocks} res blocks, {t}x{s}x{s} compression"
                + (f", {config.patch_size}x{config.patch_size} patchify" if config.patch_size > 1 else "")
                + (", residual shortcuts" if config.residual else ""))
    if isinstance(config, TextEncoderConfig):
        return (f"vocab {config.vocab_size}, dim {config.dim}, ffn {config.dim_ffn}, {config.num_heads} heads, "
                f"{config.num_layers} layers")
    return ""


if __name__ == "__main__":
    sys.exit(main())
