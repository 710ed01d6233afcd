"""Checkpoint reading, detection, loading and `zoetrope inspect`.

Every file is written here, to tmp_path, from tiny random-weight models: a Wan transformer with 128-channel
heads (so its shapes alone tell its head count, as for the released models), a Wan 2.1-topology VAE with
16 latent channels and a 2-layer umT5. The official <-> diffusers renames used to write the files are
diffusers' own converters, and the reference outputs come from diffusers / transformers models holding the
same weights. Detection at the real sizes runs on fake headers built from the layout manifests in
fixtures/layouts (names, shapes, dtypes; no data).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece
import torch
from safetensors.torch import save_file

from zoetrope.pipeline import load_text_encoder, load_transformer, load_vae, ops
from zoetrope.pipeline.checkpoints import (CheckpointError, Header, TensorMeta, config_metadata, detect, read_header,
                                           read_state_dict, resolve_dtype)
from zoetrope.pipeline.config import UMT5_XXL, WAN21_VAE, WAN22_VAE, DiTConfig, VAEConfig
from zoetrope.pipeline.dit import WanModel
from zoetrope.pipeline.inspect_cli import main as inspect_main
from zoetrope.pipeline.vae import WanVAE

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (convert_wan_transformer_to_diffusers,  # noqa: E402
                                                 convert_wan_vae_to_diffusers)

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
FP8 = torch.float8_e4m3fn

TINY_DIT = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32, text_dim=32)
TINY_VAE = VAEConfig(dim=8, dec_dim=8, z_dim=16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def randomised(state_dict: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor drawn afresh (gains, biases and modulation tables too) at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state_dict.items():
        r = torch.randn(t.shape, generator=g)
        if name.endswith("gamma") or (t.ndim == 1 and "norm" in name and name.endswith("weight")):
            out[name] = 1 + 0.2 * r
        elif t.ndim == 1 or "modulation" in name:
            out[name] = 0.2 * r
        else:
            out[name] = r / math.sqrt(math.prod(t.shape[1:]))
    return out


def save(state_dict: dict, path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    return path


def write_header_only(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], truncate: bool = False) -> Path:
    """A safetensors file written by hand from names, shapes and safetensors dtype codes: the header, then a
    sparse (unwritten) data section of the size the header declares."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "U8": 1}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset - (1 if truncate else 0))
    return path


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dit_pair():
    """(official-named random weights, diffusers WanTransformer3DModel holding the same weights)."""
    official = randomised(WanModel(TINY_DIT).state_dict(), seed=1)
    reference = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6).eval()
    reference.load_state_dict(convert_wan_transformer_to_diffusers(dict(official)), strict=True)
    return official, reference


def dit_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 4, 2, 4, 6, generator=g), torch.tensor([612.0]), [torch.randn(7, 32, generator=g)]


def run_dit(model) -> torch.Tensor:
    x, t, context = dit_inputs()
    with torch.no_grad():
        return model(x, t, context)


@pytest.fixture(scope="module")
def dit_reference_output(dit_pair):
    _, reference = dit_pair
    x, t, context = dit_inputs()
    padded = torch.zeros(1, 512, 32)
    padded[0, :7] = context[0]
    with torch.no_grad():
        return reference(x, t, padded).sample


@pytest.fixture(scope="module")
def vae_pair():
    official = randomised(WanVAE(TINY_VAE).state_dict(), seed=2)
    reference = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                           temperal_downsample=[False, True, True]).eval()
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(official)), strict=True)
    return official, reference


def latent() -> torch.Tensor:
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def spm_bytes() -> bytes:
    rng = random.Random(0)
    words = "a the red blue small large fox cat circle square moves left right over field sky water".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram", vocab_size=60, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def umt5():
    """A tiny transformers UMT5EncoderModel with every tensor random."""
    config = transformers.UMT5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1)
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in randomised(model.state_dict(), seed=4).items():
            model.state_dict()[name].copy_(p * (3 if "relative_attention_bias" in name or "shared" in name else 1))
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    # HF ties shared / embed_tokens to one tensor; files store two copies (safetensors refuses shared memory).
    return {k: v.clone() for k, v in model.state_dict().items()}


# Official Wan T5 names <- Hugging Face names (wan-notes 5.3), written out here rather than taken from our code.
_HF_TO_WAN = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
              "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
              "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
              "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
              "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}


def wan_t5_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in hf_state_dict(model).items():
        if k == "shared.weight":
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif k.startswith("encoder.block."):
            _, _, i, rest = k.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            out[f"blocks.{i}.{_HF_TO_WAN[module]}.weight"] = v
    return out


def umt5_reference(model, te, prompt: str) -> torch.Tensor:
    ids, mask = te.tokenizer([prompt])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[0, :int(mask.sum())]


# ------------------------------------------------------------------------------------ 1. detection of every layout

# manifest -> (a realistic file name, kind, family, variant or model name, ComfyUI folder, layout, loadable)
RELEASED = {
    "wan2.1_t2v_1.3B": ("wan2.1_t2v_1.3B_fp16.safetensors", "transformer", "wan2.1", "Wan 2.1 T2V 1.3B",
                        "diffusion_models", "official", True),
    "wan2.1_t2v_14B": ("wan2.1_t2v_14B_fp16.safetensors", "transformer", "wan2.1", "Wan 2.1 T2V 14B",
                       "diffusion_models", "official", True),
    "wan2.1_i2v_14B": ("wan2.1_i2v_480p_14B_fp16.safetensors", "transformer", "wan2.1", "Wan 2.1 I2V 14B",
                       "diffusion_models", "official", False),
    "wan2.2_t2v_A14B_expert": ("wan2.2_t2v_low_noise_14B_fp16.safetensors", "transformer", "wan2.2",
                               "Wan 2.2 A14B (one expert)", "diffusion_models", "official", True),
    "wan2.2_i2v_A14B_expert": ("wan2.2_i2v_high_noise_14B_fp16.safetensors", "transformer", "wan2.2",
                               "Wan 2.2 I2V A14B (one expert)", "diffusion_models", "official", True),
    "wan2.2_ti2v_5B": ("wan2.2_ti2v_5B_fp16.safetensors", "transformer", "wan2.2", "Wan 2.2 TI2V 5B",
                       "diffusion_models", "official", True),
    "diffusers_wan2.1_t2v_1.3B_transformer": ("Wan2.1-T2V-1.3B-Diffusers/transformer/diffusion_pytorch_model"
                                              ".safetensors", "transformer", "wan2.1", "Wan 2.1 T2V 1.3B",
                                              "diffusion_models", "diffusers", True),
    "wan2.1_vae": ("wan_2.1_vae.safetensors", "vae", "wan2.1", "Wan 2.1 VAE", "vae", "official", True),
    "wan2.2_vae": ("wan2.2_vae.safetensors", "vae", "wan2.2", "Wan 2.2 VAE", "vae", "official", True),
    "diffusers_wan2.1_vae": ("Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors", "vae", "wan2.1",
                             "Wan 2.1 VAE", "vae", "diffusers", True),
    "umt5_xxl_encoder_official": ("models_t5_umt5-xxl-enc-bf16.pth", "text_encoder", "wan2.1",
                                  "umT5-XXL encoder (Wan 2.1 and 2.2)", "text_encoders", "official", True),
    "umt5_xxl_encoder_hf": ("umt5_xxl_fp16.safetensors", "text_encoder", "wan2.1",
                            "umT5-XXL encoder (Wan 2.1 and 2.2)", "text_encoders", "hf", True),
}
# The released transformer sizes (dim, ffn, heads, layers, in, out), as the checkpoint-layouts README states them.
RELEASED_DIT = {"Wan 2.1 T2V 1.3B": (1536, 8960, 12, 30, 16, 16), "Wan 2.1 T2V 14B": (5120, 13824, 40, 40, 16, 16),
                "Wan 2.1 I2V 14B": (5120, 13824, 40, 40, 36, 16),
                "Wan 2.2 A14B (one expert)": (5120, 13824, 40, 40, 16, 16),
                "Wan 2.2 I2V A14B (one expert)": (5120, 13824, 40, 40, 36, 16),
                "Wan 2.2 TI2V 5B": (3072, 14336, 24, 30, 48, 48)}


def manifest_header(name: str, file_name: str | None = None, prefix: str = "", dtype: str | None = None) -> Header:
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    tensors = {prefix + k: TensorMeta(tuple(v["shape"]), dtype or v["dtype"]) for k, v in data["tensors"].items()}
    return Header(tensors, path=Path(file_name) if file_name else None)


def manifest_params(name: str) -> int:
    return json.loads((LAYOUTS / f"{name}.json").read_text())["num_params"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_detects_every_released_layout(name):
    file_name, kind, family, what, folder, layout, loadable = RELEASED[name]
    info = detect(manifest_header(name, file_name))
    assert (info.kind, info.family, info.folder, info.layout) == (kind, family, folder, layout)
    assert (info.variant.name if info.variant else info.name) == what
    assert (info.problem is None) == loadable and (info.loader is not None) == loadable
    assert info.precision == "fp32"
    # The HF manifest counts the tied embedding twice; a model has it once.
    assert info.num_params == manifest_params("umt5_xxl_encoder_official" if kind == "text_encoder" else name)
    if kind == "transformer":
        c = info.config
        assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.in_dim, c.out_dim) == RELEASED_DIT[what]
        assert c.image_embedding == (what == "Wan 2.1 I2V 14B")
    elif kind == "vae":
        assert info.config == {"wan2.1": WAN21_VAE, "wan2.2": WAN22_VAE}[family]
    else:
        assert info.config == UMT5_XXL


def test_comfyui_prefix_and_fp8_scaled_are_seen_through():
    header = manifest_header("wan2.1_t2v_14B", "wan2.1_t2v_14B_fp8_scaled.safetensors",
                             prefix="model.diffusion_model.")
    for name, meta in list(header.tensors.items()):
        if name.endswith(".weight") and len(meta.shape) == 2:
            header.tensors[name] = TensorMeta(meta.shape, "float8_e4m3fn")
            header.tensors[name.removesuffix(".weight") + ".scale_weight"] = TensorMeta((), "float32")
    header.tensors["model.diffusion_model.scaled_fp8"] = TensorMeta((0,), "float8_e4m3fn")
    info = detect(header)
    assert (info.kind, info.variant.name, info.layout, info.prefix) == (
        "transformer", "Wan 2.1 T2V 14B", "comfyui-prefixed", "model.diffusion_model.")
    assert info.precision == "fp8_e4m3fn scaled"
    assert info.num_params == manifest_params("wan2.1_t2v_14B")


def test_a14b_expert_without_a_telling_name_is_flagged_as_ambiguous():
    # Wan 2.2 A14B experts have exactly the tensors of Wan 2.1 T2V 14B: only a name can tell them apart.
    info = detect(manifest_header("wan2.2_t2v_A14B_expert", "model.safetensors"))
    assert info.variant.name == "Wan 2.1 T2V 14B"
    assert any("Wan 2.2 A14B" in note for note in info.notes)


# ------------------------------------------------------------------------------------------------ 2. round trips

def _shard(state_dict: dict, folder: Path) -> Path:
    names = sorted(state_dict)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save({k: state_dict[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _transformer_source(form: str, official: dict, tmp_path: Path):
    if form == "official":
        return save(official, tmp_path / "wan_tiny.safetensors")
    if form == "comfyui-prefixed":
        return save({f"model.diffusion_model.{k}": v for k, v in official.items()}, tmp_path / "wan_tiny.safetensors")
    if form == "diffusers-folder":
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        save(convert_wan_transformer_to_diffusers(dict(official)),
             tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
        return tmp_path
    if form == "sharded-index":
        return _shard(official, tmp_path)
    if form == "pth":
        torch.save(official, tmp_path / "wan_tiny.pth")
        return tmp_path / "wan_tiny.pth"
    if form == "state-dict":
        return dict(official)
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["official", "comfyui-prefixed", "diffusers-folder", "sharded-index", "pth",
                                  "state-dict"])
def test_transformer_round_trips(form, dit_pair, dit_reference_output, tmp_path):
    official, _ = dit_pair
    model = load_transformer(_transformer_source(form, official, tmp_path))
    assert isinstance(model, WanModel) and not model.training
    assert model.config == TINY_DIT and model.info.kind == "transformer"
    assert model.info.layout == {"diffusers-folder": "diffusers", "comfyui-prefixed": "comfyui-prefixed"}.get(
        form, "official")
    expected = WanModel(TINY_DIT).eval()
    expected.load_state_dict(official)
    out = run_dit(model)
    # The same fp32 weights whatever the file's form (up to summation order: mapped data may be unaligned).
    assert rel_err(out, run_dit(expected)) < 1e-6
    err = rel_err(out, dit_reference_output)
    print(f"{form}: loaded transformer vs diffusers max relative error {err:.2e}")
    assert err < 1e-4


def test_safetensors_weights_stay_memory_mapped(dit_pair, tmp_path):
    official, _ = dit_pair
    path = save(official, tmp_path / "wan_tiny.safetensors")
    model = load_transformer(path)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc to see memory mappings")
    mapped = [tuple(int(a, 16) for a in line.split()[0].split("-"))
              for line in maps.read_text().splitlines() if line.endswith(str(path))]
    # Every weight lies inside the mapping of the file: nothing was copied into fresh memory.
    assert mapped and all(any(a <= p.data_ptr() < b for a, b in mapped) for p in model.parameters())


@pytest.mark.parametrize("form", ["comfyui", "official-pth", "diffusers-folder"])
def test_vae_round_trips(form, vae_pair, tmp_path):
    official, reference = vae_pair
    if form == "comfyui":
        source = save(official, tmp_path / "wan_tiny_vae.safetensors")
    elif form == "official-pth":
        torch.save(official, tmp_path / "Wan2.1_VAE.pth")
        source = tmp_path / "Wan2.1_VAE.pth"
    else:
        (tmp_path / "model_index.json").write_text("{}")
        save(convert_wan_vae_to_diffusers(dict(official)), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
        source = tmp_path
    vae = load_vae(source)
    assert isinstance(vae, WanVAE) and vae.info.kind == "vae"
    # a custom-sized VAE with 16 latent channels gets the Wan 2.1 latent statistics
    assert vae.config.latents_mean == WAN21_VAE.latents_mean and vae.config.latents_std == WAN21_VAE.latents_std
    assert vae.config == VAEConfig(dim=8, dec_dim=8, z_dim=16, latents_mean=WAN21_VAE.latents_mean,
                                   latents_std=WAN21_VAE.latents_std)
    with torch.no_grad():
        got, expected = vae.decode(latent()), reference.decode(latent()).sample
    err = rel_err(got, expected)
    print(f"{form}: loaded VAE decode vs diffusers max relative error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("form", ["comfyui", "official-pth", "diffusers-folder"])
def test_text_encoder_round_trips(form, umt5, spm_bytes, tmp_path):
    if form == "comfyui":  # HF names plus the SentencePiece model as a uint8 tensor
        sd = hf_state_dict(umt5)
        sd["spiece_model"] = torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)
        source = save(sd, tmp_path / "umt5_tiny.safetensors")
    elif form == "official-pth":  # Wan names, tokenizer in google/umt5-xxl/ beside the weights
        torch.save(wan_t5_state_dict(umt5), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
        (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
        (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spm_bytes)
        source = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    else:  # diffusers pipeline: text_encoder/ and tokenizer/ side by side
        (tmp_path / "model_index.json").write_text("{}")
        save(hf_state_dict(umt5), tmp_path / "text_encoder" / "model.safetensors")
        (tmp_path / "tokenizer").mkdir()
        (tmp_path / "tokenizer" / "spiece.model").write_bytes(spm_bytes)
        source = tmp_path
    te = load_text_encoder(source)
    assert te.info.kind == "text_encoder" and te.info.layout == ("official" if form == "official-pth" else "hf")
    prompt = "a small red fox moves left over the water"
    got = te.encode([prompt])[0]
    err = rel_err(got, umt5_reference(umt5, te, prompt))
    print(f"{form}: loaded text encoder vs transformers max relative error {err:.2e}")
    assert err < 1e-5


def test_official_folder_gives_each_loader_its_own_file(dit_pair, vae_pair, umt5, spm_bytes, tmp_path):
    # The official Wan folder keeps the transformer, the VAE and umT5 side by side.
    save(dit_pair[0], tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(vae_pair[0], tmp_path / "Wan2.1_VAE.pth")
    torch.save(wan_t5_state_dict(umt5), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spm_bytes)
    assert load_transformer(tmp_path).info.path.endswith("diffusion_pytorch_model.safetensors")
    assert load_vae(tmp_path).info.path.endswith("Wan2.1_VAE.pth")
    assert load_text_encoder(tmp_path).info.path.endswith("models_t5_umt5-xxl-enc-bf16.pth")


def test_dtype_defaults_to_the_files_precision_on_a_gpu_and_fp32_on_a_cpu(dit_pair, tmp_path, monkeypatch):
    half = {k: v.to(torch.bfloat16) for k, v in dit_pair[0].items()}
    path = save(half, tmp_path / "wan_bf16.safetensors")
    model = load_transformer(path)                                 # on the CPU
    assert model.info.precision == "bf16" and model.blocks[0].ffn[0].weight.dtype == torch.float32
    model = load_transformer(path, dtype=torch.bfloat16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert read_state_dict(path)["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    # On a GPU (decided before anything is placed): the file's half precision, bf16 for fp32 files; on a GPU
    # without hardware bf16 (RTX 20xx, T4, where torch emulates it several times slower) fp16 instead.
    gpu = torch.device("cuda")
    for native, table in ((True, (("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                  ("float32", torch.bfloat16))),
                          (False, (("bfloat16", torch.float16), ("float16", torch.float16),
                                   ("float32", torch.float16)))):
        monkeypatch.setattr(ops, "bf16_native", lambda device, native=native: native)
        for stored, expected in table:
            info = dataclasses.replace(model.info, dtype=stored)
            assert resolve_dtype(None, info, gpu) == expected, (native, stored)
            assert resolve_dtype(None, info, torch.device("cpu")) == torch.float32
            assert resolve_dtype("fp16", info, torch.device("cpu")) == torch.float16


def test_custom_sizes_take_their_head_count_from_metadata(tmp_path):
    # dim 96 is no multiple of 128: the head count must come from the file's zoetrope.config metadata.
    config = DiTConfig(dim=96, ffn_dim=64, num_heads=3, num_layers=1, in_dim=4, out_dim=4, freq_dim=32, text_dim=32)
    sd = randomised(WanModel(config).state_dict(), seed=6)
    with pytest.raises(CheckpointError, match="num_heads") as e:
        load_transformer(save(sd, tmp_path / "no_meta.safetensors"))
    assert "no_meta.safetensors" in str(e.value) and "metadata" in str(e.value)
    path = save(sd, tmp_path / "builtin.safetensors", metadata=config_metadata(config, family="builtin", fps=8))
    model = load_transformer(path)
    assert model.config == config and model.info.family == "builtin" and model.info.settings == {"fps": 8}
    # the family may also travel as its own metadata entry beside the config JSON
    metadata = {"zoetrope.config": json.dumps(dataclasses.asdict(config)), "zoetrope.family": "builtin"}
    info = detect(save(sd, tmp_path / "builtin2.safetensors", metadata=metadata))
    assert info.family == "builtin" and info.config == config and info.variant is None and info.loader


# ------------------------------------------------------------------------------------------------------- 3. fp8

def quantise(state_dict: dict, form: str) -> tuple[dict, dict, dict]:
    """(file tensors, file metadata, the dequantised fp32 weights) with every Linear weight (2-D) stored fp8."""
    stored, dequantised, metadata = {}, {}, {}
    for name, w in state_dict.items():
        base = name.removesuffix(".weight")
        if not (name.endswith(".weight") and w.ndim == 2):
            stored[name] = dequantised[name] = w
        elif form == "plain":
            stored[name] = w.to(FP8)
            dequantised[name] = stored[name].float()
        else:
            scale = w.abs().max() / torch.finfo(FP8).max
            stored[name] = (w / scale).to(FP8)
            dequantised[name] = stored[name].float() * scale
            if form == "scaled":            # legacy ComfyUI: marker + scale_weight (+ scale_input, unused)
                stored[f"{base}.scale_weight"] = scale.reshape(())
                stored[f"{base}.scale_input"] = torch.tensor(1.0)
            else:                           # newer ComfyUI: weight_scale + per-layer format JSON
                stored[f"{base}.weight_scale"] = scale.reshape(())
                quant = {"format": "float8_e4m3fn"}
                if form == "comfy_quant":
                    stored[f"{base}.comfy_quant"] = torch.tensor(list(json.dumps(quant).encode()), dtype=torch.uint8)
                else:
                    metadata.setdefault("layers", {})[base] = quant
    if form == "plain":                     # a non-Linear fp8 tensor: up-cast on load
        stored["patch_embedding.weight"] = state_dict["patch_embedding.weight"].to(FP8)
        dequantised["patch_embedding.weight"] = stored["patch_embedding.weight"].float()
    if form == "scaled":
        stored["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return stored, {"_quantization_metadata": json.dumps(metadata)} if metadata else None, dequantised


@pytest.mark.parametrize("form", ["plain", "scaled", "comfy_quant", "quantization_metadata"])
def test_fp8_files_stay_fp8_and_match_full_precision_within_fp8_rounding(form, dit_pair, tmp_path):
    official, _ = dit_pair
    stored, metadata, dequantised = quantise(official, form)
    model = load_transformer(save(stored, tmp_path / f"wan_{form}.safetensors", metadata), dtype=torch.float32)
    assert model.info.precision == "fp8_e4m3fn" + ("" if form == "plain" else " scaled")
    for layer in (model.blocks[1].ffn[0], model.blocks[0].self_attn.q, model.head.head, model.time_projection[1]):
        assert isinstance(layer, ops.Linear) and layer.weight.dtype == FP8
        assert (layer.weight_scale is None) == (form == "plain")
        assert layer.bias.dtype == torch.float32
    assert model.patch_embedding.weight.dtype == torch.float32   # fp8 only where ops.Linear up-casts on the fly
    assert model.blocks[0].norm3.weight.dtype == torch.float32

    # Each weight as the model will use it is the original rounded to e4m3 (3 mantissa bits, round to nearest):
    # off by at most 2^-4 of itself in the normal range, by at most half the subnormal step 2^-9 below 2^-6
    # (both in units of the layer's scale), plus fp32 rounding of the scaling itself.
    linear = 0
    for name, layer in model.named_modules():
        if isinstance(layer, ops.Linear):
            w = official[f"{name}.weight"]
            scale = 1.0 if layer.weight_scale is None else layer.weight_scale.item()
            bound = 2 ** -4 * w.abs() + 2 ** -10 * scale + 1e-6 * w.abs()
            assert ((layer.compute_weight(torch.float32) - w).abs() <= bound).all(), name
            linear += 1
    assert linear == 2 * 10 + 5 + 1  # per block: 2 x attention q/k/v/o, FFN in/out; embeddings; head
    if form == "plain":
        assert torch.equal(model.patch_embedding.weight, official["patch_embedding.weight"].to(FP8).float())

    exact = WanModel(TINY_DIT).eval()
    exact.load_state_dict(dequantised)
    full = WanModel(TINY_DIT).eval()
    full.load_state_dict(official)
    out = run_dit(model)
    assert rel_err(out, run_dit(exact)) < 1e-6    # the loader adds nothing to the fp8 rounding itself
    err = rel_err(out, run_dit(full))
    print(f"{form}: fp8 vs full precision max relative error {err:.3e}")
    # End to end the weight errors of ~20 layers meet in a short chain (2 blocks + head) of roughly norm-
    # preserving random layers; independent roundings partly cancel, partly compound, and twice the worst
    # single-weight error, 2^-3, covers the chain. A lost scale (x448), a transposed or unloaded layer fails it.
    assert 1e-4 < err < 2 ** -3


def test_fp8_with_half_precision_rest_computes_in_that_precision(dit_pair, tmp_path):
    stored, _, _ = quantise(dit_pair[0], "scaled")
    stored = {k: v.half() if v.dtype == torch.float32 and v.ndim > 0 else v for k, v in stored.items()}
    path = save(stored, tmp_path / "wan_fp8_scaled.safetensors")
    assert load_transformer(path).info.dtype == "float16"      # what a GPU computes in by default (fp32 on a CPU)
    model = load_transformer(path, dtype=torch.float16)
    assert model.blocks[0].ffn[0].weight.dtype == FP8 and model.blocks[0].ffn[0].bias.dtype == torch.float16
    assert model.blocks[0].modulation.dtype == torch.float32  # the module keeps its modulation tables in fp32
    assert torch.isfinite(run_dit(model)).all()


def test_comfyui_scaled_fp8_umt5_keeps_fp8_through_the_hf_rename(umt5, spm_bytes, tmp_path):
    # umt5_xxl_fp8_e4m3fn_scaled: HF names, fp8 Linear weights with scale_weight, the tokenizer inside.
    hf = hf_state_dict(umt5)
    linear = {k: v for k, v in hf.items() if v.ndim == 2 and "embed" not in k and "shared" not in k
              and "relative_attention_bias" not in k}
    stored, _, dequantised = quantise(linear, "scaled")
    stored.update({k: v for k, v in hf.items() if k not in linear})
    stored["spiece_model"] = torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)
    te = load_text_encoder(save(stored, tmp_path / "umt5_tiny_fp8_e4m3fn_scaled.safetensors"))
    q = te.encoder.blocks[1].attn.q
    assert q.weight.dtype == FP8 and q.weight_scale is not None and te.info.precision == "fp8_e4m3fn scaled"
    reference = transformers.UMT5EncoderModel(umt5.config).eval()
    reference.load_state_dict({**hf, **dequantised})
    prompt = "a blue square moves right"
    err = rel_err(te.encode([prompt])[0], umt5_reference(reference, te, prompt))
    print(f"scaled fp8 umT5 vs its dequantised transformers twin: max relative error {err:.2e}")
    assert err < 1e-5


def test_unsupported_quantisation_format_is_refused(dit_pair, tmp_path):
    stored, _, _ = quantise(dit_pair[0], "comfy_quant")
    stored["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    path = save(stored, tmp_path / "wan_nvfp4.safetensors")
    with pytest.raises(CheckpointError, match="nvfp4") as e:
        load_transformer(path)
    assert str(path) in str(e.value) and "fp8" in str(e.value)


# ------------------------------------------------------------------------------------------------ 4. bad input

@pytest.fixture
def files(dit_pair, vae_pair, umt5, spm_bytes, tmp_path):
    """One tiny file of each kind."""
    te = hf_state_dict(umt5)
    te["spiece_model"] = torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)
    return {"transformer": save(dit_pair[0], tmp_path / "wan_tiny.safetensors"),
            "vae": save(vae_pair[0], tmp_path / "wan_tiny_vae.safetensors"),
            "text_encoder": save(te, tmp_path / "umt5_tiny.safetensors")}


LOADER_FUNCTIONS = {"transformer": load_transformer, "vae": load_vae, "text_encoder": load_text_encoder}
LOADER_NAMES = {"transformer": "load_transformer", "vae": "load_vae", "text_encoder": "load_text_encoder"}
NODES = {"transformer": "ZoetropeModelLoader", "vae": "ZoetropeVAELoader", "text_encoder": "ZoetropeTextEncoderLoader"}


@pytest.mark.parametrize("actual,loader", [(a, b) for a in LOADER_FUNCTIONS for b in LOADER_FUNCTIONS if a != b])
def test_every_wrong_pairing_is_refused_before_building(actual, loader, files, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was built for a file that does not fit")

    for module, cls in (("dit", "WanModel"), ("vae", "WanVAE"), ("text_encoder", "UMT5Encoder")):
        monkeypatch.setattr(f"zoetrope.pipeline.{module}.{cls}", never)
    with pytest.raises(CheckpointError) as e:
        LOADER_FUNCTIONS[loader](files[actual])
    message = str(e.value)
    assert str(files[actual]) in message                     # names the file
    assert {"transformer": "transformer", "vae": "VAE", "text_encoder": "text encoder"}[actual] in message.split(
        ", not")[0]                                          # says what it is
    assert LOADER_NAMES[loader] in message                   # what was expected
    assert NODES[actual] in message and LOADER_NAMES[actual] in message  # what to do


def _bytes_of(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[:keep])
    return out


@pytest.mark.parametrize("case", ["data cut short", "header cut short", "empty", "not safetensors"])
def test_damaged_files_are_named_and_explained(case, files):
    good = files["transformer"]
    size = good.stat().st_size
    path = {"data cut short": lambda: _bytes_of(good, size - 1000),
            "header cut short": lambda: _bytes_of(good, 200),
            "empty": lambda: _bytes_of(good, 0),
            "not safetensors": lambda: good.with_name("notes.safetensors")}[case]()
    if case == "not safetensors":
        path.write_text("these are my notes, not a model")
    expected = {"data cut short": "truncated", "header cut short": "truncated", "empty": "empty",
                "not safetensors": "not a safetensors file"}[case]
    for attempt in (lambda: load_transformer(path), lambda: detect(path), lambda: read_state_dict(path)):
        with pytest.raises(CheckpointError, match=expected) as e:
            attempt()
        assert str(path) in str(e.value)
        assert "again" in str(e.value) or "right file" in str(e.value)   # what to do


def test_missing_file_and_unknown_content(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as e:
        load_vae(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(e.value)
    path = save({"encoder.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "mystery.safetensors")
    with pytest.raises(CheckpointError, match="unknown file") as e:
        load_transformer(path)
    assert "mystery.safetensors" in str(e.value) and "encoder.layers.0.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_transformer(save({}, tmp_path / "empty.safetensors"))


def test_lora_is_recognised_and_refused(tmp_path):
    lora = {f"diffusion_model.blocks.0.self_attn.q.lora_{ab}.weight": torch.zeros(4, 4) for ab in "AB"}
    path = save(lora, tmp_path / "wan_motion_lora.safetensors")
    info = detect(path)
    assert (info.kind, info.folder, info.loader) == ("lora", "loras", None)
    for load in LOADER_FUNCTIONS.values():
        with pytest.raises(CheckpointError, match="LoRA") as e:
            load(path)
        assert str(path) in str(e.value) and "full Wan model" in str(e.value)


@pytest.mark.parametrize("keys,what", [
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
      "first_stage_model.decoder.conv_in.weight"], "Stable Diffusion"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "model.diffusion_model.input_blocks.0.0.weight"], "image"),
])
def test_image_models_are_recognised_and_refused(keys, what, tmp_path):
    path = save({k: torch.zeros(2, 2) for k in keys}, tmp_path / "some_image_model.safetensors")
    assert detect(path).kind == "image-model"
    with pytest.raises(CheckpointError, match=what) as e:
        load_transformer(path)
    assert str(path) in str(e.value) and "not part of a Wan video model" in str(e.value)
    assert "core" in str(e.value)  # what to do instead


def test_wan21_i2v_clip_branch_is_refused(tmp_path):
    config = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, in_dim=36, out_dim=4, freq_dim=32,
                       text_dim=32, image_embedding=True)
    path = save(randomised(WanModel(config).state_dict(), 7), tmp_path / "wan2.1_i2v_tiny.safetensors")
    info = detect(path)
    assert info.kind == "transformer" and info.config.image_embedding and info.loader is None
    with pytest.raises(CheckpointError, match="CLIP image branch") as e:
        load_transformer(path)
    assert str(path) in str(e.value) and "TI2V 5B" in str(e.value)


def test_vace_is_refused(dit_pair, tmp_path):
    sd = dict(dit_pair[0], **{"vace_blocks.0.before_proj.weight": torch.zeros(256, 256)})
    path = save(sd, tmp_path / "wan_vace.safetensors")
    with pytest.raises(CheckpointError, match="VACE") as e:
        load_transformer(path)
    assert str(path) in str(e.value) and "plain Wan" in str(e.value)


def test_plain_t5_is_not_taken_for_umt5(umt5, tmp_path):
    sd = {k: v for k, v in hf_state_dict(umt5).items() if "relative_attention_bias" not in k or ".block.0." in k}
    path = save(sd, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="not umT5") as e:
        load_text_encoder(path)
    assert str(path) in str(e.value) and "umt5_xxl" in str(e.value)


def test_text_encoder_without_tokenizer(umt5, tmp_path):
    path = save(hf_state_dict(umt5), tmp_path / "umt5_no_tokenizer.safetensors")
    with pytest.raises(CheckpointError, match="without its tokenizer") as e:
        load_text_encoder(path)
    assert str(path) in str(e.value) and "spiece.model" in str(e.value)


def test_incomplete_file_names_what_is_missing(dit_pair, tmp_path):
    sd = {k: v for k, v in dit_pair[0].items() if k != "blocks.1.ffn.2.bias"}
    path = save(sd, tmp_path / "wan_incomplete.safetensors")
    with pytest.raises(CheckpointError, match="1 missing") as e:
        load_transformer(path)
    assert "blocks.1.ffn.2.bias" in str(e.value) and str(path) in str(e.value)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused_without_running(container, tmp_path):
    marker = tmp_path / "the_payload_ran"
    path = tmp_path / "Wan2.1_VAE.pth"
    payload = {"encoder.conv1.weight": torch.zeros(1), "x": _Payload(marker)}
    # the zip container (torch >= 1.6) and the older plain pickle stream that old .pth files use
    torch.save(payload, path, _use_new_zipfile_serialization=container == "zip")
    for attempt in (lambda: load_vae(path), lambda: detect(path)):
        with pytest.raises(CheckpointError, match="refused") as e:
            attempt()
        assert str(path) in str(e.value) and "safetensors" in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def test_folder_with_several_models_needs_a_choice(files):
    folder = files["transformer"].parent
    with pytest.raises(CheckpointError, match="several weight files"):
        read_header(folder)
    assert load_vae(folder).info.path == str(files["vae"])  # a loader knows which kind it wants


# ------------------------------------------------------------------------------------------------- 5. inspect

def test_inspect_reads_only_the_header_of_a_big_file(tmp_path, capsys):
    # A Wan 2.1 T2V 1.3B fp16 file at full size (2.8 GB, sparse: the data is never written or read).
    manifest = json.loads((LAYOUTS / "wan2.1_t2v_1.3B.json").read_text())["tensors"]
    path = write_header_only(tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors",
                             {k: (tuple(v["shape"]), "F16") for k, v in manifest.items()})
    start = time.perf_counter()
    status = inspect_main([str(path)])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(out, f"inspect took {seconds:.3f} s")
    assert status == 0 and seconds < 0.5
    for fact in ("Wan 2.1 T2V 1.3B", "wan2.1", "text-to-video", "1.42 B parameters", "2.84 GB", "fp16", "official",
                 "models/diffusion_models", "ZoetropeModelLoader / zoetrope.pipeline.load_transformer",
                 "50 steps, cfg 6.0, shift 8.0"):
        assert fact in out, fact
    # Header-only for real: a fresh interpreter answers without even importing torch.
    probe = ("import sys; from zoetrope.pipeline.inspect_cli import main; status = main(sys.argv[1:]); "
             "sys.exit(status or 3 * ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_inspect_small_files_and_json(files, capsys):
    assert inspect_main([str(files["vae"]), str(files["text_encoder"])]) == 0
    out = capsys.readouterr().out
    assert "models/vae" in out and "ZoetropeVAELoader" in out and "z 16" in out
    assert "models/text_encoders" in out and "ZoetropeTextEncoderLoader" in out and "hf" in out
    assert inspect_main(["--json", str(files["transformer"])]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["kind"] == "transformer" and fields["family"] == "custom" and fields["precision"] == "fp32"


def test_inspect_bad_files_exit_2_with_the_loaders_message(tmp_path, capsys):
    lora = save({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "l.safetensors")
    truncated = write_header_only(tmp_path / "cut.safetensors", {"patch_embedding.weight": ((8, 4, 1, 2, 2), "F16")},
                                  truncate=True)
    assert inspect_main([str(lora)]) == 2
    captured = capsys.readouterr()
    assert "lora" in captured.out and "models/loras" in captured.out and "LoRA" in captured.err
    assert inspect_main([str(truncated)]) == 2
    assert "truncated" in capsys.readouterr().err
