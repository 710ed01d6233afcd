"""The Shapes World: the generator follows TINY_WORLD.md, and the evaluator tells right clips from wrong ones.

The specification's numbers (exact RGB, sizes 0.20 / 0.35 W, travel 0.45 W, the prompt templates) are written
out here from TINY_WORLD.md rather than imported, so that the code is checked against the page, not itself.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from zoetrope.pipeline.world import (
    ObjectSpec, Scene, analyse, apart, clip_batch, contact_sheet, paraphrase, parse_prompt, place_objects, prompt,
    render, sample_scene, score, summarise, to_frames, vocabulary_words,
)
from zoetrope.pipeline.world import scene as world
from zoetrope.pipeline.world.evaluate import _label

# TINY_WORLD.md, "Vocabulary"
SPEC_BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (235, 235, 235)}
SPEC_COLOURS = {"red": (220, 40, 40), "yellow": (235, 200, 30), "green": (40, 180, 70),
                "cyan": (40, 200, 210), "blue": (40, 90, 230), "purple": (150, 60, 200)}
SPEC_SIDES = {"small": 0.20, "large": 0.35}
SPEC_AREA = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}      # of the bounding box
SPEC_DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1),
                   "standing still": (0, 0)}
SPEC_TRAVEL = 0.45
_OBJECT = r"a (small|large) (red|yellow|green|cyan|blue|purple) (circle|square|triangle) " \
          r"(moving left|moving right|moving up|moving down|standing still)"
ONE_OBJECT = re.compile(rf"{_OBJECT} on a (black|gray|white) background")
TWO_OBJECTS = re.compile(rf"{_OBJECT} and {_OBJECT} on a (black|gray|white) background")


def scenes(seed: int, count: int, num_objects: int | None = None) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, num_objects or 1 + i % 2) for i in range(count)]


def coverage(frames: np.ndarray, background: str, colour: str) -> np.ndarray:
    """How much of each pixel is the object colour, read back from the blend with the background: [T, H, W]."""
    bg, col = np.array(SPEC_BACKGROUNDS[background], float), np.array(SPEC_COLOURS[colour], float)
    return (frames.astype(float) - bg) @ (col - bg) / ((col - bg) @ (col - bg))


def alone(scene: Scene, index: int) -> Scene:
    return replace(scene, objects=(scene.objects[index],))


# ---------------------------------------------------------------------------------------------------------------
# 1. The generator matches TINY_WORLD.md


def test_exact_palette_inside_objects_and_background():
    for scene in scenes(0, 40):
        frames = render(scene)
        bg = SPEC_BACKGROUNDS[scene.background]
        for t in range(len(frames)):
            values, counts = np.unique(frames[t].reshape(-1, 3), axis=0, return_counts=True)
            assert tuple(values[counts.argmax()]) == bg             # the background fills most of the frame
        for obj in scene.objects:
            # The bounding-box centre lies well inside every shape (for the triangle: at half its height).
            x, y = obj.centre(np.linspace(0, 1, len(frames)))
            cx, cy = (x * 64).astype(int), (y * 64).astype(int)
            assert (frames[np.arange(len(frames)), cy, cx] == SPEC_COLOURS[obj.colour]).all()
            flat = (frames == SPEC_COLOURS[obj.colour]).all(-1).sum((1, 2))
            area = SPEC_AREA[obj.shape] * (SPEC_SIDES[obj.size] * 64) ** 2
            assert (flat > 0.5 * area).all()                         # a flat interior, not just one pixel


def test_shape_map_names_the_shape_under_every_object_pixel():
    for scene in scenes(3, 20):
        frames, maps = render(scene), world.shape_map(scene)
        assert maps.shape == frames.shape[:3]
        bg = np.array(SPEC_BACKGROUNDS[scene.background])
        area = dict.fromkeys(world.SHAPES, 0.0)
        for obj in scene.objects:
            flat = (frames == SPEC_COLOURS[obj.colour]).all(-1)                # fully covered pixels
            assert (maps[flat] == 1 + world.SHAPES.index(obj.shape)).all()
            area[obj.shape] += SPEC_AREA[obj.shape] * (SPEC_SIDES[obj.size] * 64) ** 2
        for shape, expected in area.items():                                  # two objects may share a shape
            assert np.allclose((maps == 1 + world.SHAPES.index(shape)).sum((1, 2)), expected, rtol=0.15, atol=1)
        assert (maps[(frames == bg).all(-1)] == 0).all()                        # nothing labelled on the background


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("motion", list(SPEC_DIRECTIONS))
def test_size_and_motion(size, motion):
    """Bounding-box side 0.20 / 0.35 W within a pixel; the centre travels 0.45 W along the named axis, linearly.

    Measured on the coverage read back from the pixels. The pixels an object touches span its box to within a
    pixel on each side. Counting anti-aliased edges by how much they are covered (the sum over columns, or rows,
    of their largest coverage) gives the side itself, less up to a pixel for the triangle, whose sharp corners
    never fill a whole pixel. The position is the coverage-weighted centroid.
    """
    rng = np.random.default_rng(1)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for shape in SPEC_AREA:
        for size_word, side in SPEC_SIDES.items():
            scene = place_objects(rng, Scene("black", (ObjectSpec("red", shape, size_word, motion),)))
            cov = np.clip(coverage(render(scene, size), "black", "red"), 0, 1)          # [T, H, W]
            for axis in (1, 2):
                touched = (cov > 0).any(axis).sum(-1)                                   # [T] pixels
                assert (touched >= side * size).all() and (touched <= side * size + 2).all()
                extent = cov.max(axis).sum(-1)                                          # [T] pixels
                slack = 1.1 if shape == "triangle" else 0.1
                assert (extent <= side * size + 0.1).all() and (extent >= side * size - slack).all()
            total = cov.sum((1, 2))
            centroids = np.stack([(cov * xs).sum((1, 2)) / total, (cov * ys).sum((1, 2)) / total], -1) / size
            expected = SPEC_TRAVEL * np.array(SPEC_DIRECTIONS[motion])
            assert np.abs(centroids[-1] - centroids[0] - expected).max() <= 0.25 / size
            # Linear: equal steps between frames.
            steps = np.diff(centroids, axis=0)
            assert np.abs(steps - expected / (len(centroids) - 1)).max() <= 0.25 / size


def test_objects_inside_every_frame_and_never_overlapping():
    """Over many seeds, at the clip's frames and at a finer frame count: each object keeps its full area in the
    frame, and the two objects never share a pixel, not even an anti-aliased one."""
    for frames_count in (17, 65):
        for scene in scenes(2, 150 if frames_count == 17 else 30, num_objects=2):
            masks = []
            for i, obj in enumerate(scene.objects):
                cov = np.clip(coverage(render(alone(scene, i), 64, frames_count), scene.background, obj.colour),
                              0, 1)
                area = SPEC_AREA[obj.shape] * (SPEC_SIDES[obj.size] * 64) ** 2
                assert np.allclose(cov.sum((1, 2)), area, rtol=0.03), (scene, cov.sum((1, 2)), area)
                masks.append(cov > 0)
            assert not (masks[0] & masks[1]).any(), scene


def test_placement_keeps_an_objects_own_travel_inside_the_frame():
    # The world's objects all travel 0.45 W; one told to travel less may start nearer the edge it moves towards,
    # and is still placed inside the frame for the whole clip and clear of a second object.
    rng = np.random.default_rng(3)
    short = ObjectSpec("red", "square", "small", "moving right", travel=0.2)
    other = ObjectSpec("blue", "circle", "large", "moving left")
    starts = []
    for _ in range(200):
        scene = place_objects(rng, Scene("black", (short, other)))
        a, b = scene.objects
        for t in np.linspace(0, 1, 33):
            centres = [np.array(o.centre(t)) for o in (a, b)]
            for obj, c in zip((a, b), centres):      # each box inside the frame, by its own side
                half = SPEC_SIDES[obj.size] / 2
                assert (c >= half - 1e-9).all() and (c <= 1 - half + 1e-9).all(), (scene, t)
            gap = np.abs(centres[0] - centres[1]).max() - (a.side + b.side) / 2
            assert gap >= 0.04 - 1e-9, scene
        starts.append(a.start[0])
    # A small object travelling 0.45 W right starts at x <= 0.45; travelling 0.2 W, up to 0.7.
    assert max(starts) > 0.55


def test_frame_count_and_determinism():
    scene = sample_scene(np.random.default_rng(3), 2)
    frames = render(scene)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert (len(frames) - 1) % 4 == 0
    assert render(scene, 32, 9).shape == (9, 32, 32, 3)
    assert scenes(7, 5) == scenes(7, 5) and scenes(7, 5) != scenes(8, 5)
    a, pa = clip_batch(np.random.default_rng(4), 3, 32, 5)
    b, pb = clip_batch(np.random.default_rng(4), 3, 32, 5)
    assert pa == pb and bool((a == b).all())


def test_prompts_follow_the_templates():
    for scene in scenes(4, 100):
        text = prompt(scene)
        template = ONE_OBJECT if len(scene.objects) == 1 else TWO_OBJECTS
        match = template.fullmatch(text)
        assert match, text
        words = [(o.size, o.colour, o.shape, o.motion) for o in scene.objects]
        assert match.groups() == (*[w for obj in words for w in obj], scene.background)
        if len(scene.objects) == 2:
            assert scene.objects[0].colour != scene.objects[1].colour


def test_every_attribute_value_is_sampled():
    seen = {k: set() for k in ("background", "colour", "shape", "size", "motion")}
    for scene in scenes(5, 300):
        seen["background"].add(scene.background)
        for o in scene.objects:
            for k in ("colour", "shape", "size", "motion"):
                seen[k].add(getattr(o, k))
    assert seen == {"background": set(SPEC_BACKGROUNDS), "colour": set(SPEC_COLOURS), "shape": set(SPEC_AREA),
                    "size": set(SPEC_SIDES), "motion": set(SPEC_DIRECTIONS)}


def test_paraphrases_name_every_attribute():
    rng = np.random.default_rng(6)
    vocabulary = set(vocabulary_words())
    variants, canonical = set(), 0
    for scene in scenes(6, 200):
        text = paraphrase(scene, rng)
        variants.add(text)
        canonical += text == prompt(scene)
        assert set(text.replace(",", "").split()) <= vocabulary, text
        parsed = parse_prompt(text)
        assert parsed.unknown_words == () and parsed.background == scene.background, text
        assert sorted((o.colour, o.shape, o.size, o.motion) for o in parsed.objects) == \
            sorted((o.colour, o.shape, o.size, o.motion) for o in scene.objects), text
    assert len(variants) > 150 and canonical < 20


def test_parse_prompt_reads_canonical_prompts_and_reports_unknown_words():
    for scene in scenes(7, 50):
        parsed = parse_prompt(prompt(scene))
        assert parsed.background == scene.background and parsed.unknown_words == ()
        assert [replace(o, start=None) for o in scene.objects] == list(parsed.objects)
    parsed = parse_prompt("a small red circle moving left on a black background, please, quickly")
    assert parsed.unknown_words == ("please", "quickly")
    with pytest.raises(ValueError, match="shape"):
        parse_prompt("a small red moving left on a black background")


def test_each_word_of_a_prompt_belongs_to_its_object_phrase_or_to_none():
    rng = np.random.default_rng(9)
    background_words = {"on", "a", "over", "against", "in", "front", "of", "background", "black", "gray", "grey",
                        "white", "and"}
    for i, scene in enumerate(scenes(9, 120)):
        text = prompt(scene) if i % 3 == 0 else paraphrase(scene, rng)
        words = text.split(" ")
        owner = world.object_phrase_of_words(words)
        objects = parse_prompt(text).objects
        assert sorted(set(owner) - {-1}) == list(range(len(objects))), text
        for k, obj in enumerate(objects):
            phrase = " ".join(w for w, o in zip(words, owner) if o == k)
            # each phrase alone, put on a background, names its object and nothing else
            assert parse_prompt(f"{phrase} on a black background").objects == (obj,), (text, phrase)
        assert {w.strip(",") for w, o in zip(words, owner) if o < 0} <= background_words, text


def test_clip_batch():
    videos, prompts = clip_batch(np.random.default_rng(8), 6, 64, 17, p_two=0.5)
    assert tuple(videos.shape) == (6, 3, 17, 64, 64) and str(videos.dtype) == "torch.float32"
    assert float(videos.min()) >= -1.0 and float(videos.max()) <= 1.0 and len(prompts) == 6
    for video, text in zip(videos, prompts):
        assert score(to_frames(video), text)["correct"], text


# ---------------------------------------------------------------------------------------------------------------
# 2. The evaluator


def flood_fill_labels(classes: np.ndarray) -> np.ndarray:
    """Reference labeller: breadth-first search, 8-connected, same class, per frame."""
    out = np.full(classes.shape, -1)
    count = 0
    for t, y, x in zip(*np.nonzero(classes >= 0)):
        if out[t, y, x] >= 0:
            continue
        out[t, y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny in range(cy - 1, cy + 2):
                for nx in range(cx - 1, cx + 2):
                    if 0 <= ny < classes.shape[1] and 0 <= nx < classes.shape[2] and out[t, ny, nx] < 0 \
                            and classes[t, ny, nx] == classes[t, y, x]:
                        out[t, ny, nx] = count
                        queue.append((ny, nx))
        count += 1
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def test_labeller_matches_flood_fill():
    rng = np.random.default_rng(9)
    for density in (0.3, 0.5, 0.7):
        classes = np.where(rng.random((3, 24, 24)) < density, rng.integers(0, 3, (3, 24, 24)), -1)
        assert same_partition(_label(classes), flood_fill_labels(classes))
    spiral = np.full((1, 15, 15), -1)           # one long winding region, the worst case for propagation
    spiral[0, ::2, :] = 0
    spiral[0, 1::4, -1] = 0
    spiral[0, 3::4, 0] = 0
    assert len(np.unique(_label(spiral)[spiral >= 0])) == 1


@pytest.mark.parametrize("size,count", [(64, 200), (128, 40)])
def test_ground_truth_scores_correct(size, count):
    results = []
    for i, scene in enumerate(scenes(10 + size, count)):
        result = score(render(scene, size), prompt(scene), image_to_video=i % 5 == 0)
        assert result["correct"], (prompt(scene), result)
        results.append(result)
    summary = summarise(results)
    assert summary.pop("single_motion_reversed") == 0.0
    assert all(v == 1.0 for k, v in summary.items() if not k.startswith("n_")), summary
    assert summary["n_single"] + summary["n_two"] + summary["n_i2v"] == count


def blur_and_noise(frames: np.ndarray, rng, noise: float) -> np.ndarray:
    """A [1, 2, 1] blur in both directions and Gaussian noise: a stand-in for a decoder's softness."""
    x = frames.astype(np.float32)
    for axis in (1, 2):
        padded = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(4)], mode="edge")
        n = x.shape[axis]
        x = (np.take(padded, range(0, n), axis) + 2 * np.take(padded, range(1, n + 1), axis)
             + np.take(padded, range(2, n + 2), axis)) / 4
    return np.clip(np.rint(x + rng.normal(0, noise, x.shape)), 0, 255).astype(np.uint8)


def test_robust_to_blur_noise_and_specks():
    rng = np.random.default_rng(11)
    for scene in scenes(11, 60):
        frames = blur_and_noise(render(scene), rng, noise=6.0)
        # A few specks of an unnamed colour, two by two pixels, one per frame.
        for t in range(0, len(frames), 4):
            y, x = rng.integers(0, 62, 2)
            frames[t, y:y + 2, x:x + 2] = (255, 0, 255)
        assert score(frames, prompt(scene))["correct"], prompt(scene)


def altered(scene: Scene, rng, index: int = 0, **change) -> np.ndarray:
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **change)
    return render(place_objects(rng, replace(scene, objects=tuple(objects))))


def test_wrong_clips_score_wrong():
    rng = np.random.default_rng(12)
    opposite = {"moving left": "moving right", "moving right": "moving left", "moving up": "moving down",
                "moving down": "moving up"}
    checked = {k: 0 for k in ("colour", "shape", "size", "motion", "still", "moving", "missing", "extra",
                              "background")}
    for scene in scenes(12, 40):
        text = prompt(scene)
        k = int(rng.integers(len(scene.objects)))
        obj = scene.objects[k]

        def wrong(frames, attribute):
            result = score(frames, text)
            assert not result["correct"], (text, attribute)
            if attribute in ("colour", "shape", "size", "motion", "present"):
                named = result["objects"][k]
                assert not named[attribute], (text, attribute, named)
                # Everything else about the object is still judged right: the evaluator names the fault.
                others = {"colour", "shape", "size", "motion"} - {attribute}
                assert attribute == "present" or all(named[a] for a in others), (text, attribute, named)
            return result

        used = {o.colour for o in scene.objects}
        for colour in sorted(set(SPEC_COLOURS) - used)[:2]:
            wrong(altered(scene, rng, k, colour=colour), "colour")
            checked["colour"] += 1
        for shape in set(SPEC_AREA) - {obj.shape}:
            wrong(altered(scene, rng, k, shape=shape), "shape")
            checked["shape"] += 1
        wrong(altered(scene, rng, k, size=({"small", "large"} - {obj.size}).pop()), "size")
        checked["size"] += 1
        if obj.motion in opposite:
            assert wrong(altered(scene, rng, k, motion=opposite[obj.motion]), "motion")["objects"][k]["reversed"]
            assert not wrong(altered(scene, rng, k, motion="standing still"), "motion")["objects"][k]["reversed"]
            checked["motion"] += 1
            checked["still"] += 1
        else:
            moved = wrong(altered(scene, rng, k, motion=str(rng.choice(list(opposite)))), "motion")
            assert not moved["objects"][k]["reversed"]
            checked["moving"] += 1
        background = ({"black", "gray", "white"} - {scene.background}).pop()
        assert not wrong(render(replace(scene, background=background)), "background")["background"]
        checked["background"] += 1
        if len(scene.objects) == 2:
            # Missing: only the other object is drawn.
            wrong(render(alone(scene, 1 - k)), "present")
            checked["missing"] += 1
            # Extra: both are drawn but only one is named.
            result = score(render(scene), prompt(alone(scene, k)))
            assert result["extra_objects"] == 1 and not result["correct"]
            checked["extra"] += 1
        else:
            result = score(render(replace(scene, objects=())), text)
            assert not result["objects"][0]["present"] and not result["correct"]
            checked["missing"] += 1
    assert all(n > 0 for n in checked.values()), checked


def test_presence_needs_80_percent_of_frames():
    scene = sample_scene(np.random.default_rng(13), 1)
    frames = render(scene)
    empty = render(replace(scene, objects=()))
    gone = frames.copy()
    gone[1:4] = empty[1:4]                                      # missing from 3 of 17 frames: 82% present
    assert score(gone, prompt(scene))["correct"]
    gone[1:5] = empty[1:5]                                      # 4 of 17: 76%
    result = score(gone, prompt(scene))
    assert not result["objects"][0]["present"] and not result["correct"]


def test_an_extra_object_counts_when_it_persists_and_a_flicker_does_not():
    scene = sample_scene(np.random.default_rng(21), 2)
    both, named = render(scene), alone(scene, 0)
    first_only = render(named)
    for shown, extra in ((3, 0), (8, 0), (9, 1), (17, 1)):       # frames in which the unnamed object is drawn
        frames = first_only.copy()
        frames[:shown] = both[:shown]
        result = score(frames, prompt(named))
        assert result["extra_objects"] == extra, shown
        assert result["flickers"] == 1 - extra
        assert result["correct"] == (extra == 0)


def test_summarise_counts_by_kind():
    rng = np.random.default_rng(14)
    one, two = scenes(14, 4, 1), scenes(15, 2, 2)
    results = [score(render(s), prompt(s)) for s in one[:3]]
    results.append(score(altered(one[3], rng, shape={"circle": "square"}.get(one[3].objects[0].shape, "circle")),
                         prompt(one[3])))
    results += [score(render(s), prompt(s)) for s in two]
    results[-1] = score(render(alone(two[1], 0)), prompt(two[1]))
    mover = place_objects(rng, replace(one[0], objects=(replace(one[0].objects[0], motion="moving up"),)))
    results.append(score(altered(mover, rng, motion="moving down"), prompt(mover), image_to_video=True))
    results.append(score(render(mover), prompt(mover), image_to_video=True))
    summary = summarise(results)
    assert (summary["n_single"], summary["n_two"], summary["n_i2v"]) == (4, 2, 2)
    assert summary["single_shape"] == 0.75 and summary["single_all"] == 0.75
    assert summary["single_colour"] == summary["single_motion"] == summary["single_background"] == 1.0
    assert summary["two_all"] == 0.5 and summary["i2v_motion"] == 0.5
    assert summary["single_motion_reversed"] == 0.0


def test_analyse_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        analyse(np.zeros((17, 64, 64, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# 3. Contact sheet


def test_contact_sheet(tmp_path):
    clips = [render(s) for s in scenes(16, 3)]
    prompts = [prompt(s) for s in scenes(16, 3)]
    path = tmp_path / "sheet.png"
    contact_sheet(clips, prompts, path, scale=2, text_width=300, gap=4)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (4 + 3 * (64 * 2 + 4) + 300, 4 + 3 * (64 * 2 + 4))
        sheet = np.asarray(image.convert("RGB"))
    # Row 2, last tile: the clip's last frame, each pixel drawn 2x2.
    top, left = 4 + 1 * (128 + 4), 4 + 2 * (128 + 4)
    assert (sheet[top:top + 128, left:left + 128] == clips[1][-1].repeat(2, 0).repeat(2, 1)).all()
    # The prompt is written beside the frames.
    assert (sheet[top:top + 128, 4 + 3 * 132:] < 128).any()


def test_apart_tells_pairs_that_meet_during_the_clip():
    rng = np.random.default_rng(8)
    assert all(apart(sample_scene(rng, 2)) for _ in range(50))
    left = ObjectSpec("red", "square", "small", "moving right", start=(0.2, 0.5))
    right = ObjectSpec("blue", "circle", "small", "moving left", start=(0.8, 0.5))
    assert not apart(Scene("black", (left, right)))              # they cross in the middle of the clip
    assert apart(Scene("black", (left, replace(right, start=(0.8, 0.15), motion="standing still"))))
    assert apart(Scene("black", (left,)))
