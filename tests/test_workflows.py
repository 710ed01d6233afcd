"""Every workflow in workflows/: valid against ComfyUI's workflow schema, laid out like an editor would, with a
Note and download hints, and run headless to a video (the real-model ones on tiny stand-ins of the real files)."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from zoetrope.nodes import runner

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "workflow-schema" / "workflow-0.4.schema.json").read_text())
LOADER_FOLDERS = {"ZoetropeModelLoader": "diffusion_models", "ZoetropeTextEncoderLoader": "text_encoders",
                  "ZoetropeVAELoader": "vae"}


pytestmark = pytest.mark.usefixtures("quiet_host")


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


def nodes_of(workflow, kind):
    return [n for n in workflow["nodes"] if n["type"] == kind]


def test_the_promised_workflows_are_there():
    assert {p.name for p in WORKFLOWS} == {
        "zoetrope_text_to_video.json", "zoetrope_image_to_video.json", "zoetrope_video_to_video.json",
        "wan2.1_t2v_1.3B.json", "wan2.2_ti2v_5B.json", "zoetrope_with_core_image_nodes.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_and_documented(path):
    workflow = json.loads(path.read_text())
    jsonschema.validate(workflow, SCHEMA)
    (note,) = nodes_of(workflow, "Note")
    assert len(note["widgets_values"][0]) > 100
    # download hints name exactly the real files the loaders use, in the folders they read
    wanted = {(n["widgets_values"][0], LOADER_FOLDERS[n["type"]]) for n in workflow["nodes"]
              if n["type"] in LOADER_FOLDERS and n["widgets_values"][0] != "builtin"}
    hints = {(m["name"], m["directory"]) for m in workflow["models"]}
    assert hints == wanted
    for m in workflow["models"]:
        assert m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["url"].endswith("/" + m["name"])
    # every link is recorded on both ends, as the editor keeps them
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        src = next(n for n in workflow["nodes"] if n["id"] == origin)
        dst = next(n for n in workflow["nodes"] if n["id"] == target)
        assert link_id in src["outputs"][slot]["links"] and src["outputs"][slot]["type"] == kind
        assert dst["inputs"][target_slot]["link"] == link_id and dst["inputs"][target_slot]["type"] == kind
    runner.ui_to_api(workflow)                    # every node is known, every widget slot accounted for


def test_the_text_to_video_workflow_follows_the_built_in_models_settings():
    """The Note tells users what the sampler's 0 / auto widgets stand for (builtin.DEFAULTS), and the picture
    sampler draws with builtin.PICTURE, as `zoetrope generate` does."""
    from zoetrope.pipeline.builtin import DEFAULTS as d, PICTURE
    workflow = load("zoetrope_text_to_video.json")
    (note,) = nodes_of(workflow, "Note")
    text = note["widgets_values"][0].lower()
    assert (f"({d['steps']} steps, cfg {d['cfg_high']:g} for the noisiest steps then {d['cfg']:g}, "
            f"shift {d['shift']:g}, {d['solver']})") in text
    assert f"{d['width']}x{d['height']}, {d['frames']} frames at {d['fps']} fps" in text
    (picture,) = [n for n in nodes_of(workflow, "ZoetropeSampler") if n.get("title") == "First frame (picture)"]
    steps, cfg, shift, solver, denoise, high_noise_cfg = picture["widgets_values"]
    assert dict(cfg=cfg, solver=solver, high_noise_cfg=high_noise_cfg) == PICTURE
    assert (steps, shift, denoise) == (0, 0.0, 1.0)
    assert (f"{PICTURE['solver'].replace('_', ' ')} at cfg {PICTURE['cfg']:g}, and {PICTURE['high_noise_cfg']:g} "
            "for its noisiest steps") in text


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap_in_the_editor(path):
    title = 30                                    # the editor draws the title bar above pos
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in json.loads(path.read_text())["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
            assert apart, f"nodes {a[0]} and {b[0]} overlap"


# ---------------------------------------------------------------------------------------------------------------
# Headless runs


def run(name, tmp_path, *overrides, **kwargs):
    uis = runner.run_workflow(load(name), list(overrides), output_dir=tmp_path / "output", progress=False, **kwargs)
    return runner.saved_files(uis, tmp_path / "output")


def test_text_to_video_runs_as_shipped_and_the_mp4_carries_the_workflow(builtin_model, tmp_path):
    from zoetrope.pipeline.video_io import read_tags, read_video
    (path,) = run("zoetrope_text_to_video.json", tmp_path)
    assert path.name == "text_to_video_00001_.mp4" and path.parent.name == "Zoetrope"
    assert read_video(path).shape == (17, 64, 64, 3)
    tags = read_tags(path)
    assert json.loads(tags["workflow"]) == load("zoetrope_text_to_video.json")
    prompt = json.loads(tags["prompt"])
    assert prompt["7"]["inputs"]["seed"] == 7 and prompt["8"]["class_type"] == "ZoetropeSampler"


def test_the_embedded_workflow_is_the_one_that_ran(builtin_model, tmp_path):
    from zoetrope.pipeline.video_io import read_tags
    (path,) = run("zoetrope_text_to_video.json", tmp_path, "7.frames=5", "7.seed=3", "8.steps=2")
    embedded = json.loads(read_tags(path)["workflow"])
    noise = next(n for n in embedded["nodes"] if n["id"] == 7)
    assert noise["widgets_values"] == [64, 64, 5, 1, 3, "fixed"]


TINY = ("width=32", "height=32", "frames=5")


def test_image_to_video(builtin_model, tmp_path):
    """As the Note says: make a start frame with `zoetrope generate --frames 1`, then run the workflow."""
    from zoetrope.cli import main
    from zoetrope.pipeline.video_io import read_video
    inputs = tmp_path / "input"
    inputs.mkdir()
    assert main(["generate", "a large blue square standing still on a white background", "--frames", "1",
                 "--steps", "2", "-o", str(inputs / "zoetrope_start.webp")]) == 0
    (path,) = run("zoetrope_image_to_video.json", tmp_path, *(f"7.{s}" for s in TINY), "8.steps=2",
                  "11.width=32", "11.height=32", input_dir=inputs)
    assert read_video(path).shape == (5, 32, 32, 3)


def test_video_to_video(builtin_model, tmp_path):
    from zoetrope.pipeline.video_io import read_video
    saved = run("zoetrope_video_to_video.json", tmp_path, *(f"7.{s}" for s in TINY), *(f"13.{s}" for s in TINY),
                "8.steps=2", "14.steps=4")
    assert [p.name for p in saved] == ["v2v_source_00001_.mp4", "video_to_video_00001_.mp4"]
    assert all(read_video(p).shape == (5, 32, 32, 3) for p in saved)
    sampler = next(n for n in load("zoetrope_video_to_video.json")["nodes"] if n["id"] == 14)
    assert sampler["type"] == "ZoetropeSampler" and 0 < sampler["widgets_values"][4] < 1


def test_mixing_with_core_image_nodes(builtin_model, tmp_path):
    from zoetrope.pipeline.video_io import read_video
    (path,) = run("zoetrope_with_core_image_nodes.json", tmp_path, *(f"7.{s}" for s in TINY), "8.steps=2")
    assert read_video(path).shape == (5, 256, 256, 3)                       # through core ImageScale


@pytest.mark.parametrize("name, family, size", [("wan2.1_t2v_1.3B.json", "wan2.1", 32),
                                                ("wan2.2_ti2v_5B.json", "wan2.2", 32)])
def test_real_model_workflows_on_tiny_stand_ins(tiny_wan_models, tmp_path, name, family, size):
    from zoetrope.pipeline.video_io import read_video
    files = tiny_wan_models
    saved = run(name, tmp_path, f"2.model_name={files[f'{family}_model']}",
                f"3.text_encoder_name={files['text_encoder']}", f"4.vae_name={files[f'{family}_vae']}",
                f"7.width={size}", f"7.height={size}", "7.frames=5", "8.steps=2")
    (path,) = saved
    assert read_video(path).shape == (5, size, size, 3)


def test_real_model_workflows_from_a_models_folder(tiny_wan_models, tmp_path):
    """The same files under their real names in a models folder: the workflow runs with its own file choices."""
    (path,) = run("wan2.1_t2v_1.3B.json", tmp_path, "7.width=32", "7.height=32", "7.frames=5", "8.steps=1",
                  models_dir=tiny_wan_models["root"])
    assert path.is_file()
