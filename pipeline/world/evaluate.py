"""Judge a Shapes World video from its pixels alone, as TINY_WORLD.md defines a correct video.

    detections = analyse(frames)                 # what is in the clip: background, objects and their attributes
    result = score(frames, "a small red circle moving left on a black background")
    result["correct"]                            # background and every object with all its attributes right
    summarise([result, ...])                     # accuracies per attribute
    contact_sheet(clips, prompts, "sheet.png")   # first, middle and last frames with the prompts, to look at

Nothing here knows how a video was made: the same code judges rendered ground truth and model samples. All
three backgrounds are neutral (R = G = B), so blending an object colour into one keeps the colour's hue and
scales its chroma by the coverage. A pixel belongs to the object colour of the nearest hue when it carries at
least half that colour's chroma: that splits anti-aliased edges where the outline runs. Shape and size are then
measured on each region's coverage (how far each pixel lies from the background towards the object's colour),
so edge pixels count by how much they are covered, and mild blur or noise from a decoder barely moves them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import BACKGROUNDS, COLOURS, MOTIONS, SIZES, parse_prompt

PRESENCE = 0.8          # an object is present when its colour region is found in at least this share of frames
# Another object "appears" when it persists: its region (or a second region of a named colour) is found in at least
# this share of frames. A fringe of another hue that flickers in a few frames of a generated clip is counted
# separately (`flickers`), not as an object. A real extra object is there the whole clip.
EXTRA_PRESENCE = 0.5
STILL = 0.08            # centroid displacement (in W) under which an object stands still
# Bounding-box fill of each shape: the square fills it, the disc pi/4, the triangle (base = height) half.
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
# Regions smaller than this (in W^2; a fifth of the smallest object, a small triangle) are specks, not objects.
MIN_AREA = 0.004
MIN_COVERAGE = 0.5      # share of a colour's chroma that makes a pixel part of an object of that colour

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32)          # [K, 3]


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of float RGB [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, (g - b) / c % 6, np.where(high == g, (b - r) / c + 2, (r - g) / c + 4))
    return hue * 60.0, chroma


_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(_PALETTE)                        # [K], [K]


def _colour_classes(frames: np.ndarray) -> np.ndarray:
    """Index into COLOURS of each pixel's object colour, or -1 for background: int [T, H, W]."""
    rgb = frames.reshape(-1, 3)
    chroma = rgb.max(-1).astype(np.int16) - rgb.min(-1)                    # [N]
    classes = np.full(chroma.shape, -1, dtype=np.int64)
    # Only pixels with some colour can pass any class's threshold; the rest (most of a frame) skip the hue.
    candidates = np.flatnonzero(chroma >= MIN_COVERAGE * _PALETTE_CHROMA.min())
    hue, _ = _hue_chroma(rgb[candidates].astype(np.float32))               # [M]
    gap = np.abs(hue[:, None] - _PALETTE_HUE)                                # [M, K]
    nearest = np.minimum(gap, 360.0 - gap).argmin(-1)                        # [M]
    keep = chroma[candidates] >= MIN_COVERAGE * _PALETTE_CHROMA[nearest]
    classes[candidates[keep]] = nearest[keep]
    return classes.reshape(frames.shape[:3])


def _label(classes: np.ndarray) -> np.ndarray:
    """Connected components (8-connected, same class, within one frame) of classes >= 0: int [T, H, W].

    Each pixel ends up labelled with the smallest flat index in its component (-1 for background): labels spread
    to the minimum over neighbours, and pointer jumping (label <- label of the pixel it names) shortcuts long
    chains, so it takes a few dozen vectorised passes rather than one per pixel of the longest path.
    """
    _, h, w = classes.shape
    big = np.iinfo(np.int64).max
    foreground = classes >= 0
    labels = np.where(foreground, np.arange(classes.size).reshape(classes.shape), big)
    padded_classes = np.pad(classes, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    # For each of the 8 neighbours: where it is the same object colour as the pixel.
    joined = [(dy, dx, foreground & (padded_classes[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes))
              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    members = np.flatnonzero(foreground)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        new = labels.copy()
        for dy, dx, same in joined:
            np.minimum(new, np.where(same, padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w], big), out=new)
        flat = new.reshape(-1)
        for _ in range(4):
            flat[members] = flat[flat[members]]
        if np.array_equal(new, labels):
            return np.where(foreground, labels, -1)
        labels = new


@dataclass(frozen=True)
class Region:
    """One connected region of one colour in one frame, in pixels.

    `pixels` and `box` describe the region itself (pixels at least half covered); `area`, `width`, `height` and
    `centroid` are measured on the object's coverage (0..1 per pixel, so anti-aliased and blurred edges count by
    how much they are covered), which makes them exact on clean renders and barely moved by noise that flips
    single edge pixels.
    """
    frame: int
    colour: str
    pixels: int
    box: tuple[int, int, int, int]          # x0, y0, x1, y1, inclusive
    area: float                             # summed coverage
    width: float                            # summed over columns: the column's largest coverage
    height: float                           # summed over rows: the row's largest coverage
    centroid: tuple[float, float]           # x, y, coverage-weighted

    @property
    def fill(self) -> float:
        """How much of its bounding box the region fills."""
        return self.area / max(self.width * self.height, 1e-9)

    @property
    def side(self) -> float:
        return (self.width + self.height) / 2


@dataclass(frozen=True)
class DetectedObject:
    """An object tracked by its colour: per frame its largest region of that colour."""
    colour: str
    frames: tuple[int, ...]                 # frames in which it is found
    presence: float                         # share of all frames
    fill: float                             # median bounding-box fill
    side: float                             # median bounding-box side, in W
    displacement: tuple[float, float]       # centroid from its first to its last frame, in W
    shape: str
    size: str
    motion: str
    extra_regions: int                      # frames holding a second region of this colour (another object)


@dataclass(frozen=True)
class Detections:
    background: str                         # the named background nearest to the median border colour
    background_rgb: tuple[float, float, float]
    num_frames: int
    width: int
    objects: tuple[DetectedObject, ...]     # most present first


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(table[k] - value))


def _motion(dx: float, dy: float) -> str:
    if np.hypot(dx, dy) < STILL:
        return "standing still"
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(m for m, d in MOTIONS.items() if d == step)


def _grow(mask: np.ndarray, step: int) -> np.ndarray:
    """Dilate (step 1) or erode (step -1) a 2-D mask by one pixel, 8-connected."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=step < 0)
    shifted = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.logical_or.reduce(shifted) if step > 0 else np.logical_and.reduce(shifted)


def _measure(frame: np.ndarray, labels: np.ndarray, label: int, colour: int, box, background: np.ndarray):
    """Coverage-based area, width, height and centroid of one region (see Region)."""
    x0, y0, x1, y1 = box
    top, left = max(y0 - 1, 0), max(x0 - 1, 0)
    crop = frame[top:y1 + 2, left:x1 + 2].astype(np.float32)                 # [h, w, 3]
    own = labels[top:y1 + 2, left:x1 + 2] == label                            # [h, w]
    # The region plus the ring of pixels around it that belong to no other region: its anti-aliased edge.
    support = _grow(own, 1) & (own | (labels[top:y1 + 2, left:x1 + 2] < 0))
    # Coverage of a pixel: how far it lies from the background towards the object colour, scaled so that the
    # region's inside reads 1 (a generated object may be a little paler or stronger than the palette).
    direction = _PALETTE[colour] - background
    coverage = (crop - background) @ direction / float(direction @ direction)   # [h, w]
    inside = _grow(own, -1)
    full = np.median(coverage[inside if inside.any() else own])
    coverage = coverage / max(full, MIN_COVERAGE) * support
    # Noise averages out of the summed area, so it sums the coverage unclipped; the per-row and per-column
    # maxima would only pick the noise's peaks, so they see it clipped to [0, 1].
    area = float(coverage.sum())
    coverage = np.clip(coverage, 0.0, 1.0)
    ys, xs = np.mgrid[top:top + crop.shape[0], left:left + crop.shape[1]] + 0.5
    total = coverage.sum()
    if total <= 0:      # a region no closer to its colour than the background is: weigh its pixels equally
        coverage, total = own.astype(np.float32), float(own.sum())
    centroid = (float((coverage * xs).sum() / total), float((coverage * ys).sum() / total))
    return area, float(coverage.max(0).sum()), float(coverage.max(1).sum()), centroid


def _regions(frames: np.ndarray, classes: np.ndarray, labels: np.ndarray, background: np.ndarray,
             min_area: float) -> list[Region]:
    """Every labelled component of at least min_area pixels, measured."""
    keep = labels >= 0
    ids, inverse, pixels = np.unique(labels[keep], return_inverse=True, return_counts=True)
    _, y, x = np.nonzero(keep)
    n = len(ids)
    x0, y0 = np.full(n, classes.shape[2]), np.full(n, classes.shape[1])
    x1, y1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(x0, inverse, x), np.minimum.at(y0, inverse, y)
    np.maximum.at(x1, inverse, x), np.maximum.at(y1, inverse, y)
    # A label is the flat index of one of its pixels: it names the frame and the colour class.
    frame, colour = ids // (classes.shape[1] * classes.shape[2]), classes.reshape(-1)[ids]
    regions = []
    for i in np.flatnonzero(pixels >= min_area):
        box = (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))
        t = int(frame[i])
        area, width, height, centroid = _measure(frames[t], labels[t], ids[i], colour[i], box, background)
        regions.append(Region(t, _NAMES[colour[i]], int(pixels[i]), box, area, width, height, centroid))
    return regions


def analyse(frames: np.ndarray) -> Detections:
    """What a clip shows, from its pixels alone: background, and each object's colour, shape, size and motion.

    frames: uint8 [T, H, W, 3] (see to_frames for decoder output). The background is the named one nearest to
    the median border colour. Objects are connected regions of one object colour (specks under MIN_AREA W^2
    are ignored), tracked across frames by colour. Shape comes from the median bounding-box fill, size from the
    median bounding-box side, motion from the centroid's displacement between the first and last frames the
    object is found in.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"analyse expects uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}; "
                         f"convert decoder output with to_frames(video)")
    num_frames, height, width, _ = frames.shape
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1)
    background_rgb = np.median(border.reshape(-1, 3).astype(np.float32), axis=0)
    background = min(BACKGROUNDS, key=lambda k: np.sum((np.array(BACKGROUNDS[k]) - background_rgb) ** 2))

    classes = _colour_classes(frames)
    regions = _regions(frames, classes, _label(classes), background_rgb, MIN_AREA * width * width)
    objects = []
    for colour in _NAMES:
        per_frame: dict[int, list[Region]] = {}
        for r in regions:
            if r.colour == colour:
                per_frame.setdefault(r.frame, []).append(r)
        if not per_frame:
            continue
        track = [max(per_frame[t], key=lambda r: r.pixels) for t in sorted(per_frame)]
        fill = float(np.median([r.fill for r in track]))
        side = float(np.median([r.side for r in track])) / width
        dx = (track[-1].centroid[0] - track[0].centroid[0]) / width
        dy = (track[-1].centroid[1] - track[0].centroid[1]) / width
        objects.append(DetectedObject(
            colour=colour, frames=tuple(sorted(per_frame)), presence=len(track) / num_frames, fill=fill, side=side,
            displacement=(dx, dy), shape=_nearest(fill, FILL), size=_nearest(side, SIZES), motion=_motion(dx, dy),
            extra_regions=sum(len(rs) > 1 for rs in per_frame.values())))
    objects.sort(key=lambda o: -o.presence)
    return Detections(background, tuple(float(v) for v in background_rgb), num_frames, width, tuple(objects))


def score(frames: np.ndarray, prompt: str, image_to_video: bool = False) -> dict:
    """Judge a clip against its prompt, following TINY_WORLD.md's "what counts as a correct video".

    Each named object is the detected object of its colour; where that colour is missing, the most present
    detected object that no other name claims stands in for it, so that a wrong colour still gets its shape,
    size and motion judged. Per named object: present (found in >= PRESENCE of the frames), colour, shape, size,
    motion. Any detected object that no name claims, or a second region of a claimed colour, is an extra object when
    it persists (EXTRA_PRESENCE of the frames); shorter ones are reported as flickers.
    `correct` is the background, every attribute of every object, and no extra object.
    """
    parsed = parse_prompt(prompt)
    named = [o.colour for o in parsed.objects]
    if len(set(named)) != len(named):
        raise ValueError(f"prompt {prompt!r} names two objects of one colour; in the Shapes World colours differ")
    found = analyse(frames)
    by_colour = {o.colour: o for o in found.objects}
    spare = [o for o in found.objects if o.colour not in named]

    objects = []
    for spec in parsed.objects:
        match = by_colour.get(spec.colour) or (spare.pop(0) if spare else None)
        present = match is not None and match.presence >= PRESENCE
        objects.append({
            "name": f"{spec.size} {spec.colour} {spec.shape} {spec.motion}",
            "present": present,
            "colour": present and match.colour == spec.colour,
            "shape": present and match.shape == spec.shape,
            "size": present and match.size == spec.size,
            "motion": present and match.motion == spec.motion,
            # Moving, but the opposite way: the mistake a model makes when it reads the direction off where the
            # object starts rather than off the prompt (see summarise's single_motion_reversed).
            "reversed": present and spec.motion != "standing still"
                        and MOTIONS[match.motion] == tuple(-d for d in MOTIONS[spec.motion]),
            "detected": match,
        })
    # Share of frames each unclaimed region is seen in: other colours' tracks, and second regions of named ones.
    shares = [o.presence for o in spare] + [o.extra_regions / found.num_frames for o in found.objects
                                            if o.colour in named and o.extra_regions]
    extra = sum(share >= EXTRA_PRESENCE for share in shares)
    background = found.background == parsed.background
    attributes = ("present", "colour", "shape", "size", "motion")
    return {
        "prompt": prompt,
        "task": "image-to-video" if image_to_video else "text-to-video",
        "background": background,
        "objects": objects,
        "extra_objects": extra,
        "flickers": len(shares) - extra,
        "correct": background and extra == 0 and all(o[a] for o in objects for a in attributes),
        "detections": found,
    }


def summarise(scores: list[dict]) -> dict:
    """Accuracies (share of clips, None where no clip qualifies) over scores from score().

    single_*: text-to-video clips with one object, per attribute (an attribute counts as right only for a present
    object) and `single_all` (the whole clip correct); single_motion_reversed: one-object clips whose object moves
    the opposite way to the prompt (a share of all of them, like single_motion); two_all: two-object clips correct;
    i2v_motion: image-to-video clips whose every object moves as prompted.
    """
    def share(flags):
        flags = list(flags)
        return sum(flags) / len(flags) if flags else None

    t2v = [s for s in scores if s["task"] == "text-to-video"]
    single = [s for s in t2v if len(s["objects"]) == 1]
    two = [s for s in t2v if len(s["objects"]) == 2]
    i2v = [s for s in scores if s["task"] == "image-to-video"]
    out = {"n_single": len(single), "n_two": len(two), "n_i2v": len(i2v),
           "single_background": share(s["background"] for s in single)}
    for attribute in ("colour", "shape", "size", "motion"):
        out[f"single_{attribute}"] = share(s["objects"][0][attribute] for s in single)
    out["single_motion_reversed"] = share(s["objects"][0]["reversed"] for s in single)
    out["single_all"] = share(s["correct"] for s in single)
    out["two_all"] = share(s["correct"] for s in two)
    out["i2v_motion"] = share(all(o["motion"] for o in s["objects"]) for s in i2v)
    return out


def to_video(frames: np.ndarray):
    """uint8 clips [N, T, H, W, 3] -> the VAE's input, float32 torch [N, 3, T, H, W] in [-1, 1] (to_frames undone)."""
    import torch
    return torch.from_numpy(np.asarray(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def to_frames(video) -> np.ndarray:
    """Decoder output [3, T, H, W] float in [-1, 1] (torch or numpy) -> uint8 frames [T, H, W, 3]."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"to_frames expects one video [3, T, H, W] in [-1, 1], got shape {list(video.shape)}")
    return np.clip(np.rint((video.transpose(1, 2, 3, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def contact_sheet(clips, prompts: list[str], path, scale: int = 2, text_width: int = 320, gap: int = 4):
    """Write a PNG with one row per clip: its first, middle and last frames enlarged `scale` times (nearest),
    then the prompt, wrapped, in PIL's default font.

    clips: uint8 frames [T, H, W, 3] each, all of one size. The sheet is gap + 3 * (W * scale + gap) +
    text_width pixels wide and gap + n * (H * scale + gap) high. Returns the PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    clips = [np.asarray(c) for c in clips]
    if not clips or len(clips) != len(prompts):
        raise ValueError(f"contact_sheet needs one prompt per clip and at least one clip, got {len(clips)} clips "
                         f"and {len(prompts)} prompts")
    _, height, width, _ = clips[0].shape
    tile_h, tile_w = height * scale, width * scale
    sheet = Image.new("RGB", (gap + 3 * (tile_w + gap) + text_width, gap + len(clips) * (tile_h + gap)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for row, (clip, text) in enumerate(zip(clips, prompts)):
        if clip.shape[1:] != (height, width, 3) or clip.dtype != np.uint8:
            raise ValueError(f"clip {row} is {clip.dtype} {list(clip.shape)}; expected uint8 [T, {height}, {width}, 3]"
                             f" like the first clip")
        top = gap + row * (tile_h + gap)
        for col, t in enumerate((0, len(clip) // 2, len(clip) - 1)):
            tile = Image.fromarray(clip[t]).resize((tile_w, tile_h), Image.NEAREST)
            sheet.paste(tile, (gap + col * (tile_w + gap), top))
        lines, line = [], ""
        for word in text.split():
            if line and draw.textlength(f"{line} {word}", font=font) > text_width - 2 * gap:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((gap + 3 * (tile_w + gap), top), "\n".join(lines), fill="black", font=font)
    sheet.save(path, format="PNG")
    return sheet
