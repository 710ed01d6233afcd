"""The sampler's live preview (nodes/preview.py): projection, frame grid, budget, the sampler hook, the fit."""
from __future__ import annotations

import base64
import io
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zoetrope.nodes import host, preview

ROOT = Path(__file__).resolve().parents[1]


def test_published_projections_cover_the_wan_latents():
    table = preview.projections()
    assert table["wan2.1"].channels == 16 and table["wan2.2"].channels == 48
    assert preview.projection_for(16) is table["wan2.1"]
    assert preview.projection_for(48) is table["wan2.2"]
    # A latent space nobody fitted still previews, with the neutral projection.
    neutral = preview.projection_for(7)
    assert neutral.family == "neutral" and neutral.channels == 7
    assert np.allclose(np.array(neutral.factors).sum(0), 1.0)
    if "builtin" not in table:
        assert preview.projection_for(16, builtin=True).family == "neutral"


def test_latent_to_rgb_is_comfyuis_latent2rgb_formula_on_every_frame():
    """Reference: ComfyUI's Latent2RGBPreviewer (F.linear with the transposed factors and the bias, then
    (x + 1) / 2 clamped to 0..255), which does one frame; ours must do the same to each frame."""
    torch.manual_seed(0)
    for family in ("wan2.1", "wan2.2"):
        p = preview.projections()[family]
        x0 = torch.randn(2, p.channels, 5, 6, 7)
        ours = preview.latent_to_rgb(x0, p)
        assert ours.shape == (5, 6, 7, 3) and ours.dtype == torch.uint8
        weight = torch.tensor(p.factors).T                                 # [3, C]
        for t in range(5):
            rgb = F.linear(x0[0, :, t].movedim(0, -1), weight, torch.tensor(p.bias))
            ref = ((rgb + 1) / 2).clamp(0, 1).mul(255)
            assert (ours[t].float() - ref).abs().max() <= 0.5 + 1e-4       # rounding vs truncation only


def test_latent_to_rgb_refuses_a_latent_of_another_family():
    with pytest.raises(ValueError, match="takes \\[B, 16, T, H, W\\]"):
        preview.latent_to_rgb(torch.zeros(1, 48, 2, 4, 4), preview.projections()["wan2.1"])


def _tiles(payload):
    """Cut the grid the way js/frames.js does (row by row, `columns` across)."""
    sheet = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["image"]))).convert("RGB")).astype(float)
    w, h, cols = payload["frame_width"], payload["frame_height"], payload["columns"]
    return [sheet[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w]
            for i in range(payload["count"])]


@pytest.mark.parametrize("count,h,w", [(1, 8, 8), (5, 16, 16), (21, 60, 104), (31, 44, 80)])
def test_frame_grid_holds_every_frame_in_order(count, h, w):
    # Each frame a flat colour of its own, so JPEG keeps it nearly exact and a misplaced tile shows.
    colours = torch.tensor([[(37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256] for i in range(count)])
    frames = colours[:, None, None, :].expand(count, h, w, 3).to(torch.uint8).contiguous()
    payload = preview.frame_grid(frames)
    assert payload["count"] == count and (payload["frame_width"], payload["frame_height"]) == (w, h)
    tiles = _tiles(payload)
    for i, tile in enumerate(tiles):
        assert np.abs(tile.mean((0, 1)) - colours[i].numpy()).max() < 4, f"frame {i} is not where the page looks"
    rows = -(-count // payload["columns"])
    assert 0.4 < (rows * h) / (payload["columns"] * w) < 2.6 or count < 3  # a roughly square sheet


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_previews_stay_within_the_budget_and_every_step_reports_progress(monkeypatch):
    """Steps take 1 s and a preview 0.2 s (a fake clock): previews come every few steps, their total cost stays
    under the budget, and every step still reports seconds per step and time left."""
    clock, sent = Clock(), []
    real_grid = preview.frame_grid

    def slow_grid(frames):
        clock.now += 0.2
        return real_grid(frames)
    monkeypatch.setattr(preview, "frame_grid", slow_grid)
    monkeypatch.setattr(preview.LivePreview, "_recent", [1e-9])
    live = preview.LivePreview("7", preview.projections()["wan2.1"], fps=16, send=lambda e, d: sent.append((e, d)),
                               clock=clock)
    x0 = torch.randn(1, 16, 3, 4, 4)
    total = 40
    for step in range(1, total + 1):
        clock.now += 1.0
        live(step, total, x0)
    live.close()
    assert [e for e, _ in sent] == ["preview"] * (total + 1)
    steps = [d for _, d in sent[:-1]]
    assert [d["step"] for d in steps] == list(range(1, total + 1))
    assert all(abs(d["seconds_per_step"] - 1.0) < 1e-6 for d in steps)
    assert [d["eta"] for d in steps] == pytest.approx([total - s for s in range(1, total + 1)])
    with_frames = [d["step"] for d in steps if "image" in d]
    assert 3 <= len(with_frames) <= 8 and total not in with_frames
    assert live.spent <= preview.BUDGET * live.sampling + 1e-9
    assert all(d["fps"] == 4.0 and d["count"] == 3 and d["node"] == "7" for d in steps if "image" in d)
    assert sent[-1][1] == {"node": "7", "done": True}


# ---------------------------------------------------------------------------------------------------------------
# The hook in ZoetropeSampler, in a stand-in ComfyUI

class InterruptProcessingException(Exception):
    pass


@pytest.fixture
def fake_comfyui(monkeypatch, tmp_path):
    """Just enough of ComfyUI's modules for host.in_comfyui() and send_event (PromptServer.instance.send_sync)."""
    sent = []
    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda folder: []
    fp.get_output_directory = lambda: str(tmp_path)
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.get_torch_device = mm.unet_offload_device = mm.intermediate_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda: None
    mm.free_memory = lambda n, d: None
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = type("ProgressBar", (), {
        "__init__": lambda self, total: None,
        "update_absolute": lambda self, value, total=None, preview=None: sent.append(("bar", preview))})
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False, preview_size=256)
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {})
    server.PromptServer.instance = types.SimpleNamespace(send_sync=lambda event, data: sent.append((event, data)))
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils, comfy.cli_args = mm, utils, cli_args
    for name, module in (("folder_paths", fp), ("comfy", comfy), ("comfy.model_management", mm),
                         ("comfy.utils", utils), ("comfy.cli_args", cli_args), ("server", server)):
        monkeypatch.setitem(sys.modules, name, module)
    host.configure(standalone=False)
    yield sent
    host.configure(standalone=True)


def test_the_sampler_sends_live_previews_of_every_latent_frame(builtin_model, fake_comfyui, monkeypatch):
    from zoetrope.nodes import (ZoetropeModelLoader, ZoetropeSampler, ZoetropeTextEncode, ZoetropeTextEncoderLoader,
                                ZoetropeVAELoader, ZoetropeVideoNoise)
    monkeypatch.setattr(preview.LivePreview, "_recent", [0.0])   # a free preview: one every step
    model = ZoetropeModelLoader().load("builtin")["result"][0]
    te = ZoetropeTextEncoderLoader().load("builtin")["result"][0]
    vae = ZoetropeVAELoader().load("builtin")["result"][0]
    cond = ZoetropeTextEncode().encode(te, "a red circle")[0]
    noise = ZoetropeVideoNoise().noise(vae, 32, 32, 9, 1, 3)[0]
    ZoetropeSampler().sample(model, cond, cond, noise, 3, 1.0, 0.0, "auto", unique_id="12:4")
    events = [d for e, d in fake_comfyui if e == "zoetrope.preview"]
    steps = [d["step"] for d in events[:-1]]
    assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(set(steps))   # first and last always, in order
    assert events[-1] == {"node": "12:4", "done": True}
    assert all(d["node"] == "12:4" and d["total"] == 3 and d["seconds_per_step"] > 0 for d in events[:-1])
    # ComfyUI's still preview would be drawn where the animation is: it is left out.
    assert [p for e, p in fake_comfyui if e == "bar"] == [None, None, None]
    framed = [d for d in events if "image" in d]
    assert framed and all(d["count"] == noise["samples"].shape[2] for d in framed)   # every latent frame
    assert all(d["frame_width"] == noise["samples"].shape[4] for d in framed)
    assert ZoetropeSampler.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_without_comfyuis_server_there_is_no_live_preview(builtin_model, fake_comfyui, monkeypatch):
    from zoetrope.nodes import ZoetropeModelLoader
    model = ZoetropeModelLoader().load("builtin")["result"][0]
    assert preview.sampler_preview(model, "3") is not None
    monkeypatch.delitem(sys.modules, "server")
    assert preview.sampler_preview(model, "3") is None


def test_outside_comfyui_the_sampler_makes_no_preview(builtin_model):
    host.configure(standalone=True)
    from zoetrope.nodes import ZoetropeModelLoader
    model = ZoetropeModelLoader().load("builtin")["result"][0]
    assert preview.sampler_preview(model, "3") is None
    assert preview.sampler_preview(model, "3", send=lambda e, d: None) is not None


# ---------------------------------------------------------------------------------------------------------------
# Fitting

def test_fit_projection_recovers_a_known_linear_map():
    """Clips made from latents through a known map (each latent pixel's colour spread over the 4 frames and 8x8
    pixels it stands for, plus pixel noise that averages out) give back that map."""
    g = torch.Generator().manual_seed(1)
    c, t, h, w, tc, sc = 16, 4, 6, 5, 4, 8
    factors = torch.randn(c, 3, generator=g) * 0.2
    bias = torch.tensor([0.1, -0.2, 0.05])
    latents = torch.randn(6, c, t, h, w, generator=g)
    rgb = torch.einsum("bcthw,ck->bkthw", latents, factors) + bias[None, :, None, None, None]
    video = torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(tc, 2)], dim=2)
    video = video.repeat_interleave(sc, 3).repeat_interleave(sc, 4)
    video = video + 0.05 * torch.randn(video.shape, generator=g)
    p = preview.fit_projection(latents, video, tc, sc, "test")
    err = (torch.tensor(p.factors) - factors).abs().max() / factors.abs().max()
    assert err < 0.01, f"max relative error of the factors {err:.4f}"
    assert torch.allclose(torch.tensor(p.bias), bias, atol=2e-3)
    with pytest.raises(ValueError, match="do not match the video"):
        preview.fit_projection(latents[:, :, :2], video, tc, sc, "test")


def test_fit_script_runs_on_the_built_in_vae_and_keeps_the_published_rows(builtin_model_dir, tmp_path, monkeypatch):
    import json
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fit_latent_rgb
    finally:
        sys.path.pop(0)
    table = tmp_path / "latent_rgb.json"
    table.write_text(preview.DATA.read_text())
    monkeypatch.setattr(preview, "DATA", table)
    preview.projections.cache_clear()
    try:
        assert fit_latent_rgb.main(["--vae", str(builtin_model_dir / "zoetrope_builtin_vae.safetensors"),
                                    "--clips", "4", "--frames", "5"]) == 0
        written = json.loads(table.read_text())
        assert set(written) >= {"wan2.1", "wan2.2", "builtin"}
        assert written["wan2.1"] == json.loads(preview.DATA.read_text())["wan2.1"]
        assert len(written["builtin"]["factors"]) == 16
        assert preview.projection_for(16, builtin=True).family == "builtin"
    finally:
        preview.projections.cache_clear()


def test_preview_benchmark_prints_the_share():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preview_cost.py"), "--runs", "1", "--steps", "4",
                          "--quick"], capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                         "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "share of sampling time" in out.stdout
