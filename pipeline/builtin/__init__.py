"""The built-in model: three small Wan-architecture files trained on the Shapes World (see pipeline/world/).

They are ordinary checkpoints in the layouts our loaders read; nothing special-cases them except that these paths
are the defaults when no model file is given.
"""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
TRANSFORMER = FOLDER / "zoetrope_builtin_transformer.safetensors"
VAE = FOLDER / "zoetrope_builtin_vae.safetensors"
TEXT_ENCODER = FOLDER / "zoetrope_builtin_text_encoder.safetensors"

# Recommended sampling settings (what `zoetrope evaluate` measures).
# Training draws its noise levels through the same shift. Shift 8 rather than 3: objects are 10-15 standard deviations
# out in the normalised latent and show through noise up to about 0.95, so the words decide only above that (figures
# in docs/built-in-model-recipe.md).
DEFAULTS = dict(frames=17, width=64, height=64, steps=20, cfg=4.0, shift=8.0, solver="unipc", fps=8)
# Text to video first draws the clip's first frame as a picture (the same prompt and seed, one frame), then animates
# it as image-to-video. The model is trained on pictures and pinned first frames as well as clips, and gets colour,
# size and motion right more often this way (72 prompts: colour 92% vs 81%, size 89% vs 74%, motion 81% vs 65%).
# `zoetrope generate`, the evaluator and the text-to-video workflow all do it; `--no-image-first` turns it off.
IMAGE_FIRST = True
# The picture is drawn with its own sampler settings (the clip keeps DEFAULTS'). Drawn with the clip's (UniPC, cfg 4),
# two-object pictures often hold a stray copy of one object, which the clip then carries. With Euler ancestral at
# cfg 2, 56% of 64 two-object clips were free of extra objects against 33% (without the picture step: 25%), and 200
# single-object and 100 two-object prompts scored all right 46.5% / 6% against 46.5% / 2% (shape 59% against 57.5%).
PICTURE = dict(solver="euler_ancestral", cfg=2.0)


def available() -> bool:
    return TRANSFORMER.is_file() and VAE.is_file() and TEXT_ENCODER.is_file()


def require() -> None:
    """Raise the one error every entry point gives when the built-in model's files are not there."""
    if not available():
        raise FileNotFoundError(
            f"the built-in model's weights are missing from {FOLDER}; reinstall Zoetrope, or train them with "
            "`zoetrope train-builtin`")


def load(device=None, dtype=None):
    """(transformer, vae, text_encoder) of the built-in model."""
    from .. import load_text_encoder, load_transformer, load_vae
    require()
    return (load_transformer(TRANSFORMER, device=device, dtype=dtype), load_vae(VAE, device=device, dtype=dtype),
            load_text_encoder(TEXT_ENCODER, device=device, dtype=dtype))
