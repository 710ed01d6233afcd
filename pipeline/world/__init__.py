"""The Shapes World (TINY_WORLD.md): the built-in model's universe, its clip generator and its pixel-only judge."""
from .evaluate import (  # noqa: F401
    Detections, DetectedObject, Region, analyse, contact_sheet, score, summarise, to_frames, to_video,
)
from .scene import (  # noqa: F401
    BACKGROUNDS, COLOURS, FPS, FRAMES, MOTIONS, SHAPES, SIZE, SIZES, TRAVEL, ObjectSpec, ParsedPrompt, Scene,
    apart, clip_batch, paraphrase, parse_prompt, place_objects, prompt, render, sample_scene, vocabulary_words,
)
