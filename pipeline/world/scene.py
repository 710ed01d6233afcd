"""The Shapes World: vocabulary, scenes, the renderer and the prompts of the built-in model's universe.

Everything here follows TINY_WORLD.md literally, because the generator that trains the built-in model and any
outside evaluator must agree on what a prompt means. Geometry is kept in fractions of the canvas width W, so a
scene renders at any size; the canvas is square.

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, num_objects=2)
    frames = render(scene)          # uint8 [17, 64, 64, 3]
    text = prompt(scene)            # "a small red circle moving left and a large blue square standing still
                                    #  on a black background"
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary (canonical words; the RGB values are exact)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 200, 30),
    "green": (40, 180, 70),
    "cyan": (40, 200, 210),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Bounding-box side as a fraction of W. A triangle is isosceles, apex up, base = height = the side.
SIZES: dict[str, float] = {"small": 0.20, "large": 0.35}
# Direction of travel in image coordinates (x right, y down).
MOTIONS: dict[str, tuple[int, int]] = {
    "moving left": (-1, 0),
    "moving right": (1, 0),
    "moving up": (0, -1),
    "moving down": (0, 1),
    "standing still": (0, 0),
}

TRAVEL = 0.45          # how far (in W) the centre travels from the first to the last frame
FRAMES = 17            # 4k+1, the Wan rule
FPS = 8
SIZE = 64
# Bounding boxes of two objects keep at least this gap (in W) in every frame, so that their anti-aliased edges
# never touch and each object stays one connected region of its own colour.
MIN_GAP = 0.04


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str
    motion: str
    # Centre of the bounding box in the first frame, (x, y) as fractions of W; None where only the words are known
    # (a parsed prompt).
    start: tuple[float, float] | None = None
    # How far the centre travels over the clip, in W. The world's clips all travel TRAVEL; the training's
    # free-start clips (world.train) travel less, as far as the frame leaves room for.
    travel: float = TRAVEL

    @property
    def side(self) -> float:
        return SIZES[self.size]

    def centre(self, progress: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) in fractions of W at `progress` in [0, 1] through the clip (the motion is linear)."""
        if self.start is None:
            raise ValueError(f"{self} has no start position; place it first with place_objects(rng, scene)")
        dx, dy = MOTIONS[self.motion]
        p = np.asarray(progress, dtype=np.float64)
        return self.start[0] + dx * self.travel * p, self.start[1] + dy * self.travel * p


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ObjectSpec, ...]


def _check_words(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {sorted(BACKGROUNDS)}")
    for obj in scene.objects:
        for value, table, kind in ((obj.colour, COLOURS, "colour"), (obj.shape, SHAPES, "shape"),
                                   (obj.size, SIZES, "size"), (obj.motion, MOTIONS, "motion")):
            if value not in table:
                raise ValueError(f"unknown {kind} {value!r} in {obj}; expected one of {sorted(table)}")
    colours = [o.colour for o in scene.objects]
    if len(set(colours)) != len(colours):
        raise ValueError(f"two objects share the colour in {colours}; in the Shapes World their colours differ")


def start_range(side: float, direction: int, travel: float = TRAVEL) -> tuple[float, float]:
    """Interval of start-centre coordinates along one axis that keeps a box of `side` inside [0, 1] for the whole
    clip while its centre travels `travel` in `direction` (-1, 0 or 1) along that axis."""
    lo, hi = side / 2, 1 - side / 2
    if direction > 0:
        hi -= travel
    elif direction < 0:
        lo += travel
    return lo, hi


def _overlap_interval(d0: np.ndarray, d1: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Where |d0 + (d1 - d0) t| < limit within t in [0, 1], for a linear d: (start, end), empty when start >= end."""
    slope = d1 - d0
    moving = np.abs(slope) > 1e-12
    safe = np.where(moving, slope, 1.0)
    a, b = (-limit - d0) / safe, (limit - d0) / safe
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # A fixed offset overlaps for the whole clip or never.
    lo = np.where(moving, lo, np.where(np.abs(d0) < limit, 0.0, 1.0))
    hi = np.where(moving, hi, np.where(np.abs(d0) < limit, 1.0, 0.0))
    return np.maximum(lo, 0.0), np.minimum(hi, 1.0)


def _boxes_meet(a: ObjectSpec, b: ObjectSpec, a_start: np.ndarray, b_start: np.ndarray) -> np.ndarray:
    """For candidate starts [N, 2] of a and b: whether their bounding boxes, grown by MIN_GAP, meet at any moment
    of the clip (checked in continuous time, so at any frame count)."""
    reach = (a.side + b.side) / 2 + MIN_GAP
    offset = a_start - b_start                                              # [N, 2] at t = 0
    drift = a.travel * np.array(MOTIONS[a.motion]) - b.travel * np.array(MOTIONS[b.motion])
    x_lo, x_hi = _overlap_interval(offset[:, 0], offset[:, 0] + drift[0], reach)
    y_lo, y_hi = _overlap_interval(offset[:, 1], offset[:, 1] + drift[1], reach)
    # The boxes meet where they overlap on both axes at the same time.
    return np.maximum(x_lo, y_lo) < np.minimum(x_hi, y_hi)


def apart(scene: Scene) -> bool:
    """Whether the scene's placed objects stay apart (MIN_GAP between their boxes) for the whole clip."""
    objs = scene.objects
    return not any(_boxes_meet(a, b, np.array([a.start]), np.array([b.start]))[0]
                   for i, a in enumerate(objs) for b in objs[i + 1:])


def place_objects(rng, scene: Scene, batch: int = 4096, max_batches: int = 100) -> Scene:
    """Draw random start positions for the scene's objects: inside the frame for the whole clip, never meeting.

    Keeps every word of the scene and resamples positions (uniformly over the valid ones) until they are valid.
    Use it after changing an attribute (size, motion) of a placed scene. Candidates are drawn a batch at a time
    because some pairs (two large objects crossing paths) fit in only a small part of the position space.
    """
    rng = np.random.default_rng(rng)
    _check_words(scene)
    for _ in range(max_batches):
        starts = []
        for obj in scene.objects:
            dx, dy = MOTIONS[obj.motion]
            (x0, x1), (y0, y1) = start_range(obj.side, dx, obj.travel), start_range(obj.side, dy, obj.travel)
            starts.append(np.stack([rng.uniform(x0, x1, batch), rng.uniform(y0, y1, batch)], axis=1))  # [N, 2]
        valid = np.ones(batch, dtype=bool)
        for i, a in enumerate(scene.objects):
            for j in range(i + 1, len(scene.objects)):
                valid &= ~_boxes_meet(a, scene.objects[j], starts[i], starts[j])
        if valid.any():
            k = int(np.flatnonzero(valid)[0])
            objects = tuple(replace(o, start=(float(s[k, 0]), float(s[k, 1]))) for o, s in zip(scene.objects, starts))
            return replace(scene, objects=objects)
    raise RuntimeError(f"found no valid placement for {scene} in {batch * max_batches} tries; "
                       f"the objects cannot fit in the frame without meeting")


def sample_scene(rng, num_objects: int = 1) -> Scene:
    """A random scene of the Shapes World: every attribute uniform, two objects of different colours."""
    rng = np.random.default_rng(rng)
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects={num_objects}; the Shapes World has one or two objects per scene")
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = rng.choice(list(COLOURS), size=num_objects, replace=False)
    objects = tuple(
        ObjectSpec(colour=str(c), shape=str(rng.choice(SHAPES)), size=str(rng.choice(list(SIZES))),
                   motion=str(rng.choice(list(MOTIONS))))
        for c in colours)
    return place_objects(rng, Scene(background, objects))


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _segment_distance(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Euclidean distance from points (x, y) to the segment from a to b."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    t = np.clip(((x - a[0]) * ex + (y - a[1]) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(x - a[0] - t * ex, y - a[1] - t * ey)


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Exact signed distance (in pixels, negative inside) from points to the shape's outline.

    x, y are offsets from the bounding-box centre. Exact outside corners too, so the anti-aliased fringe reaches
    half a pixel beyond the outline everywhere and never further.
    """
    half = side / 2
    if shape == "circle":
        return np.hypot(x, y) - half
    if shape == "square":
        ox, oy = np.abs(x) - half, np.abs(y) - half
        return np.hypot(np.maximum(ox, 0), np.maximum(oy, 0)) + np.minimum(np.maximum(ox, oy), 0)
    if shape == "triangle":
        # Apex at (0, -half), base from (-half, half) to (half, half); symmetric, so fold x onto the right half.
        # Inside, the distance is the nearest edge's half-plane distance; the slanted edge rises 2 for every 1
        # across, so its outward normal is (2, -1) / sqrt(5).
        ax = np.abs(x)
        inside = np.maximum(y - half, (2 * ax - (y + half)) / math.sqrt(5))
        outside = np.minimum(_segment_distance(ax, y, (0.0, -half), (half, half)),
                             _segment_distance(ax, y, (0.0, half), (half, half)))
        return np.where(inside <= 0, inside, outside)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _object_distances(scene: Scene, size: int, frames: int):
    """Each object with its signed distance [T, H, W] from every pixel centre, in pixels, frame by frame."""
    progress = np.arange(frames) / max(frames - 1, 1)                       # [T]
    centres = (np.arange(size, dtype=np.float32) + 0.5)                      # pixel centres
    for obj in scene.objects:
        cx, cy = obj.centre(progress)
        x = centres[None, None, :] - (cx * size).astype(np.float32)[:, None, None]   # [T, 1, W]
        y = centres[None, :, None] - (cy * size).astype(np.float32)[:, None, None]   # [T, H, 1]
        yield obj, _signed_distance(obj.shape, x, y, obj.side * size)


def render(scene: Scene, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """Draw the scene: uint8 [frames, size, size, 3], flat colours with anti-aliased edges.

    Coverage is clamp(0.5 - signed distance) per pixel (a one-pixel ramp across the outline: the exact box-filter
    coverage along straight edges), which makes interior pixels exactly the palette colour and the pixels at
    least half covered exactly those whose centre lies inside the shape.
    """
    _check_words(scene)
    if frames < 1 or size < 1:
        raise ValueError(f"render needs frames >= 1 and size >= 1, got frames={frames}, size={size}")
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    image = np.broadcast_to(bg, (frames, size, size, 3)).copy()              # [T, H, W, 3]
    for obj, distance in _object_distances(scene, size, frames):
        coverage = np.clip(0.5 - distance, 0.0, 1.0)                         # [T, H, W]
        # Objects never overlap, so each one blends against the background alone.
        image += coverage[..., None] * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shape_map(scene: Scene, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """Which shape covers each pixel: int64 [frames, size, size], 0 for the background and 1 + SHAPES.index(shape)
    where an object covers at least half the pixel (render's coverage)."""
    out = np.zeros((frames, size, size), dtype=np.int64)
    for obj, distance in _object_distances(scene, size, frames):
        out[distance <= 0] = 1 + SHAPES.index(obj.shape)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def _object_phrase(obj: ObjectSpec) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {obj.motion}"


def prompt(scene: Scene) -> str:
    """The canonical prompt of TINY_WORLD.md: lower case, single spaces, objects in the scene's order."""
    _check_words(scene)
    objects = " and ".join(_object_phrase(o) for o in scene.objects)
    return f"{objects} on a {scene.background} background"


# Paraphrase vocabulary: each canonical word and the words that may stand for it in training prompts.
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_SHAPE_WORDS = {"circle": ("circle", "ball", "disc"), "square": ("square", "box", "block"),
                "triangle": ("triangle",)}
_BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey"), "white": ("white",)}
_VERBS = ("moving", "drifting", "going", "sliding", "gliding", "heading")
_DIRECTION_WORDS = {"left": ("left", "leftward", "leftwards"), "right": ("right", "rightward", "rightwards"),
                    "up": ("up", "upward", "upwards"), "down": ("down", "downward", "downwards")}
_STILL_PHRASES = ("standing still", "staying still", "sitting still", "not moving", "motionless", "resting")
_STILL_CUES = ("still", "motionless", "resting", "not")
_ARTICLES = ("a", "one")
_BACKGROUND_PHRASES = ("on a {} background", "over {}", "against a {} background", "on {}",
                       "in front of a {} background")


def _paraphrase_motion(motion: str, rng: np.random.Generator) -> str:
    dx, dy = MOTIONS[motion]
    if (dx, dy) == (0, 0):
        return str(rng.choice(_STILL_PHRASES))
    direction = motion.split()[-1]
    verb = str(rng.choice(_VERBS))
    if direction in ("left", "right") and rng.random() < 0.25:
        return f"{verb} to the {direction}"
    return f"{verb} {rng.choice(_DIRECTION_WORDS[direction])}"


def paraphrase(scene: Scene, rng) -> str:
    """A random rewording of the scene's prompt for training variety; it still names every attribute.

    Synonyms (big/tiny, ball/box, drifting/going, grey), other background phrases, the background first or last,
    and the two objects in either order.
    """
    rng = np.random.default_rng(rng)
    _check_words(scene)
    objects = list(scene.objects)
    if len(objects) > 1 and rng.random() < 0.5:
        objects.reverse()
    phrases = [
        f"{rng.choice(_ARTICLES)} {rng.choice(_SIZE_WORDS[o.size])} {o.colour} "
        f"{rng.choice(_SHAPE_WORDS[o.shape])} {_paraphrase_motion(o.motion, rng)}"
        for o in objects]
    background = str(rng.choice(_BACKGROUND_PHRASES)).format(rng.choice(_BACKGROUND_WORDS[scene.background]))
    if rng.random() < 0.2:
        return f"{background}, " + " and ".join(phrases)
    return " and ".join(phrases) + f" {background}"


_MOTION_PHRASE_WORDS = frozenset(
    {"to", "the"} | set(_VERBS) | {w for ws in _DIRECTION_WORDS.values() for w in ws}
    | {w for phrase in _STILL_PHRASES for w in phrase.split()})


def object_phrase_of_words(words: list[str]) -> list[int]:
    """For each word of a world prompt (canonical or paraphrased, split on spaces): the index of the object phrase
    it belongs to, in the prompt's order (the order of parse_prompt's objects), or -1 for 'and' and the background
    phrase. An object phrase is an article, a size, a colour, a shape and a motion phrase, as paraphrase() writes
    it."""
    bare = [re.sub(r"[^a-z]+", "", w.lower()) for w in words]
    sizes = _lookup(_SIZE_WORDS)
    owner, phrase, i = [-1] * len(words), 0, 0
    while i < len(bare):
        if bare[i] in _ARTICLES and i + 1 < len(bare) and bare[i + 1] in sizes:
            end = i + 4                       # article, size, colour, shape
            while end < len(bare) and bare[end] in _MOTION_PHRASE_WORDS:
                end += 1
            owner[i:end] = [phrase] * (end - i)
            phrase, i = phrase + 1, end
        else:
            i += 1
    return owner


def vocabulary_words() -> list[str]:
    """Every word a canonical prompt or a paraphrase can use, sorted (for training the tokenizer)."""
    words: set[str] = {"and", "background", "to", "the"}
    words.update(BACKGROUNDS, COLOURS, SHAPES, SIZES, _VERBS, _ARTICLES)
    for table in (_SIZE_WORDS, _SHAPE_WORDS, _BACKGROUND_WORDS, _DIRECTION_WORDS):
        for synonyms in table.values():
            words.update(synonyms)
    for phrase in (*MOTIONS, *_STILL_PHRASES, *_BACKGROUND_PHRASES):
        words.update(phrase.replace("{}", " ").split())
    return sorted(words)


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt names: Scene-like (objects carry no start position) plus the words that were not understood."""
    background: str
    objects: tuple[ObjectSpec, ...]
    unknown_words: tuple[str, ...]

    @property
    def scene(self) -> Scene:
        return Scene(self.background, self.objects)


def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {synonym: word for word, synonyms in table.items() for synonym in synonyms}


def _only(found: list[str], kind: str, clause: str, text: str) -> str:
    if len(set(found)) != 1:
        what = "no" if not found else f"more than one ({', '.join(found)})"
        raise ValueError(f"prompt {text!r}: {what} {kind} in the object phrase {clause!r}; expected one, as in "
                         f"'a small red circle moving left on a black background'")
    return found[0]


def parse_prompt(text: str) -> ParsedPrompt:
    """Read a canonical prompt (paraphrases too) into its background and objects.

    Words outside vocabulary_words() are skipped and reported in `unknown_words`. Raises ValueError when the
    background or an object's size, colour, shape or motion is missing or named twice.
    """
    tokens = re.sub(r"[^a-z]+", " ", text.lower()).split()
    known = set(vocabulary_words())
    unknown = tuple(t for t in tokens if t not in known)
    backgrounds = _lookup(_BACKGROUND_WORDS)
    sizes, shapes, directions = _lookup(_SIZE_WORDS), _lookup(_SHAPE_WORDS), _lookup(_DIRECTION_WORDS)
    background = _only([backgrounds[t] for t in tokens if t in backgrounds], "background", text, text)

    clauses: list[list[str]] = [[]]
    for t in tokens:
        if t == "and":
            clauses.append([])
        else:
            clauses[-1].append(t)
    objects = []
    for clause in clauses:
        phrase = " ".join(clause)
        moves = [f"moving {directions[t]}" for t in clause if t in directions]
        if not moves and any(t in _STILL_CUES for t in clause):
            moves = ["standing still"]
        objects.append(ObjectSpec(
            colour=_only([t for t in clause if t in COLOURS], "colour", phrase, text),
            shape=_only([shapes[t] for t in clause if t in shapes], "shape", phrase, text),
            size=_only([sizes[t] for t in clause if t in sizes], "size", phrase, text),
            motion=_only(moves, "motion", phrase, text)))
    return ParsedPrompt(background, tuple(objects), unknown)


# ---------------------------------------------------------------------------------------------------------------
# Training batches


def clip_batch(rng, n: int, size: int = SIZE, frames: int = FRAMES, p_two: float = 0.5,
               p_paraphrase: float = 0.5):
    """n random clips for training: (videos float32 torch [n, 3, frames, size, size] in [-1, 1], prompts).

    A clip has two objects with probability p_two; its prompt is a paraphrase with probability p_paraphrase,
    otherwise the canonical prompt.
    """
    import torch

    rng = np.random.default_rng(rng)
    videos = np.empty((n, 3, frames, size, size), dtype=np.float32)
    prompts = []
    for i in range(n):
        scene = sample_scene(rng, 2 if rng.random() < p_two else 1)
        videos[i] = render(scene, size, frames).transpose(3, 0, 1, 2)        # [3, T, H, W]
        prompts.append(paraphrase(scene, rng) if rng.random() < p_paraphrase else prompt(scene))
    return torch.from_numpy(videos / 127.5 - 1.0), prompts
