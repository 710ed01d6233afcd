"""umT5 encoder and tokenizer against transformers' UMT5EncoderModel and T5Tokenizer.

Everything is built here: a tiny umT5 with random weights and a tiny SentencePiece unigram model trained on a
synthetic corpus (milliseconds), so nothing is downloaded. Layouts are checked at the real umT5-XXL size on the
meta device against the key manifests in fixtures/layouts.
"""
from __future__ import annotations

import html
import io
import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece
import torch

from zoetrope.pipeline import ops
from zoetrope.pipeline.config import UMT5_XXL, TextEncoderConfig
from zoetrope.pipeline.text_encoder import TextEncoder, UMT5Encoder, fp16_clamp, map_hf_keys
from zoetrope.pipeline.tokenizer import Tokenizer, clean_prompt

transformers = pytest.importorskip("transformers")

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
VOCAB = 200  # embedding rows of the tiny model; the tiny SentencePiece model has 150 pieces

PROMPTS = [
    "a red fox moves slowly across the field",
    "  Leading and trailing   spaces\tand\ttabs\nand newlines   ",
    "A small blue circle 🦊 rolls über the ✓✓ water, then spins!",
    "ＦＵＬＬ width and the ﬁ ligature and fish &amp; chips &lt;b&gt;",
    "",
    " ".join(["camera pans left"] * 250),  # beyond 512 tokens: truncated
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def official_clean(text: str) -> str:
    # The official Wan cleaning (wan/modules/tokenizers.py, clean='whitespace'), minus ftfy.
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------- fixtures

def _corpus() -> list[str]:
    rng = random.Random(0)
    syllables = "ka lo mi ne ru sa to vi be do fa gu hi jo pe zu wa".split()
    words = ("a the red blue green small large fox dog cat bird circle square triangle moves slowly quickly "
             "across over under field sky water camera pans left right up down light dark bright sun moon "
             "night day video frame shape rolls spins falls rises").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(60)]
    out = []
    for _ in range(400):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            s = s.capitalize()
        if rng.random() < 0.5:
            s += rng.choice([",", ".", "!", "?", "-", "0", "1", "2", "3", "9"])
        out.append(s)
    return out


@pytest.fixture(scope="module")
def spm_bytes() -> bytes:
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="unigram", vocab_size=150,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer_folder(spm_bytes, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("umt5-tokenizer")
    (folder / "spiece.model").write_bytes(spm_bytes)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_folder):
    # transformers 5 converts spiece.model to its tokenizers-backed T5 tokenizer; extra_ids=0 keeps the vocab as is.
    return transformers.T5Tokenizer.from_pretrained(str(tokenizer_folder), extra_ids=0)


def tiny_configs(vocab: int = VOCAB):
    # dim (40) != num_heads * d_kv (32) so that a dim/dim_attn mix-up cannot pass.
    hf = transformers.UMT5Config(
        vocab_size=vocab, d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)
    ours = TextEncoderConfig(vocab_size=vocab, dim=40, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                             num_buckets=32, max_distance=128, eps=1e-6)
    return hf, ours


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    hf_config, _ = tiny_configs()
    hf_config._attn_implementation = "eager"
    model = transformers.UMT5EncoderModel(hf_config).eval()
    with torch.no_grad():
        # Randomise every tensor, norms included, so no mapping mistake hides behind ones or zeros.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            elif "shared" in name or "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def ours_from(state_dict) -> UMT5Encoder:
    _, config = tiny_configs()
    model = UMT5Encoder(config).eval()
    model.load_state_dict(map_hf_keys(state_dict), strict=True)
    return model


def comfy_state_dict(hf_model, spm: bytes | None = None) -> dict[str, torch.Tensor]:
    sd = dict(hf_model.state_dict())
    sd["spiece_model"] = torch.frombuffer(bytearray(spm or b"\x00"), dtype=torch.uint8)
    return sd


# ----------------------------------------------------------------------------------------------- 1. layouts

def _layout(name: str) -> dict[str, list[int]]:
    tensors = json.loads((LAYOUTS / name).read_text())["tensors"]
    return {k: v["shape"] for k, v in tensors.items()}


def test_official_layout_at_xxl_size():
    model = UMT5Encoder(UMT5_XXL, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == _layout("umt5_xxl_encoder_official.json")


def test_hf_layout_maps_onto_ours_at_xxl_size():
    hf = {k: torch.empty(shape, device="meta") for k, shape in _layout("umt5_xxl_encoder_hf.json").items()}
    hf["spiece_model"] = torch.empty(1000, dtype=torch.uint8, device="meta")  # as in ComfyUI's files
    mapped = {k: list(v.shape) for k, v in map_hf_keys(hf).items()}
    model = UMT5Encoder(UMT5_XXL, device="meta")
    assert mapped == {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(mapped) == len(hf) - 2  # the tied encoder.embed_tokens duplicate and spiece_model left out


def test_map_hf_keys_tied_embedding_either_name():
    w, e = torch.zeros(3), torch.ones(3)
    assert map_hf_keys({"shared.weight": w, "encoder.embed_tokens.weight": e}) == {"token_embedding.weight": w}
    assert map_hf_keys({"encoder.embed_tokens.weight": e}) == {"token_embedding.weight": e}
    # Official names and quantisation extras survive; the mapping is idempotent.
    sd = {"blocks.0.attn.q.weight": w, "encoder.block.1.layer.1.DenseReluDense.wo.scale_weight": e}
    assert map_hf_keys(sd) == {"blocks.0.attn.q.weight": w, "blocks.1.ffn.fc2.scale_weight": e}
    assert map_hf_keys(map_hf_keys(sd)) == map_hf_keys(sd)


# ------------------------------------------------------------------------------------------------ 2. parity

@pytest.mark.parametrize("embedding", ["both", "shared_only", "embed_tokens_only"])
def test_encoder_matches_transformers(hf_model, embedding):
    sd = comfy_state_dict(hf_model)
    if embedding == "shared_only":
        del sd["encoder.embed_tokens.weight"]
    elif embedding == "embed_tokens_only":
        del sd["shared.weight"]
    ours = ours_from(sd)

    # Lengths past 16 and past max_distance reach the logarithmic and the saturated buckets.
    torch.manual_seed(1)
    lengths = [150, 37, 5]
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 1
        ids[i, n:] = 0
        mask[i, :n] = 1

    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.shape == ref.shape
    err = max(rel_err(out[i, :n], ref[i, :n]) for i, n in enumerate(lengths))
    print(f"umT5 encoder vs transformers ({embedding}): max rel err {err:.2e}")
    assert err < 1e-5


def test_padding_does_not_change_rows(hf_model):
    ours = ours_from(comfy_state_dict(hf_model))
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        alone = ours(ids, torch.ones_like(ids))[0]
        padded_ids = torch.cat([ids, torch.zeros(1, 30, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 30, dtype=torch.long)], dim=1)
        padded = ours(padded_ids, mask)[0, :20]
    assert rel_err(padded, alone) < 1e-6


def test_fp8_weights_stay_fp8(hf_model):
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    quantised = ours_from(comfy_state_dict(hf_model))
    reference = ours_from(comfy_state_dict(hf_model))
    for (name, mod), ref_mod in zip(quantised.named_modules(), reference.modules()):
        if isinstance(mod, (ops.Linear, torch.nn.Embedding)):
            stored = mod.weight.detach().to(fp8)
            mod.weight = torch.nn.Parameter(stored, requires_grad=False)
            ref_mod.weight.data = stored.float()  # what the fp8 weight means, in fp32
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        out, ref = quantised(ids, torch.ones_like(ids)), reference(ids, torch.ones_like(ids))
    assert quantised.blocks[0].attn.q.weight.dtype == fp8
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32(hf_model, dtype):
    # Official umT5 runs in bf16: the activations stay in the weights' dtype and come out close to fp32.
    full = ours_from(comfy_state_dict(hf_model))
    half = ours_from(comfy_state_dict(hf_model)).to(dtype)
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        out, ref = half(ids, mask), full(ids, mask)
    assert out.dtype == dtype
    assert rel_err(out[0].float(), ref[0]) < 5e-2 and rel_err(out[1, :10].float(), ref[1, :10]) < 5e-2


def test_fp16_clamp_only_for_fp16():
    x = torch.tensor([float("inf"), -float("inf"), 1.0])
    clamped = fp16_clamp(x.half())
    assert torch.isfinite(clamped).all() and clamped[2] == 1.0
    assert torch.isinf(fp16_clamp(x.bfloat16())[:2]).all()
    assert torch.isinf(fp16_clamp(x)[:2]).all()


# --------------------------------------------------------------------------------------------- 3. tokenizer

def test_clean_prompt_matches_official_cleaning():
    for p in PROMPTS + ["x&amp;amp;y", "\u3000ideographic\u00a0spaces\u2003"]:
        assert clean_prompt(p) == official_clean(p)


@pytest.mark.parametrize("max_length", [512, 8])
def test_tokenizer_matches_t5_tokenizer(spm_bytes, hf_tokenizer, max_length):
    ours = Tokenizer.from_bytes(spm_bytes)
    ids, mask = ours(PROMPTS, max_length=max_length)
    ref = hf_tokenizer([official_clean(p) for p in PROMPTS], padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask)
    assert ids.shape[1] == max_length  # the long prompt reaches the limit and keeps its EOS
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id,
                                                           len(hf_tokenizer))


def test_unknown_words_are_those_t5_maps_to_unk(spm_bytes, hf_tokenizer):
    ours = Tokenizer.from_bytes(spm_bytes)
    for prompt in PROMPTS:
        expected = []
        for word in official_clean(prompt).split():
            ids = hf_tokenizer(word, add_special_tokens=False).input_ids
            if hf_tokenizer.unk_token_id in ids and word not in expected:
                expected.append(word)
        assert ours.unknown_words(prompt) == expected
    unknown = ours.unknown_words(PROMPTS[2])
    assert {"🦊", "über", "✓✓"} <= set(unknown)  # characters the corpus never had
    assert not {"small", "blue", "circle", "rolls", "water,"} & set(unknown)


def test_tokenizer_sources_agree(spm_bytes, tokenizer_folder, tmp_path):
    nested = tmp_path / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl"
    nested.mkdir(parents=True)
    (nested / "spiece.model").write_bytes(spm_bytes)
    sources = [
        Tokenizer.from_bytes(spm_bytes),
        Tokenizer.from_bytes(torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)),  # ComfyUI's tensor
        Tokenizer.from_path(tokenizer_folder / "spiece.model"),
        Tokenizer.from_path(tokenizer_folder),
        Tokenizer.from_path(tmp_path / "Wan2.1-T2V-1.3B"),  # official checkpoint folder
    ]
    first_ids, first_mask = sources[0](PROMPTS)
    for tok in sources[1:]:
        ids, mask = tok(PROMPTS)
        assert torch.equal(ids, first_ids) and torch.equal(mask, first_mask)


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"definitely not a model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer.from_path(tmp_path)


# ------------------------------------------------------------------------------------------- 4. end to end

def test_text_encoder_end_to_end(spm_bytes, hf_tokenizer, hf_model):
    sd = comfy_state_dict(hf_model, spm_bytes)
    te = TextEncoder(ours_from(sd), Tokenizer.from_bytes(sd["spiece_model"]))
    embeddings = te.encode(PROMPTS)

    # The official pipeline: clean, pad to 512, encode with the mask, keep the rows of tokens + EOS.
    cleaned = [official_clean(p) for p in PROMPTS]
    ref_in = hf_tokenizer(cleaned, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(input_ids=ref_in.input_ids, attention_mask=ref_in.attention_mask).last_hidden_state

    assert len(embeddings) == len(PROMPTS)
    errs = []
    for i, (emb, text) in enumerate(zip(embeddings, cleaned)):
        tokens = len(hf_tokenizer(text, add_special_tokens=False).input_ids)
        assert emb.shape == (min(tokens + 1, 512), 40)
        errs.append(rel_err(emb, ref[i, :emb.shape[0]]))
    print(f"TextEncoder.encode vs transformers: max rel err {max(errs):.2e}")
    assert max(errs) < 1e-5
    assert te.dtype == torch.float32 and te.device.type == "cpu"
    assert te.to(torch.float64).dtype == torch.float64
