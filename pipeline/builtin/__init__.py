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
# Guidance 4 for the noisiest steps (cfg_high: timestep 900 and up, sampling.GUIDANCE_BOUNDARY), where the words
# decide the motion, and none after (cfg 1, one pass a step): guidance at low noise rounds small moving squares and
# triangles. Against cfg 4 throughout, 200 one-object and 100 two-object prompts scored shape 69.5% vs 61.5%, all
# right 59.5% vs 54.5% (one object) and 30% vs 25% (two), motion 93% vs 91.5% (docs/built-in-model-recipe.md).
DEFAULTS = dict(frames=17, width=64, height=64, steps=20, cfg=1.0, cfg_high=4.0, shift=8.0, solver="unipc", fps=8)
# Text to video first draws the clip's first frame as a picture (the same prompt and seed, one frame), then animates
# it as image-to-video. The model is trained on pictures and pinned first frames as well as clips, and gets colour,
# size and motion right more often this way (72 prompts: colour 92% vs 81%, size 89% vs 74%, motion 81% vs 65%).
# `zoetrope generate`, the evaluator and the text-to-video workflow all do it; `--no-image-first` turns it off.
IMAGE_FIRST = True
# The picture is drawn with its own sampler settings (the clip keeps DEFAULTS'): Euler ancestral, guidance 0.5 for the
# noisiest steps (timestep 900 and up, sampling.GUIDANCE_BOUNDARY) and none after. Guidance pulls every position of
# the noisy picture towards the prompt's objects while the layout is still being decided, and the picture then holds
# stray copies of them, which the clip carries. 100 two-object pictures held an extra object in 71% at cfg 2, 46% at
# cfg 1, and 30% with this split (single-object: 34% -> 14%). 200 single-object and 100 two-object clips scored all
# right 54.5% / 25% against 50% / 9% at cfg 2 (docs/built-in-model-recipe.md).
PICTURE = dict(solver="euler_ancestral", cfg=1.0, high_noise_cfg=0.5)


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
