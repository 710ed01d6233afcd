"""The headless runner: UI -> API conversion (by the rules ComfyUI's frontend follows, see the workflow-schema
notes), validation with errors that name the node, execution order, --set, and the command line."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from zoetrope.nodes import runner
from zoetrope.nodes.runner import WorkflowError, parse_set, ui_to_api, validate

ROOT = Path(__file__).resolve().parents[1]
T2V = ROOT / "workflows" / "zoetrope_text_to_video.json"
TINY = ["--set", "7.width=32", "--set", "7.height=32", "--set", "7.frames=5", "--set", "8.steps=2",
        "--set", "11.width=32", "--set", "11.height=32", "--set", "12.steps=2"]     # 11, 12: the first frame


pytestmark = pytest.mark.usefixtures("quiet_host")


class Graph:
    """A small UI-format workflow written by hand, the way the editor saves one."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, kind, widgets=None, inputs=(), outputs=(), mode=0, **extra):
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {},
                "order": len(self.nodes), "mode": mode, "properties": {"Node name for S&R": kind},
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": t, "type": t, "links": []} for t in outputs], **extra}
        if widgets is not None:
            node["widgets_values"] = widgets
        self.nodes.append(node)
        return node["id"]

    def link(self, a, slot, b, name, widget=False):
        lid = len(self.links) + 100
        src, dst = self.nodes[a - 1], self.nodes[b - 1]
        kind = src["outputs"][slot]["type"]
        socket = next((i for i in dst["inputs"] if i["name"] == name), None)
        if socket is None:
            socket = {"name": name, "type": kind, "link": None}
            if widget:
                socket["widget"] = {"name": name}
            dst["inputs"].append(socket)
        socket["link"] = lid
        self.links.append([lid, a, slot, b, dst["inputs"].index(socket), kind])
        return lid

    def json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links) + 100, "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def small_graph(mode_of_scale=0):
    g = Graph()
    g.node("Note", ["explains things"])
    vae = g.node("ZoetropeVAELoader", ["builtin", "auto", "auto"], outputs=["ZOETROPE_VAE"])
    reroute = g.node("Reroute", inputs=[("", "*")], outputs=["ZOETROPE_VAE"])
    noise = g.node("ZoetropeVideoNoise", [64, 32, 5, 1, 11, "randomize"], inputs=[("vae", "ZOETROPE_VAE")],
                   outputs=["LATENT"])
    prim = g.node("PrimitiveNode", [48, "fixed"], outputs=["INT"])
    decode = g.node("ZoetropeVAEDecode", [0, 64], inputs=[("vae", "ZOETROPE_VAE"), ("latent", "LATENT")],
                    outputs=["IMAGE"])
    scale = g.node("ImageInvert", inputs=[("image", "IMAGE")], outputs=["IMAGE"], mode=mode_of_scale)
    save = g.node("ZoetropeSaveVideo", [8, "mp4", 19, "x"], inputs=[("frames", "IMAGE")])
    muted = g.node("ZoetropeSaveVideo", [8, "gif", 19, "y"], inputs=[("frames", "IMAGE")], mode=2)
    g.link(vae, 0, reroute, "")
    g.link(reroute, 0, noise, "vae")
    g.link(prim, 0, noise, "width", widget=True)
    g.link(vae, 0, decode, "vae")
    g.link(noise, 0, decode, "latent")
    g.link(decode, 0, scale, "image")
    g.link(scale, 0, save, "frames")
    g.link(decode, 0, muted, "frames")
    return g


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def test_shipped_text_to_video_converts_by_the_frontend_rules():
    api = ui_to_api(json.loads(T2V.read_text()))
    assert set(api) == {"2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"}  # the Note (1) is left out
    assert api["7"] == {"class_type": "ZoetropeVideoNoise", "_meta": {"title": "Zoetrope Video Noise"},
                        "inputs": {"width": 64, "height": 64, "frames": 17, "batch": 1, "seed": 7,
                                   "vae": ["4", 0]}}                          # "fixed" (control) is not sent
    clip = {"steps": 0, "cfg": 0.0, "shift": 0.0, "solver": "auto", "denoise": 1.0, "high_noise_cfg": 0.0,
            "model": ["2", 0], "positive": ["5", 0], "negative": ["6", 0]}
    # The clip's sampler animates the picture the first one draws from one frame of noise, with the built-in
    # model's picture settings.
    assert api["8"]["inputs"] == {**clip, "latent": ["7", 0], "first_frame": ["12", 0]}
    assert api["12"]["inputs"] == {**clip, "cfg": 1.0, "solver": "euler_ancestral", "high_noise_cfg": 0.5,
                                   "latent": ["11", 0]}
    assert api["12"]["_meta"] == {"title": "First frame (picture)"}
    assert api["11"]["inputs"]["frames"] == 1
    assert api["5"]["_meta"] == {"title": "Prompt"}
    assert api["10"]["inputs"] == {"fps": 8.0, "format": "mp4", "crf": 19, "filename_prefix": "Zoetrope/text_to_video",
                                   "frames": ["9", 0]}


def test_reroute_primitive_bypass_mute_and_note():
    api = ui_to_api(small_graph(mode_of_scale=4).json())
    assert set(api) == {"2", "4", "6", "8"}            # Note, Reroute, Primitive, bypassed and muted nodes left out
    assert api["4"]["inputs"] == {"width": 48, "height": 32, "frames": 5, "batch": 1, "seed": 11, "vae": ["2", 0]}
    assert api["8"]["inputs"]["frames"] == ["6", 0]    # through the bypassed ImageInvert, IMAGE to IMAGE
    assert ui_to_api(small_graph(mode_of_scale=0).json())["8"]["inputs"]["frames"] == ["7", 0]


def test_widget_values_saved_by_an_older_node_get_defaults(caplog):
    g = small_graph()
    g.nodes[5]["widgets_values"] = [0]                 # ZoetropeVAEDecode before 'overlap' existed
    api = ui_to_api(g.json())
    assert api["6"]["inputs"] == {"tile_size": 0, "vae": ["2", 0], "latent": ["4", 0]}
    validate(api)
    assert api["6"]["inputs"]["overlap"] == 64


def test_widgets_values_as_a_mapping():
    g = small_graph()
    g.nodes[5]["widgets_values"] = {"tile_size": 256, "overlap": 32}
    assert ui_to_api(g.json())["6"]["inputs"]["tile_size"] == 256


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


def test_unknown_node_type_names_the_node_and_where_it_comes_from():
    g = small_graph()
    g.nodes[7].update(type="VHS_VideoCombine", title="Video Combine",
                      properties={"cnr_id": "comfyui-videohelpersuite", "aux_id": "Kosinkadink/ComfyUI-VideoHelperSuite"})
    g.nodes[6].update(type="KSampler", properties={"cnr_id": "comfy-core", "ver": "0.3.60"})
    with pytest.raises(WorkflowError) as e:
        ui_to_api(g.json())
    message = str(e.value)
    assert "node 8 titled 'Video Combine' is of type 'VHS_VideoCombine'" in message
    assert "comfyui-videohelpersuite" in message and "Kosinkadink/ComfyUI-VideoHelperSuite" in message
    assert "node 7 is of type 'KSampler'" in message and "core ComfyUI node" in message
    with pytest.raises(WorkflowError, match="node 3 is of type 'Nope'"):
        validate({"3": {"class_type": "Nope", "inputs": {}}})


def test_broken_links_are_named():
    g = small_graph()
    g.links = [link for link in g.links if link[0] != 104]          # noise -> decode link gone from the table
    with pytest.raises(WorkflowError, match=r"node 6 \(ZoetropeVAEDecode\) input 'latent' uses link 104, which is not"):
        ui_to_api(g.json())
    g = small_graph()
    g.links[1][1] = 99                                              # link from a node that is gone
    with pytest.raises(WorkflowError, match="linked \\(link 101\\) to node 99, which is not in the workflow"):
        ui_to_api(g.json())
    api = ui_to_api(small_graph().json())
    broken = copy.deepcopy(api)
    broken["6"]["inputs"]["latent"] = ["42", 0]
    with pytest.raises(WorkflowError, match="linked to node 42, which is not in the workflow"):
        validate(broken)
    broken = copy.deepcopy(api)
    broken["6"]["inputs"]["latent"] = ["4", 3]
    with pytest.raises(WorkflowError, match="output 3 of node 4 .* which has 1 outputs"):
        validate(broken)
    broken = copy.deepcopy(api)
    broken["8"]["inputs"]["frames"] = ["4", 0]
    with pytest.raises(WorkflowError, match="takes IMAGE but is linked to a LATENT"):
        validate(broken)
    broken = copy.deepcopy(api)
    del broken["6"]["inputs"]["latent"]
    with pytest.raises(WorkflowError, match="needs input 'latent', which is not connected"):
        validate(broken)


@pytest.mark.parametrize("name, value, message", [
    ("width", 5000, "above the maximum 4096"),
    ("frames", 0, "below the minimum 1"),
    ("seed", "abc", "not a whole number"),
    ("batch", 1.5, "not a whole number"),
])
def test_out_of_range_widgets_are_refused(name, value, message):
    api = ui_to_api(small_graph().json())
    api["4"]["inputs"][name] = value
    with pytest.raises(WorkflowError, match=f"node 4 \\(ZoetropeVideoNoise\\) {name}: .*{message}"):
        validate(api)


def test_combo_and_loader_file_checks(tmp_path):
    api = ui_to_api(small_graph().json())
    api["8"]["inputs"]["format"] = "mp5"
    with pytest.raises(WorkflowError, match="'mp5' is not one of the choices 'mp4', 'webm', 'webp', 'gif'"):
        validate(api)
    api = ui_to_api(small_graph().json())
    api["2"]["inputs"]["vae_name"] = "missing.safetensors"
    with pytest.raises(WorkflowError, match="'missing.safetensors' is not in models/vae"):
        validate(api)
    api["2"]["inputs"]["vae_name"] = str(tmp_path / "exists.safetensors")
    (tmp_path / "exists.safetensors").write_bytes(b"")
    validate(api)                                                   # standalone: a path to a file is accepted


def test_too_many_widget_values_and_no_output_and_loops():
    g = small_graph()
    g.nodes[3]["widgets_values"] = [64, 32, 5, 1, 11, "fixed", "extra"]
    with pytest.raises(WorkflowError, match="has 7 widget values but ZoetropeVideoNoise has 6 widget slots"):
        ui_to_api(g.json())
    api = ui_to_api(small_graph().json())
    del api["8"]
    with pytest.raises(WorkflowError, match="no output node"):
        validate(api)
    loop = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "ZoetropeSaveVideo", "inputs": {"frames": ["2", 0], "fps": 8, "format": "gif",
                                                                "crf": 19, "filename_prefix": "x"}}}
    with pytest.raises(WorkflowError, match="loop"):
        runner.execution_order(loop, validate(loop))


# ---------------------------------------------------------------------------------------------------------------
# --set


def test_set_values_are_json_or_text():
    assert parse_set(["7.seed=42", "5.text=a red circle", "8.cfg=1.5", '5.text="7"']) == [
        ("7", "seed", 42), ("5", "text", "a red circle"), ("8", "cfg", 1.5), ("5", "text", "7")]
    with pytest.raises(WorkflowError, match="NODE_ID.INPUT=VALUE"):
        parse_set(["seed=3"])


def test_set_checks_node_and_input_and_updates_the_ui_widgets():
    wf = json.loads(T2V.read_text())
    api = ui_to_api(wf)
    classes = runner.node_classes()
    runner.apply_overrides(api, parse_set(["7.seed=99"]), classes, wf)
    assert api["7"]["inputs"]["seed"] == 99
    assert next(n for n in wf["nodes"] if n["id"] == 7)["widgets_values"] == [64, 64, 17, 1, 99, "fixed"]
    with pytest.raises(WorkflowError, match="no node 77"):
        runner.apply_overrides(api, parse_set(["77.seed=1"]), classes)
    with pytest.raises(WorkflowError, match="ZoetropeVideoNoise has no input 'sed'"):
        runner.apply_overrides(api, parse_set(["7.sed=1"]), classes)


# ---------------------------------------------------------------------------------------------------------------
# Running


def test_cli_runs_a_workflow_and_reports_the_file(builtin_model, tmp_path, capsys):
    from zoetrope.cli import main
    rc = main(["run", str(T2V), "--output-dir", str(tmp_path / "out"), *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    (line,) = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert Path(line[6:]).is_file() and Path(line[6:]).parent == tmp_path / "out" / "Zoetrope"


def test_a_first_frame_of_another_size_than_the_clip_is_a_clear_error(builtin_model, tmp_path, capsys):
    from zoetrope.cli import main
    rc = main(["run", str(T2V), "--output-dir", str(tmp_path / "out"), *TINY, "--set", "11.width=64"])
    err = capsys.readouterr().err
    assert rc != 0 and not (tmp_path / "out" / "Zoetrope").exists()
    assert "node 8 (ZoetropeSampler)" in err and "the noise of the sampler that drew the first frame" in err


def test_cli_reports_an_invalid_workflow_without_running(tmp_path, capsys):
    wf = json.loads(T2V.read_text())
    wf["nodes"][6]["widgets_values"][0] = 99999
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(wf))
    rc = runner.main([str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "node 7 (ZoetropeVideoNoise) width: 99999 is above the maximum 4096" in err
    assert not (tmp_path / "out").exists()
    assert runner.main([str(tmp_path / "none.json")]) == 2


def test_api_format_with_core_stand_ins(builtin_model, tmp_path):
    from PIL import Image
    from zoetrope.pipeline.video_io import read_video
    inputs = tmp_path / "in"
    inputs.mkdir()
    pixels = (np.random.default_rng(0).random((5, 16, 24, 3)) * 255).astype(np.uint8)
    frames = [Image.fromarray(p) for p in pixels]
    frames[0].save(inputs / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "clip.gif"}},
           "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "ZoetropeSaveVideo", "inputs": {"frames": ["2", 0], "fps": 8, "format": "gif",
                                                                "crf": 19, "filename_prefix": "inv"}}}
    uis = runner.run_workflow(api, output_dir=tmp_path / "out", input_dir=inputs, progress=False)
    (saved,) = runner.saved_files(uis, tmp_path / "out")
    written = read_video(saved)
    with Image.open(inputs / "clip.gif") as im:
        source = []
        for i in range(5):
            im.seek(i)
            source.append(np.asarray(im.convert("RGB")))
    reference = 255 - np.stack(source)
    assert written.shape == reference.shape
    # gif is palette-quantised: compare loosely, but an un-inverted clip would be off by ~128
    assert np.abs(written.astype(int) - reference).mean() < 12


def test_object_info_describes_every_node():
    info = runner.object_info()
    noise = info["ZoetropeVideoNoise"]
    assert noise["input_order"]["required"] == ["vae", "width", "height", "frames", "batch", "seed"]
    assert noise["output"] == ["LATENT"] and noise["category"] == "Zoetrope"
    assert info["ZoetropeSaveVideo"]["output_node"] is True
    assert {"LoadImage", "ImageInvert", "ImageScale"} <= set(info)


def test_subgraph_nodes_are_named_as_such():
    g = small_graph()
    uuid = "6c3a9d3e-0000-4000-8000-000000000001"
    g.nodes[6]["type"] = uuid
    wf = g.json()
    wf["definitions"] = {"subgraphs": [{"id": uuid, "nodes": [], "links": []}]}
    with pytest.raises(WorkflowError, match="node 7 is a subgraph, which the runner does not expand"):
        ui_to_api(wf)
