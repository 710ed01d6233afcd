"""Shared fixtures: the built-in model's files (the shipped ones, or random-weight stand-ins of the same configs)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory):
    """The folder holding the built-in model's three files: pipeline/builtin when they exist, else random-weight
    files of the same architectures, exported the way training exports them (so the tests run before training)."""
    from zoetrope.pipeline import builtin
    if builtin.available():
        return builtin.FOLDER
    from dataclasses import replace

    import torch
    from zoetrope.pipeline.dit import WanModel
    from zoetrope.pipeline.text_encoder import TextEncoder, UMT5Encoder
    from zoetrope.pipeline.tokenizer import Tokenizer
    from zoetrope.pipeline.vae import WanVAE
    from zoetrope.pipeline.world import train

    out = tmp_path_factory.mktemp("builtin")
    torch.manual_seed(0)
    spiece = train.train_tokenizer(out, 0, train.TEXT_CONFIG.vocab_size)
    z = train.VAE_CONFIG.z_dim
    # Latent statistics that are not the identity, so a missing (de)normalisation shows.
    vae = WanVAE(replace(train.VAE_CONFIG, latents_mean=tuple(0.1 * (i % 5) - 0.2 for i in range(z)),
                         latents_std=tuple(0.5 + 0.1 * (i % 7) for i in range(z))))
    dit = WanModel(train.DIT_CONFIG)
    te = TextEncoder(UMT5Encoder(train.TEXT_CONFIG), Tokenizer.from_bytes(spiece))
    train.export(out, vae, dit, te, train.TEXT_CONFIG, spiece)
    return out


@pytest.fixture
def builtin_model(builtin_model_dir, monkeypatch):
    """Point the 'builtin' choice of the loaders at builtin_model_dir for one test."""
    from zoetrope.pipeline import builtin
    for name in ("TRANSFORMER", "VAE", "TEXT_ENCODER"):
        monkeypatch.setattr(builtin, name, builtin_model_dir / getattr(builtin, name).name)
    monkeypatch.setattr(builtin, "FOLDER", builtin_model_dir)
    return builtin_model_dir


@pytest.fixture(scope="session")
def tiny_wan_models(tmp_path_factory, builtin_model_dir):
    """A models folder (diffusion_models/, text_encoders/, vae/) with tiny random-weight Wan 2.1 T2V 1.3B and
    Wan 2.2 TI2V 5B stand-ins under the real file names: the official layouts and the real VAE geometry (8x and
    16x spatial, 4x temporal, 16 and 48 channels with the released latent statistics), at a few thousand
    parameters. Their `zoetrope.config` metadata names the family and the sizes that shapes cannot tell."""
    from dataclasses import replace

    import torch
    from safetensors.torch import save_file
    from zoetrope.pipeline.checkpoints import config_metadata
    from zoetrope.pipeline.config import WAN21_VAE, WAN22_VAE, DiTConfig, TextEncoderConfig
    from zoetrope.pipeline.dit import WanModel
    from zoetrope.pipeline.text_encoder import UMT5Encoder
    from zoetrope.pipeline.vae import WanVAE

    def save(module, path, config, family, name):
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in module.state_dict().items()}
        if isinstance(module, UMT5Encoder):
            # the built-in model's SentencePiece model: a real tokenizer without training one here
            sd["spiece_model"] = _spiece_from(builtin_model_dir)
        save_file(sd, str(path), metadata=config_metadata(config, family=family, name=name))

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    te = TextEncoderConfig(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2,
                           num_buckets=32, max_distance=64)
    files = {"text_encoder": root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
    save(UMT5Encoder(te), files["text_encoder"], te, "wan2.1", "umT5-XXL encoder (tiny stand-in)")
    for family, released, model, vae, extra in (
            ("wan2.1", WAN21_VAE, "wan2.1_t2v_1.3B_fp16.safetensors", "wan_2.1_vae.safetensors", {}),
            ("wan2.2", WAN22_VAE, "wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors",
             dict(patch_size=2, residual=True))):
        vc = replace(released, dim=8, dec_dim=8, num_res_blocks=1, **extra)
        dc = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=vc.z_dim, out_dim=vc.z_dim,
                       text_dim=te.dim, text_len=16)
        files[f"{family}_vae"] = root / "vae" / vae
        files[f"{family}_model"] = root / "diffusion_models" / model
        save(WanVAE(vc), files[f"{family}_vae"], vc, family, f"{family} VAE (tiny stand-in)")
        save(WanModel(dc), files[f"{family}_model"], dc, family, f"{model} (tiny stand-in)")
    files["root"] = root
    return files


def _spiece_from(folder):
    from safetensors import safe_open
    with safe_open(str(folder / "zoetrope_builtin_text_encoder.safetensors"), "pt") as f:
        return f.get_tensor("spiece_model").clone()


@pytest.fixture
def quiet_host(monkeypatch):
    """The standalone host as a test found it (restored afterwards), quiet, on one thread: tiny models run
    fastest single-threaded, and a 2-core machine shared with other work stalls on two."""
    import dataclasses

    import torch
    from zoetrope.nodes import host
    saved = dataclasses.replace(host._standalone)
    monkeypatch.setenv("ZOETROPE_QUIET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    host._standalone = saved


def write_start_images(folder):
    """The start images the example workflows load (LoadImage): a blue square on a white background, 64x64."""
    import json
    from pathlib import Path

    from PIL import Image, ImageDraw
    for path in sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.new("RGB", (64, 64), (235, 235, 235))
                ImageDraw.Draw(image).rectangle((20, 20, 42, 42), fill=(40, 90, 230))
                image.save(folder / node["widgets_values"][0])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc, log, seconds: float) -> None:
    """Until `url`/system_stats answers; fails with the end of the server's log if it exits or stays silent."""
    import time
    import urllib.request
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/system_stats", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server at {url} did not answer within {seconds} s:\n{log.read_text()[-4000:]}")


def stop_server(proc) -> None:
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server_tools():
    """free_port, wait_for_server and stop_server, for test modules that start a server of their own."""
    from types import SimpleNamespace
    return SimpleNamespace(free_port=free_port, wait_for=wait_for_server, stop=stop_server)


@pytest.fixture(scope="session")
def start_images():
    return write_start_images


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory, tiny_wan_models):
    """A real ComfyUI (a checkout in COMFYUI_DIR, run by COMFYUI_PYTHON or this Python) on the CPU, with a scratch
    base directory holding this pack (a link to the checkout), the tiny Wan stand-ins under their real names and
    the workflows' start images. Yields (url, base directory, log path); skipped without COMFYUI_DIR."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    checkout = os.environ.get("COMFYUI_DIR")
    if not checkout or not (Path(checkout) / "main.py").is_file():
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run the tests against a real ComfyUI")
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "zoetrope").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    for kind in ("diffusion_models", "text_encoders", "vae"):
        shutil.copytree(tiny_wan_models["root"] / kind, base / "models" / kind)
    write_start_images(base / "input")
    port = free_port()
    log = base / "comfyui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
             str(port), "--base-directory", str(base), "--disable-auto-launch"],
            cwd=checkout, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, log, 600)
        yield url, base, log
    finally:
        stop_server(proc)
