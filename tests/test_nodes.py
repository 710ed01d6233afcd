"""The nine nodes, one by one and chained, on the built-in model (or its random-weight stand-in), and the host
adapter both standalone and against a stand-in of ComfyUI's modules.

References are independent of the node code: core ComfyUI's noise convention written out here, pipeline.generate()
for the whole chain, the VAE itself for the tiled decode, ffmpeg's own reading of the container tags.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from zoetrope.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from zoetrope.nodes.generation import ZoetropeSampler, ZoetropeTextEncode, ZoetropeVideoNoise
from zoetrope.nodes.loaders import ZoetropeModelLoader, ZoetropeTextEncoderLoader, ZoetropeVAELoader
from zoetrope.nodes.runner import input_specs, widget_slots
from zoetrope.nodes.save import ZoetropeSaveVideo
from zoetrope.nodes.vae_nodes import ZoetropeVAEDecode, ZoetropeVAEEncode, tile_starts

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle moving right on a black background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared CPU: OpenMP threads spinning against other processes cost 100x more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def host_state():
    """Each test starts from the standalone host and leaves it as it found it."""
    import dataclasses
    saved = dataclasses.replace(host._standalone)
    host.configure(standalone=True)
    yield
    host._standalone = saved


@pytest.fixture(scope="module")
def models(builtin_model_dir):
    """(model, text encoder, VAE) handles of the 'builtin' choice, pointed at builtin_model_dir."""
    from zoetrope.pipeline import builtin
    with pytest.MonkeyPatch.context() as mp:
        for name in ("TRANSFORMER", "VAE", "TEXT_ENCODER"):
            mp.setattr(builtin, name, builtin_model_dir / getattr(builtin, name).name)
        host.configure(standalone=True)
        model = ZoetropeModelLoader().load("builtin")["result"][0]
        te = ZoetropeTextEncoderLoader().load("builtin")["result"][0]
        vae = ZoetropeVAELoader().load("builtin")["result"][0]
        yield model, te, vae


@pytest.fixture
def output_dir(tmp_path):
    host.configure(standalone=True, output_dir=tmp_path / "output")
    return tmp_path / "output"


def conditioning(te, text=PROMPT):
    return ZoetropeTextEncode().encode(te, text)[0]


# ---------------------------------------------------------------------------------------------------------------
# Definitions


def test_the_nine_nodes_and_their_metadata():
    assert set(NODE_CLASS_MAPPINGS) == {
        "ZoetropeModelLoader", "ZoetropeTextEncoderLoader", "ZoetropeVAELoader", "ZoetropeTextEncode",
        "ZoetropeVideoNoise", "ZoetropeSampler", "ZoetropeVAEDecode", "ZoetropeVAEEncode", "ZoetropeSaveVideo"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("Zoetrope"), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name
        for input_name, _, options, _ in input_specs(cls):
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_widget_order_is_the_released_one():
    # Saved workflows bind widget values by position: this order may only ever grow at the end.
    assert {name: widget_slots(cls) for name, cls in NODE_CLASS_MAPPINGS.items()} == {
        "ZoetropeModelLoader": ["model_name", "precision", "device"],
        "ZoetropeTextEncoderLoader": ["text_encoder_name", "precision", "device"],
        "ZoetropeVAELoader": ["vae_name", "precision", "device"],
        "ZoetropeTextEncode": ["text"],
        "ZoetropeVideoNoise": ["width", "height", "frames", "batch", "seed", None],
        "ZoetropeSampler": ["steps", "cfg", "shift", "solver", "denoise", "high_noise_cfg"],
        "ZoetropeVAEDecode": ["tile_size", "overlap"],
        "ZoetropeVAEEncode": ["width", "height"],
        "ZoetropeSaveVideo": ["fps", "format", "crf", "filename_prefix"],
    }


IMPORT_AS_COMFYUI_DOES = """
import importlib.util, sys, types
sys.modules["zoetrope"] = None                 # not pip-installed: only the folder's own relative imports work
root, out = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("Zoetrope-main", root + "/__init__.py",
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
for cls in pack.NODE_CLASS_MAPPINGS.values():
    cls.INPUT_TYPES()
assert pack.WEB_DIRECTORY == "./js"
print(len(pack.NODE_CLASS_MAPPINGS), "torch" in sys.modules)
# running nodes pulls in the pipeline through relative imports only
import torch
host = sys.modules["Zoetrope-main.nodes.host"]
host.configure(standalone=True, output_dir=out)
shape = lambda f, h, w: (16, 1 + (f - 1) // 4, h // 8, w // 8)
vae = types.SimpleNamespace(module=types.SimpleNamespace(temporal_compression=4, spatial_compression=8,
                                                         latent_shape=shape))
noise = pack.NODE_CLASS_MAPPINGS["ZoetropeVideoNoise"]().noise(vae, 32, 32, 5, 1, 0)[0]["samples"]
ui = pack.NODE_CLASS_MAPPINGS["ZoetropeSaveVideo"]().save(torch.rand(5, 16, 16, 3), 8.0, "gif", 19, "x")
print(tuple(noise.shape), ui["ui"]["images"][0]["filename"], torch.cuda.is_initialized())
"""


def test_importing_the_pack_is_cheap_and_works_without_installing(tmp_path):
    """ComfyUI imports the folder by path under its own module name: no torch, model or CUDA at import, INPUT_TYPES
    without ComfyUI, and the nodes reach the pipeline without the `zoetrope` package being installed."""
    out = subprocess.run([sys.executable, "-c", IMPORT_AS_COMFYUI_DOES, str(ROOT), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["9 False", "(1, 16, 2, 4, 4) x_00001_.gif False"]


def test_loader_lists_builtin_first_then_the_models_folder(tmp_path):
    (tmp_path / "diffusion_models" / "sub").mkdir(parents=True)
    (tmp_path / "diffusion_models" / "b.safetensors").write_bytes(b"")
    (tmp_path / "diffusion_models" / "sub" / "a.safetensors").write_bytes(b"")
    (tmp_path / "diffusion_models" / "notes.txt").write_text("")
    host.configure(standalone=True, models_dir=tmp_path)
    choices = ZoetropeModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["builtin", "b.safetensors", "sub/a.safetensors"]
    assert ZoetropeTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0] == ["builtin"]


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def test_loaders_return_their_pack_types_with_the_file_facts(models):
    model, te, vae = models
    assert model.module.config.in_dim == model.module.config.out_dim == vae.module.z_dim
    assert model.module.config.text_dim == te.module.encoder.config.dim
    assert model.latent.channels == vae.module.z_dim
    # the built-in model's latent space is its VAE's: same statistics as the VAE file states
    assert model.latent.mean == pytest.approx(vae.module.config.latents_mean)
    assert model.latent.std == pytest.approx(vae.module.config.latents_std)
    from zoetrope.pipeline import builtin
    assert model.defaults == builtin.DEFAULTS


def test_wrong_kind_of_file_in_a_loader_is_refused_with_the_right_loader_named(builtin_model_dir):
    from zoetrope.pipeline.checkpoints import CheckpointError
    vae_file = str(builtin_model_dir / "zoetrope_builtin_vae.safetensors")
    host.configure(standalone=True)
    with pytest.raises(CheckpointError, match="ZoetropeVAELoader"):
        ZoetropeModelLoader().load(vae_file)
    with pytest.raises(CheckpointError, match="ZoetropeModelLoader"):
        ZoetropeTextEncoderLoader().load(str(builtin_model_dir / "zoetrope_builtin_transformer.safetensors"))
    assert ZoetropeModelLoader.VALIDATE_INPUTS("no-such-file.safetensors") != True  # noqa: E712
    with pytest.raises(FileNotFoundError, match="diffusion_models"):
        ZoetropeModelLoader().load("no-such-file.safetensors")


def test_fp8_precision_keeps_block_weights_in_fp8_and_stays_close(builtin_model_dir, models):
    model, te, vae = models
    fp8 = ZoetropeModelLoader().load(str(builtin_model_dir / "zoetrope_builtin_transformer.safetensors"),
                                     precision="fp8")["result"][0]
    dtypes = {n: p.dtype for n, p in fp8.module.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.float8_e4m3fn
    assert dtypes["patch_embedding.weight"] == torch.float32 and dtypes["head.head.weight"] == torch.float32
    x = torch.randn(1, 16, 2, 8, 8)
    ctx = [torch.randn(5, model.module.config.text_dim)]
    with torch.no_grad():
        ref = model.module(x, torch.tensor([500.0]), ctx)
        out = fp8.module(x, torch.tensor([500.0]), ctx)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel          # e4m3 keeps 3 mantissa bits: a few percent per layer


# ---------------------------------------------------------------------------------------------------------------
# Text encode, noise


def test_text_encode_gives_core_conditioning(models):
    _, te, _ = models
    cond = conditioning(te)
    assert isinstance(cond, list) and len(cond) == 1
    tensor, extra = cond[0]
    assert extra == {}
    expected = te.module.encode([PROMPT])[0]
    assert tensor.shape == (1, *expected.shape) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0], expected.float())
    assert tensor.shape[1] == len(te.module.tokenizer.tokenize(PROMPT))       # tokens + EOS, no padding


def test_video_noise_is_core_comfyui_noise_of_the_vae_latent_shape(models, caplog):
    _, _, vae = models
    latent = ZoetropeVideoNoise().noise(vae, 64, 32, 9, 2, 123)[0]["samples"]
    c, s = vae.module.temporal_compression, vae.module.spatial_compression
    assert latent.shape == (2, vae.module.z_dim, 1 + 8 // c, 32 // s, 64 // s)
    g = torch.Generator("cpu").manual_seed(123)                # core: prepare_noise on a seeded CPU generator
    assert torch.equal(latent, torch.randn(latent.shape, generator=g))
    with caplog.at_level(logging.WARNING, logger="zoetrope"):
        snapped = ZoetropeVideoNoise().noise(vae, 60, 64, 10, 1, 0)[0]["samples"]
    assert snapped.shape[2] == 1 + 8 // c and snapped.shape[4] == 64 // s
    assert "frames 10 -> 9" in caplog.text and "width 60 -> 64" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def run_chain(models, seed=5, frames=5, size=32, steps=2, cfg=0.0, solver="auto", **sampler_kw):
    model, te, vae = models
    noise = ZoetropeVideoNoise().noise(vae, size, size, frames, 1, seed)[0]
    latent = ZoetropeSampler().sample(model, conditioning(te), conditioning(te, ""), noise, steps, cfg, 0.0, solver,
                                      **sampler_kw)[0]
    return noise, latent


@pytest.mark.parametrize("solver", ("unipc", "euler_ancestral"))
def test_the_node_chain_makes_what_generate_makes(models, solver):
    """Nodes and pipeline.generate() are one code path: the same seed gives the same frames (for a solver that
    adds noise as it goes too: the seed travels with the noise latent)."""
    from zoetrope.pipeline.generate import generate
    model, te, vae = models
    _, latent = run_chain(models, seed=9, steps=3, cfg=3.0, solver=solver)
    frames = ZoetropeVAEDecode().decode(vae, latent)[0]
    ref = generate(model.module, vae.module, te.module, PROMPT, negative_prompt="", seed=9, frames=5, width=32,
                   height=32, steps=3, cfg=3.0, shift=model.defaults["shift"], solver=solver)
    assert frames.shape == ref.shape == (5, 32, 32, 3)
    assert (frames - ref).abs().max().item() < 1e-4


def test_high_noise_cfg_guides_the_noisiest_steps_as_the_pipeline_does(models):
    """The sampler's high_noise_cfg is sample()'s: its own guidance for the steps at timestep 900 and up (the
    built-in model's picture settings, cfg 1 after), and 0 keeps cfg throughout."""
    from zoetrope.pipeline import generate as gen
    model, te, _ = models
    noise, split = run_chain(models, frames=1, steps=4, cfg=1.0, solver="euler", high_noise_cfg=0.5)
    with torch.no_grad():
        ref = gen.sample(model.module, noise["samples"], te.module.encode([PROMPT]),
                         te.module.encode([""]), steps=4, cfg=1.0, shift=model.defaults["shift"], solver="euler",
                         high_noise_cfg=0.5)
    torch.testing.assert_close(split["samples"], model.latent.denormalize(ref), rtol=0, atol=1e-4)
    _, plain = run_chain(models, frames=1, steps=4, cfg=1.0, solver="euler", high_noise_cfg=0.0)
    _, plain_again = run_chain(models, frames=1, steps=4, cfg=1.0, solver="euler")
    assert torch.equal(plain["samples"], plain_again["samples"])
    assert (split["samples"] - plain["samples"]).abs().max() > 1e-3
    # cfg 0 and high_noise_cfg 0 take the model's recommendation: for the built-in model, two scales.
    rec = model.defaults
    assert rec["cfg_high"] != rec["cfg"]
    _, recommended = run_chain(models, frames=1, steps=4, cfg=0.0, solver="euler")
    with torch.no_grad():
        ref = gen.sample(model.module, noise["samples"], te.module.encode([PROMPT]), te.module.encode([""]), steps=4,
                         cfg=rec["cfg"], shift=rec["shift"], solver="euler", high_noise_cfg=rec["cfg_high"])
    torch.testing.assert_close(recommended["samples"], model.latent.denormalize(ref), rtol=0, atol=1e-4)


def test_sampler_output_is_a_raw_latent_of_the_noise_shape(models):
    noise, latent = run_chain(models)
    assert latent["samples"].shape == noise["samples"].shape
    assert torch.isfinite(latent["samples"]).all()
    _, again = run_chain(models)
    assert torch.equal(latent["samples"], again["samples"])                # deterministic for a seed


def test_image_to_video_starts_exactly_on_the_start_latent(models):
    model, te, vae = models
    image = torch.rand(1, 32, 32, 3)
    first = ZoetropeVAEEncode().encode(vae, image, 32, 32)[0]
    _, latent = run_chain(models, first_frame=first)
    torch.testing.assert_close(latent["samples"][:, :, :1], first["samples"], rtol=0, atol=1e-5)


def test_video_to_video_denoise_zero_returns_the_clip_and_one_redraws_it(models):
    _, _, vae = models
    clip = ZoetropeVAEEncode().encode(vae, torch.rand(5, 32, 32, 3))[0]
    _, kept = run_chain(models, video=clip, denoise=0.0)
    torch.testing.assert_close(kept["samples"], clip["samples"], rtol=0, atol=1e-5)
    _, half = run_chain(models, video=clip, denoise=0.5)
    _, fresh = run_chain(models)
    d_half = (half["samples"] - clip["samples"]).abs().mean()
    d_fresh = (fresh["samples"] - clip["samples"]).abs().mean()
    assert 0 < d_half < d_fresh


def test_sampler_refuses_what_does_not_fit(models):
    model, te, vae = models
    noise = ZoetropeVideoNoise().noise(vae, 32, 32, 5, 1, 0)[0]
    pos, neg = conditioning(te), conditioning(te, "")
    sample = ZoetropeSampler().sample
    with pytest.raises(ValueError, match="connect a clip's latent"):
        sample(model, pos, neg, noise, 2, 0.0, 0.0, "auto", 0.5)
    with pytest.raises(ValueError, match="channels"):
        sample(model, pos, neg, {"samples": torch.randn(1, 48, 2, 8, 8)}, 2, 0.0, 0.0, "auto", 1.0)
    with pytest.raises(ValueError, match="text encoder"):
        sample(model, [(torch.randn(1, 7, 4096), {})], neg, noise, 2, 0.0, 0.0, "auto", 1.0)
    with pytest.raises(ValueError, match="image latent"):
        sample(model, pos, neg, {"samples": torch.randn(1, 16, 8, 8)}, 2, 0.0, 0.0, "auto", 1.0)


def test_start_image_of_another_aspect_ratio(models, caplog):
    """Left as is it cannot pin a square clip (clear error); given the clip's size it is centre-cropped (logged)."""
    model, te, vae = models
    wide = torch.rand(1, 32, 64, 3)
    noise = ZoetropeVideoNoise().noise(vae, 32, 32, 5, 1, 0)[0]
    own_size = ZoetropeVAEEncode().encode(vae, wide)[0]
    with pytest.raises(ValueError, match="width and height of this sampler's ZoetropeVideoNoise: on ZoetropeVAEEncode"):
        ZoetropeSampler().sample(model, conditioning(te), conditioning(te, ""), noise, 1, 1.0, 0.0, "auto", 1.0,
                                 first_frame=own_size)
    with caplog.at_level(logging.WARNING, logger="zoetrope"):
        fitted = ZoetropeVAEEncode().encode(vae, wide, 32, 32)[0]
    assert "another aspect ratio" in caplog.text and "centre-cropped" in caplog.text
    assert fitted["samples"].shape[-2:] == noise["samples"].shape[-2:]


def test_cancel_mid_sampling_stops_within_a_step_and_propagates(models, monkeypatch):
    model, te, vae = models
    calls = []
    forward = type(model.module).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                      # the Cancel button, pressed during the second step
            host.request_interrupt()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.module), "forward", counting)
    noise = ZoetropeVideoNoise().noise(vae, 32, 32, 5, 1, 0)[0]
    with pytest.raises(host.Interrupted):
        ZoetropeSampler().sample(model, conditioning(te), conditioning(te, ""), noise, 10, 3.0, 0.0, "auto", 1.0)
    assert len(calls) == 3                       # cfg: two calls a step; nothing ran after the Cancel
    host.check_interrupt()                       # the request was consumed: the next job runs


def test_cancel_during_vae_decode(models, monkeypatch):
    _, _, vae = models
    z = {"samples": torch.randn(1, vae.module.z_dim, 3, 8, 8)}
    decode = type(vae.module).decode

    def decode_then_cancel(self, z, callback=None):
        def cb(done, total):
            if done == 1:
                host.request_interrupt()
            callback(done, total)
        return decode(self, z, callback=cb)

    monkeypatch.setattr(type(vae.module), "decode", decode_then_cancel)
    with pytest.raises(host.Interrupted):
        ZoetropeVAEDecode().decode(vae, z)


# ---------------------------------------------------------------------------------------------------------------
# VAE decode / encode


def test_decode_gives_image_frames_in_range(models):
    _, _, vae = models
    z = torch.randn(2, vae.module.z_dim, 2, 8, 8)
    frames = ZoetropeVAEDecode().decode(vae, {"samples": z})[0]
    s = vae.module.spatial_compression
    assert frames.shape == (2 * 5, 8 * s, 8 * s, 3)
    assert frames.min() >= 0 and frames.max() <= 1


def test_tiled_decode_is_bounded_and_matches_whole_frame_decode(models, monkeypatch):
    """Tiles against one whole decode, on the latent of a world clip (what users decode). Pure noise latents are
    no test of the seams: far outside what the trained decoder saw, they decode differently under any change of
    context (tiles of them differ from the whole frame by a mean of 0.06-0.11)."""
    import numpy as np
    from zoetrope.pipeline import world
    _, _, vae = models
    s = vae.module.spatial_compression
    clip = world.render(world.sample_scene(np.random.default_rng(3), 2), frames=9)       # [9, 64, 64, 3] uint8
    z = ZoetropeVAEEncode().encode(vae, torch.from_numpy(clip).float() / 255)[0]
    h, w = z["samples"].shape[-2:]
    whole = ZoetropeVAEDecode().decode(vae, z)[0]
    # a tile as large as the frame is the whole decode, exactly
    same = ZoetropeVAEDecode().decode(vae, z, tile_size=h * s, overlap=4 * s)[0]
    assert torch.equal(same, whole)

    seen = []
    decode = type(vae.module).decode
    monkeypatch.setattr(type(vae.module), "decode",
                        lambda self, z, callback=None: seen.append(z.shape[-2:]) or decode(self, z, callback))
    tiled = ZoetropeVAEDecode().decode(vae, z, tile_size=h // 2 * s, overlap=h // 4 * s)[0]
    assert len(seen) == 9 and all(th <= h // 2 and tw <= w // 2 for th, tw in seen)    # peak memory follows the tile
    diff = (tiled - whole).abs()
    print(f"\ntiled vs whole decode (0..1 frames): max {diff.max():.4f}, mean {diff.mean():.5f}")
    assert tiled.shape == whole.shape
    assert diff.mean() < 0.01 and diff.max() < 0.4


def test_tile_layout_covers_with_overlap():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] + 16 == 40
    assert all(b - a <= 12 for a, b in zip(starts, starts[1:]))            # neighbours share at least 4


def test_encode_trims_to_4k_plus_1_frames_and_logs_it(models, caplog):
    _, _, vae = models
    with caplog.at_level(logging.WARNING, logger="zoetrope"):
        z = ZoetropeVAEEncode().encode(vae, torch.rand(7, 32, 32, 3))[0]["samples"]
    assert z.shape == (1, vae.module.z_dim, 2, 32 // vae.module.spatial_compression,
                       32 // vae.module.spatial_compression)
    assert "7 frames -> 5" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Save


def test_save_writes_mp4_with_prompt_and_workflow_tags(output_dir):
    from zoetrope.pipeline.video_io import read_tags, read_video
    frames = torch.rand(9, 32, 48, 3)
    prompt = {"1": {"class_type": "ZoetropeSaveVideo", "inputs": {"text": "ünïcode \"quoted\"\nline"}}}
    workflow = {"nodes": [{"id": 1, "type": "Note", "widgets_values": ["a = b; c\\d"]}], "links": []}
    ui = ZoetropeSaveVideo().save(frames, 8.0, "mp4", 19, "videos/clip", prompt, {"workflow": workflow})["ui"]
    assert ui["animated"] == (True,)
    (item,) = ui["images"]
    assert item["subfolder"] == "videos" and item["type"] == "output"
    path = output_dir / "videos" / item["filename"]
    assert path.name == "clip_00001_.mp4" and path.is_file()
    tags = read_tags(path)
    assert json.loads(tags["workflow"]) == workflow and json.loads(tags["prompt"]) == prompt
    video = read_video(path)
    assert video.shape == (9, 32, 48, 3)


def test_save_without_imageio_ffmpeg_says_how_to_install_it_and_leaves_no_file(output_dir, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)      # as in a ComfyUI without our requirements
    with pytest.raises(ImportError, match="pip install -r requirements.txt"):
        ZoetropeSaveVideo().save(torch.rand(5, 16, 16, 3), 8.0, "mp4", 19, "clip")
    assert list(output_dir.rglob("*")) == []
    ui = ZoetropeSaveVideo().save(torch.rand(5, 16, 16, 3), 8.0, "gif", 19, "clip")["ui"]     # Pillow's formats work
    assert (output_dir / ui["images"][0]["filename"]).is_file()


@pytest.mark.parametrize("fmt", ["webm", "webp", "gif"])
def test_save_other_formats(output_dir, fmt):
    from zoetrope.pipeline.video_io import read_video
    ui = ZoetropeSaveVideo().save(torch.rand(5, 16, 16, 3), 8.0, fmt, 30, "clip")["ui"]
    path = output_dir / ui["images"][0]["filename"]
    assert path.suffix == f".{fmt}" and read_video(path).shape[0] == 5


def test_save_never_overwrites_and_counts_on(output_dir):
    frames = torch.rand(5, 16, 16, 3)
    (output_dir).mkdir(parents=True)
    (output_dir / "clip_00007_.mp4").write_bytes(b"precious")
    names = [ZoetropeSaveVideo().save(frames, 8.0, "mp4", 19, "clip")["ui"]["images"][0]["filename"]
             for _ in range(2)]
    assert names == ["clip_00008_.mp4", "clip_00009_.mp4"]
    assert (output_dir / "clip_00007_.mp4").read_bytes() == b"precious"


def test_save_never_overwrites_a_file_in_the_counters_way(output_dir, monkeypatch):
    frames = torch.rand(5, 16, 16, 3)
    output_dir.mkdir(parents=True)
    # a file the counter does not see (another program wrote it meanwhile) is still not overwritten
    monkeypatch.setattr(host, "standalone_save_path", lambda prefix, out: (out, "clip", 1, ""))
    (output_dir / "clip_00001_.mp4").write_bytes(b"precious")
    name = ZoetropeSaveVideo().save(frames, 8.0, "mp4", 19, "clip")["ui"]["images"][0]["filename"]
    assert name != "clip_00001_.mp4" and (output_dir / name).is_file()
    assert (output_dir / "clip_00001_.mp4").read_bytes() == b"precious"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/escape", "videos/"])
def test_save_refuses_prefixes_outside_the_output_folder(output_dir, prefix):
    with pytest.raises(ValueError, match="output folder|names no file"):
        ZoetropeSaveVideo().save(torch.rand(5, 16, 16, 3), 8.0, "mp4", 19, prefix)
    assert not (output_dir.parent / "escape_00001_.mp4").exists()


def test_save_checks_crf_for_h264(output_dir):
    with pytest.raises(ValueError, match="0-51"):
        ZoetropeSaveVideo().save(torch.rand(5, 16, 16, 3), 8.0, "mp4", 60, "clip")


# ---------------------------------------------------------------------------------------------------------------
# Inside ComfyUI: the host adapter against stand-ins of ComfyUI's modules


class InterruptProcessingException(Exception):
    pass


@pytest.fixture
def fake_comfyui(tmp_path, monkeypatch):
    """Stand-ins of the ComfyUI modules the host adapter uses, recording what it asks of them."""
    calls = {"progress": [], "saved_paths": [], "cache": 0, "interrupt_after": None, "checks": 0}
    out = tmp_path / "comfy_output"
    out.mkdir()

    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda folder: [f"{folder}_file.safetensors"]
    fp.get_output_directory = lambda: str(out)

    def get_save_image_path(prefix, output_dir, w, h):
        calls["saved_paths"].append(prefix)
        folder = Path(output_dir) / Path(prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder), Path(prefix).name, 1, str(Path(prefix).parent).strip("."), prefix
    fp.get_save_image_path = get_save_image_path

    mm = types.ModuleType("comfy.model_management")

    def throw():
        calls["checks"] += 1
        if calls["interrupt_after"] is not None and calls["checks"] > calls["interrupt_after"]:
            raise InterruptProcessingException()
    mm.throw_exception_if_processing_interrupted = throw
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda: calls.__setitem__("cache", calls["cache"] + 1)
    mm.free_memory = lambda n, d: None

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["progress"].append((value, total, preview))
    utils.ProgressBar = ProgressBar

    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False, preview_size=256)
    comfy = types.ModuleType("comfy")
    for name, module in (("folder_paths", fp), ("comfy", comfy), ("comfy.model_management", mm),
                         ("comfy.utils", utils), ("comfy.cli_args", cli_args)):
        monkeypatch.setitem(sys.modules, name, module)
    comfy.model_management, comfy.utils, comfy.cli_args = mm, utils, cli_args
    host.configure(standalone=False)
    yield calls, out, cli_args.args


def test_in_comfyui_progress_has_a_preview_per_step(models, fake_comfyui):
    calls, _, _ = fake_comfyui
    assert host.in_comfyui()
    assert ZoetropeModelLoader.INPUT_TYPES()["required"]["model_name"][0] == [
        "builtin", "diffusion_models_file.safetensors"]
    run_chain(models, steps=3)
    steps = [c for c in calls["progress"] if c[1] == 3]
    assert [c[0] for c in steps] == [1, 2, 3]
    kind, image, size = steps[0][2]
    assert kind == "JPEG" and size == 256 and min(image.size) >= 64


def test_in_comfyui_cancel_raises_comfyuis_exception_unchanged(models, fake_comfyui):
    calls, _, _ = fake_comfyui
    calls["interrupt_after"] = 2
    with pytest.raises(InterruptProcessingException):
        run_chain(models, steps=10)
    assert calls["checks"] == 3          # step 1: before each of its 2 passes and at its end


def test_in_comfyui_save_uses_its_output_folder_and_metadata_switch(fake_comfyui):
    from zoetrope.pipeline.video_io import read_tags
    calls, out, args = fake_comfyui
    frames = torch.rand(5, 16, 16, 3)
    ui = ZoetropeSaveVideo().save(frames, 8.0, "mp4", 19, "sub/clip", {"1": {}}, {"workflow": {"nodes": []}})["ui"]
    path = out / "sub" / ui["images"][0]["filename"]
    assert calls["saved_paths"] == ["sub/clip"] and "workflow" in read_tags(path)
    args.disable_metadata = True
    ui = ZoetropeSaveVideo().save(frames, 8.0, "mp4", 19, "sub/clip", {"1": {}}, {"workflow": {"nodes": []}})["ui"]
    assert "workflow" not in read_tags(out / "sub" / ui["images"][0]["filename"])
