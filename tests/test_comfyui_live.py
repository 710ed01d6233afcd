"""Against a real ComfyUI: set COMFYUI_DIR to a checkout (and COMFYUI_PYTHON to the Python that runs it, if it is
not this one). Skipped otherwise, as in CI.

A scratch ComfyUI base directory gets the pack (a link to this checkout) in custom_nodes/, tiny stand-ins of the
Wan files under their real names in models/, and a start image in input/. The server is started on the CPU; the
pack must load without "IMPORT FAILED", /object_info must list every node as our own definitions do, and each
example workflow (converted by our runner, shrunk with the same overrides as the headless tests) must run through
/prompt to a video file in the output folder. Cancel (/interrupt) must stop a long sampling run.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from zoetrope.nodes import runner

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
                                reason="set COMFYUI_DIR to a ComfyUI checkout to run the live ComfyUI tests")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SMALL = {"ZoetropeVideoNoise": {"width": 32, "height": 32, "frames": 5}, "ZoetropeSampler": {"steps": 2},
         "ZoetropeVAEEncode": {"width": 32, "height": 32}}
# When the built-in weights are not trained yet, the built-in workflows run on the tiny Wan 2.1 stand-ins.
INSTEAD_OF_BUILTIN = {"model_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                      "text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                      "vae_name": "wan_2.1_vae.safetensors"}


def _request(url: str, data: dict | None = None, timeout: float = 30):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_the_pack_loads_without_import_failed(comfyui):
    _, _, log_path = comfyui
    log = log_path.read_text()
    assert "custom_nodes/zoetrope" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "zoetrope" in line]


def test_object_info_lists_every_node_as_we_define_it(comfyui):
    url, _, _ = comfyui
    status, info = _request(f"{url}/object_info")
    assert status == 200
    ours = runner.object_info()
    for name in runner.node_classes():
        if not name.startswith("Zoetrope"):
            continue
        assert name in info, f"{name} missing from /object_info"
        for key in ("input_order", "output", "output_name", "category", "display_name", "output_node",
                    "description"):
            assert json.loads(json.dumps(info[name][key])) == json.loads(json.dumps(ours[name][key])), (name, key)
    # the core nodes the standalone runner stands in for have the same inputs in ComfyUI
    for name in ("LoadImage", "ImageInvert", "ImageScale"):
        assert info[name]["input_order"]["required"] == ours[name]["input_order"]["required"]
        assert info[name]["output"] == ours[name]["output"]


def _api_for_comfyui(workflow: dict) -> dict:
    from zoetrope.pipeline import builtin
    api = runner.ui_to_api(workflow)
    for node in api.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
        for name, value in INSTEAD_OF_BUILTIN.items():
            if node["inputs"].get(name) == "builtin" and not builtin.available():
                node["inputs"][name] = value
    return api


def _run(url: str, api: dict, workflow: dict | None, timeout: float = 600) -> dict:
    extra = {"extra_pnginfo": {"workflow": workflow}} if workflow is not None else {}
    status, answer = _request(f"{url}/prompt", {"prompt": api, "client_id": "zoetrope-tests", "extra_data": extra})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, history = _request(f"{url}/history/{prompt_id}")
        if history and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "running":
                return entry
        time.sleep(1)
    pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_runs_through_prompt_to_a_video(comfyui, path):
    from zoetrope.pipeline.video_io import read_tags
    url, base, log_path = comfyui
    workflow = json.loads(path.read_text())
    entry = _run(url, _api_for_comfyui(workflow), workflow)
    assert entry["status"]["status_str"] == "success", (entry["status"], log_path.read_text()[-3000:])
    files = [base / "output" / item["subfolder"] / item["filename"]
             for out in entry["outputs"].values() for item in out.get("images", []) if item.get("type") == "output"]
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files)
    for out in entry["outputs"].values():
        if out.get("images"):
            assert out.get("animated") == [True]
    for f in files:
        if f.suffix == ".mp4":
            assert json.loads(read_tags(f)["workflow"]) == workflow


def test_cancel_stops_a_long_sampling_run(comfyui):
    url, _, _ = comfyui
    workflow = json.loads((ROOT / "workflows" / "wan2.1_t2v_1.3B.json").read_text())
    api = _api_for_comfyui(workflow)
    api["8"]["inputs"]["steps"] = 1000
    # Big enough that 1000 steps of the tiny stand-in take far longer than the wait below on any machine.
    noise = next(n for n in api.values() if n["class_type"] == "ZoetropeVideoNoise")
    noise["inputs"].update(width=256, height=256, frames=33)
    status, answer = _request(f"{url}/prompt", {"prompt": api, "client_id": "zoetrope-tests"})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    time.sleep(8)                       # loaders, text encoders, then well into the sampler's steps
    assert _request(f"{url}/interrupt", {})[0] == 200
    started = time.time()
    entry = None
    while time.time() - started < 120:
        _, history = _request(f"{url}/history/{prompt_id}")
        if history and prompt_id in history:
            entry = history[prompt_id]
            break
        time.sleep(0.5)
    assert entry is not None, "the interrupted prompt never finished"
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
