"""The editor extension (js/) in a real browser, and its pure parts against the Python backend.

- node's test runner runs the unit tests of js/plan.js and js/frames.js (tests/browser/unit/);
- js/plan.js must snap, shape and count exactly as pipeline/generate.py plan() does, for every latent family, and
  its table of released models must hold the parameter counts and sizes of the real checkpoints (their layouts in
  tests/fixtures/layouts);
- headless Chromium (playwright-core) opens the real comfyui-frontend-package bundle served by a test backend
  (tests/browser/backend.py), loads every workflows/*.json, converts each with the frontend's own
  app.graphToPrompt() and compares it with our runner's conversion; then plays recorded live-preview events and a
  loader's output into the page and checks what the nodes show. Screenshots go to tests/artifacts/browser/.
- with COMFYUI_DIR set to a ComfyUI checkout, the same page runs against the real ComfyUI, which also queues the
  text-to-video workflow and must show the preview animating and the video arriving.

The browser tests need Chromium (`apt-get install chromium`) and playwright-core (`npm ci`); where they are
absent the tests are skipped, saying so, except in CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from zoetrope.nodes import runner

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows").glob("*.json"))}
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
PREVIEW_WORKFLOW = "zoetrope_text_to_video"

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install nodejs)")


def _browser_missing() -> str | None:
    if NODE is None:
        return "node is not installed (apt-get install nodejs)"
    if not Path(CHROMIUM).is_file():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (run `npm ci` in the repository root)"
    try:
        import aiohttp  # noqa: F401
        import comfyui_frontend_package  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[test]')"
    return None


def _need_browser() -> None:
    """Skip where the browser or its driver is missing; in CI (CI=true), which installs them, fail instead."""
    reason = _browser_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}: CI installs it, so this is a broken setup")
    if reason:
        pytest.skip(reason)


def _node_eval(script: str, data) -> object:
    """Run an ES module snippet with node; it reads JSON `data` from stdin and prints JSON."""
    out = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(data), capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------------------------
# The pure parts

@needs_node
def test_js_unit_tests_pass():
    out = subprocess.run([NODE, "--test", "tests/browser/unit/"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout


def _vaes():
    from zoetrope.pipeline.config import WAN21_VAE, WAN22_VAE
    from zoetrope.pipeline.vae import WanVAE
    from zoetrope.pipeline.world import train
    with torch.device("meta"):
        return {"builtin": WanVAE(train.VAE_CONFIG), "wan2.1": WanVAE(WAN21_VAE), "wan2.2": WanVAE(WAN22_VAE)}


@needs_node
def test_js_plan_snaps_and_shapes_as_the_backend_does():
    from zoetrope.pipeline.generate import plan
    requests = [(family, frames, width, height)
                for family in ("builtin", "wan2.1", "wan2.2")
                for frames in (1, 2, 3, 4, 5, 7, 9, 10, 11, 16, 17, 18, 19, 33, 80, 81, 82, 121, 123)
                for width, height in ((64, 64), (8, 8), (16, 24), (24, 40), (40, 56), (70, 64), (480, 832), (832, 480),
                                      (1280, 704), (720, 1280), (100, 100), (48, 96), (96, 48))]
    script = """
        import { makePlan } from "./js/plan.js";
        let input = ""; for await (const chunk of process.stdin) input += chunk;
        const out = JSON.parse(input).map(([family, frames, width, height]) => {
          const p = makePlan({ family, frames, width, height, batch: 1 });
          return { frames: p.frames, width: p.width, height: p.height, shape: p.latentShape.slice(1),
                   tokens: p.tokens, notes: p.notes.length, errors: p.errors.length };
        });
        console.log(JSON.stringify(out));
    """
    ours = _node_eval(script, requests)
    vaes = _vaes()
    compared = 0
    for (family, frames, width, height), js in zip(requests, ours):
        try:
            p = plan(vaes[family], frames, width, height)
        except ValueError:
            assert js["errors"] >= 1, (family, frames, width, height, js)
            continue
        assert js["errors"] == 0, (family, frames, width, height, js)
        assert (js["frames"], js["width"], js["height"]) == (p.frames, p.width, p.height), (family, frames, width,
                                                                                           height)
        assert js["shape"] == list(p.latent_shape) and js["tokens"] == p.tokens, (family, frames, width, height)
        assert js["notes"] == len(p.notes)
        compared += 1
    assert compared > 500


@needs_node
def test_js_model_table_matches_the_real_checkpoints():
    layouts = {"Wan 2.1 T2V 1.3B": "wan2.1_t2v_1.3B", "Wan 2.1 T2V 14B": "wan2.1_t2v_14B",
               "Wan 2.1 I2V 14B": "wan2.1_i2v_14B", "Wan 2.2 A14B (one expert)": "wan2.2_t2v_A14B_expert",
               "Wan 2.2 I2V A14B (one expert)": "wan2.2_i2v_A14B_expert", "Wan 2.2 TI2V 5B": "wan2.2_ti2v_5B"}
    models = _node_eval("""
        import { MODELS } from "./js/plan.js";
        console.log(JSON.stringify(MODELS.map(({ match, ...m }) => m)));
    """, None)
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == set(layouts) | {"built-in"}
    for name, layout in layouts.items():
        data = json.loads((ROOT / "tests" / "fixtures" / "layouts" / f"{layout}.json").read_text())
        tensors = data["tensors"]
        m = by_name[name]
        assert m["params"] == data["num_params"], name
        ffn_out, dim = tensors["blocks.0.ffn.0.weight"]["shape"]
        layers = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
        assert (m["dim"], m["ffn"], m["layers"]) == (dim, ffn_out, layers), name
        assert m["vae"] == ("wan2.2" if tensors["patch_embedding.weight"]["shape"][1] == 48 else "wan2.1"), name
    from zoetrope.pipeline.dit import WanModel
    from zoetrope.pipeline.world import train
    with torch.device("meta"):
        builtin = WanModel(train.DIT_CONFIG)
    m = by_name["built-in"]
    assert m["params"] == sum(p.numel() for p in builtin.parameters())
    assert (m["dim"], m["ffn"], m["layers"]) == (train.DIT_CONFIG.dim, train.DIT_CONFIG.ffn_dim,
                                                 train.DIT_CONFIG.num_layers)


# ---------------------------------------------------------------------------------------------------------------
# In the browser

def _run_editor(config: dict, out: Path, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "outDir": str(out), "chromium": CHROMIUM}
    path = out / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([NODE, str(ROOT / "tests" / "browser" / "editor.mjs"), str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    results_path = out / "results.json"
    assert results_path.is_file(), f"the browser script wrote no results:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    results = json.loads(results_path.read_text())
    assert not results.get("error"), results["error"]
    return results


def _steps(results: dict) -> dict:
    return {s["name"]: s for s in results["steps"]}


def _ours_in_console(results: dict) -> list:
    return [m for m in results["console"] if "/extensions/zoetrope/" in m["url"] or "zoetrope" in m["text"].lower()]


def _widget_inputs(info: dict) -> list[str]:
    names = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if runner.is_widget(spec[0], options):
                names.append(name)
    return names


def _check_workflows(results: dict, info: dict) -> None:
    for name, workflow in WORKFLOWS.items():
        seen = results["workflows"][name]
        assert not seen["missing"], f"{name}: the page reports missing things: {seen['missing']}"
        for node in seen["nodes"]:
            if node["type"] in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
                continue
            assert node["type"] in info and node["registered"] and not node["hasErrors"], (name, node)
            missing = set(_widget_inputs(info[node["type"]])) - set(node["widgets"])
            assert not missing, f"{name}: node {node['id']} ({node['type']}) has no widget for {sorted(missing)}"
        expected = json.loads(json.dumps(runner.ui_to_api(workflow)))
        assert sorted(seen["prompt"]) == sorted(expected), f"{name}: graphToPrompt gives other nodes than ui_to_api"
        for node_id, ours in expected.items():
            theirs = seen["prompt"][node_id]
            assert (theirs["class_type"], theirs["inputs"]) == (ours["class_type"], ours["inputs"]), (name, node_id)
            # _meta is not executed; newer frontends add the node pack's cnr_id and version to the title.
            assert theirs["_meta"]["title"] == ours["_meta"]["title"], (name, node_id)


def _loader_facts() -> dict:
    from zoetrope.nodes import ZoetropeModelLoader, ZoetropeTextEncoderLoader, ZoetropeVAELoader, host
    host.configure(standalone=True)
    return {cls.__name__: cls().load("builtin")["ui"]["zoetrope_model"][0]
            for cls in (ZoetropeModelLoader, ZoetropeTextEncoderLoader, ZoetropeVAELoader)}


@pytest.fixture(scope="module")
def backend(tmp_path_factory, start_images, server_tools):
    _need_browser()
    port = server_tools.free_port()
    work = tmp_path_factory.mktemp("backend")
    log = work / "backend.log"
    # The files the example workflows name, as empty stand-ins: the page then finds every model it asks for.
    for workflow in WORKFLOWS.values():
        for model in workflow.get("models") or []:
            (work / "models" / model["directory"]).mkdir(parents=True, exist_ok=True)
            (work / "models" / model["directory"] / model["name"]).touch()
    start_images(work / "input")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "browser" / "backend.py"), "--port", str(port),
                                 "--models-dir", str(work / "models"), "--input-dir", str(work / "input")], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        server_tools.wait_for(url, proc, log, 60)
        yield url
    finally:
        server_tools.stop(proc)


def test_the_editor_in_chromium(backend, builtin_model):
    sys.path.insert(0, str(ROOT / "tests" / "browser"))
    try:
        from events import preview_events
    finally:
        sys.path.pop(0)
    events = preview_events()
    facts = _loader_facts()
    started = time.time()
    results = _run_editor({"url": backend, "extension": "zoetrope", "workflows": WORKFLOWS,
                           "previewWorkflow": PREVIEW_WORKFLOW, "events": events, "facts": facts, "queue": None},
                          ARTIFACTS, timeout=240)
    steps = _steps(results)
    info = runner.object_info()

    # Nothing from us on the page before any of our nodes is there, nor anywhere after.
    assert steps["blank page"]["inspect"] == {"live": [], "facts": {}, "systemStats": False}
    assert not _ours_in_console(results), _ours_in_console(results)
    assert not [e for e in results["pageErrors"] if "zoetrope" in e.lower()], results["pageErrors"]
    assert all("127.0.0.1" not in u for u in results["blocked"])

    _check_workflows(results, info)

    # The plan: the built-in VAE's geometry, the save node's 8 fps.
    from zoetrope.pipeline.generate import plan
    vae = _vaes()["builtin"]
    noise = next(n for n in WORKFLOWS[PREVIEW_WORKFLOW]["nodes"] if n["type"] == "ZoetropeVideoNoise")
    save = next(n for n in WORKFLOWS[PREVIEW_WORKFLOW]["nodes"] if n["type"] == "ZoetropeSaveVideo")
    width, height, frames = noise["widgets_values"][:3]
    fps = save["widgets_values"][0]
    ref = plan(vae, frames, width, height)
    shown = steps["plan"]["plan"]
    assert (shown["frames"], shown["width"], shown["height"]) == (ref.frames, ref.width, ref.height)
    assert shown["latentShape"] == [1, *ref.latent_shape] and shown["tokens"] == ref.tokens
    assert shown["fps"] == fps and abs(shown["duration"] - ref.frames / fps) < 1e-9
    texts = [line["text"] for line in steps["plan"]["lines"]]
    assert f"{ref.frames} frames = {ref.frames / fps:.1f} s at {fps:g} fps (from Zoetrope Save Video)" in texts, texts
    assert any(t.startswith("≈ ") and "built-in" in t for t in texts), texts      # the memory estimate
    snapped_ref = plan(vae, 18, 70, height)
    snapped = steps["plan snapped"]
    assert (snapped["plan"]["frames"], snapped["plan"]["width"]) == (snapped_ref.frames, snapped_ref.width)
    notes = [line["text"] for line in snapped["lines"] if line["tone"] == "note"]
    assert any(n.startswith(f"frames 18 → {snapped_ref.frames}") for n in notes), notes
    assert steps["reloaded"]["lines"], "no plan on the noise node after the graph was loaded again"

    # Loader facts, as `zoetrope inspect` names them.
    for loader, f in facts.items():
        lines = steps["facts"][loader]
        assert lines == [f["name"], f"{f['family']} · {f['precision']} file · on {f['device']}"], (loader, lines)

    # The live preview: every latent frame, animating, the step and time left; gone when the sampler is done.
    p = steps["preview"]
    framed = [e for e in events if "image" in e]
    half = int(len(events) * 0.6)
    samples = p["samples"]
    assert all(s["id"] == p["sampler"]["id"] and s["loaded"] for s in samples), samples[0]
    assert samples[-1]["frames"] == framed[0]["count"] and samples[-1]["step"] == events[half - 1]["step"]
    assert samples[-1]["eta"] == events[half - 1]["eta"]
    assert len({s["shownFrame"] for s in samples}) >= 3, [s["shownFrame"] for s in samples]
    assert len({s["pixels"]["hash"] for s in samples}) >= 3, "the preview on the canvas does not move"
    assert p["after"] == {"height": p["sampler"]["height"], "liveId": None}
    assert p["inspectAfter"]["live"] == []

    sub = steps["subgraph"]
    assert sub["executionId"] in sub["promptKeys"], sub["promptKeys"]   # the id ComfyUI runs the sampler under
    assert sub["live"] and sub["ids"]["outer"] in sub["live"][0]["nodes"] and sub["live"][0]["loaded"]
    assert sub["after"] == []

    for name in ("plan.png", "plan_snapped.png", "loaders.png", "preview_mid_run.png", "preview_in_subgraph.png"):
        assert (ARTIFACTS / name).stat().st_size > 1000, name
    assert time.time() - started < 180


# ---------------------------------------------------------------------------------------------------------------
# Against a real ComfyUI

TINY = {"ZoetropeModelLoader": {"model_name": "wan2.1_t2v_1.3B_fp16.safetensors"},
        "ZoetropeTextEncoderLoader": {"text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
        "ZoetropeVAELoader": {"vae_name": "wan_2.1_vae.safetensors"}}


@pytest.fixture(scope="module")
def comfyui_server(comfyui):
    _need_browser()
    return comfyui


def test_the_editor_against_a_real_comfyui(comfyui_server):
    from zoetrope.pipeline import builtin
    url, base, log = comfyui_server
    queue = {"ZoetropeVideoNoise": {"width": 64, "height": 64, "frames": 17},
             "ZoetropeSampler": {"steps": 1000}}
    if not builtin.available():
        queue.update(TINY)
    results = _run_editor({"url": url, "extension": "zoetrope", "workflows": WORKFLOWS,
                           "previewWorkflow": PREVIEW_WORKFLOW, "events": None, "facts": None,
                           "queue": {"set": queue, "timeoutMs": 300000}},
                          ARTIFACTS / "comfyui", timeout=480)
    info = json.loads(urllib.request.urlopen(f"{url}/object_info").read())
    assert not _ours_in_console(results), _ours_in_console(results)
    _check_workflows(results, info)
    q = _steps(results)["queued"]
    assert q["done"] and not q["error"], (q["error"], log.read_text()[-3000:])
    assert q["withFrames"] >= 1 and q["maxFrames"] == 5, q          # 17 frames: 5 latent frames
    assert len(q["shown"]) >= 2, f"the preview did not animate: frames shown {q['shown']}"
    assert q["live"] == [], "the preview stayed after the sampler finished"
    files = [i for i in (q["outputs"] or {}).get("images", []) if i["filename"].endswith(".mp4")]
    assert files and (base / "output" / files[0]["subfolder"] / files[0]["filename"]).is_file(), q["outputs"]
