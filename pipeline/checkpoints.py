"""Checkpoint files: read them, tell what they are, and load them into our modules.

A loader never trusts a file name or a user's choice of loader. It reads the tensor names and shapes (for
safetensors, from the header alone), decides what the file is (`detect`), refuses a wrong file with a message
that says what it is and what to do, and only then builds the module on the `meta` device, assigns the file's
tensors in place (memory-mapped, not copied) and casts and moves each once.

Layouts read: the official Wan names, ComfyUI's repackaged files (a `model.diffusion_model.`-style prefix;
fp8 weights plain, legacy-scaled with `scaled_fp8` + `.scale_weight`, or with `.weight_scale` + `.comfy_quant`),
diffusers folders and Hugging Face T5 names (renamed by each model module's own key map), sharded
`*.safetensors.index.json`, and `.pth` pickles when they hold nothing but tensors.

torch is imported inside the functions that touch tensors: `zoetrope inspect` needs only the JSON header, and
importing torch would cost more than the whole inspection.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import UMT5_XXL, VARIANTS, WAN21_VAE, WAN22_VAE, DiTConfig, TextEncoderConfig, VAEConfig, Variant

if TYPE_CHECKING:
    import torch
    from torch import nn


class CheckpointError(ValueError):
    """A file that is not what the caller needs: the message names the file, says what it is, what was
    expected, and what to do."""


# --------------------------------------------------------------------------------------------------------------
# What our loaders take, and where ComfyUI keeps each kind of file

LOADERS = {
    "transformer": "ZoetropeModelLoader / zoetrope.pipeline.load_transformer",
    "vae": "ZoetropeVAELoader / zoetrope.pipeline.load_vae",
    "text_encoder": "ZoetropeTextEncoderLoader / zoetrope.pipeline.load_text_encoder",
}
COMFYUI_FOLDERS = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders",
                   "lora": "loras"}
_KIND_WORDS = {"transformer": "Wan diffusion model (transformer)", "vae": "Wan video VAE",
               "text_encoder": "umT5 text encoder"}
# The subfolder of a diffusers pipeline folder (the one with model_index.json) that each loader reads.
_DIFFUSERS_SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder"}

# Prefixes that wrap a whole model in ComfyUI's (and some trainers') exports, tried in this order.
PREFIXES = ("model.diffusion_model.", "model.model.", "diffusion_model.")

# Tensors that travel beside a model's weights but are not parameters of it.
_TOKENIZER_TENSOR = "spiece_model"          # ComfyUI's umT5 files carry the SentencePiece model as uint8
_SCALED_FP8_MARKER = "scaled_fp8"           # legacy ComfyUI scaled fp8: its dtype names the fp8 format
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")       # per-layer weight scale: W = W_fp8 * scale
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")       # activation scales for fp8 matmuls; we up-cast
_QUANT_SUFFIX = ".comfy_quant"              # per-layer JSON (uint8) saying how the layer is stored

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_INDEX_SUFFIX = ".safetensors.index.json"
METADATA_KEY = "zoetrope.config"            # JSON in the safetensors metadata: config fields shapes cannot tell
FAMILY_KEY = "zoetrope.family"              # optional: the family ("builtin"), also accepted inside the JSON

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
_ITEM_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
               "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
               "bool": 1}
_PRECISION_WORDS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}
_FP8 = ("float8_e4m3fn", "float8_e5m2")


# --------------------------------------------------------------------------------------------------------------
# Reading

class TensorMeta(NamedTuple):
    """A tensor's name-independent facts, as a header states them."""
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float16", "float8_e4m3fn", "uint8", ...

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """What a checkpoint holds, without its tensor data: names, shapes, dtypes and the file's metadata."""
    tensors: dict[str, TensorMeta]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None          # the file or index read (None: an in-memory state dict)
    files: tuple[Path, ...] = ()      # the safetensors files that hold the data
    file_size: int | None = None      # bytes on disk, all shards together
    # Tensors already in memory: a state dict the caller passed, or an unpickled .pth (read once, kept).
    state_dict: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "the given state dict"


def read_header(source, kind: str | None = None) -> Header:
    """The header of a checkpoint: a .safetensors file (its JSON header only), a sharded
    `*.safetensors.index.json`, a folder holding one (for a diffusers pipeline folder, the subfolder of
    `kind`), a `.pth`/`.pt`/`.bin` pickle of plain tensors (memory-mapped), or an in-memory state dict."""
    if isinstance(source, Header):
        return source
    if isinstance(source, Mapping):
        return Header({name: _tensor_meta(t) for name, t in source.items()}, state_dict=source)
    path = _locate(Path(source), kind)
    if path.name.endswith(_INDEX_SUFFIX):
        return _read_index(path)
    if path.suffix in _SAFETENSORS_SUFFIXES:
        tensors, metadata = _read_safetensors_header(path)
        return Header(tensors, metadata, path, (path,), path.stat().st_size)
    if path.suffix in _PICKLE_SUFFIXES:
        state_dict = _read_pickle(path)
        return Header({name: _tensor_meta(t) for name, t in state_dict.items()}, {}, path, (),
                      path.stat().st_size, state_dict)
    raise CheckpointError(
        f"{path}: not a weights file Zoetrope reads (suffix {path.suffix or 'none'}). Expected .safetensors, "
        f"a sharded {_INDEX_SUFFIX}, or a .pth/.pt/.bin file of plain tensors.")


def read_state_dict(source, kind: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their stored names. Safetensors are memory-mapped: a tensor's pages
    are read from disk when it is first used, and nothing is copied."""
    return _read_tensors(read_header(source, kind))


def _read_tensors(header: Header) -> dict:
    if header.state_dict is not None:
        return dict(header.state_dict)
    from safetensors import safe_open

    tensors = {}
    for file in header.files:
        # safe_open maps the file; each tensor is a view into the mapping that outlives the handle.
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _tensor_meta(tensor) -> TensorMeta:
    return TensorMeta(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Parse and check the header: 8 bytes of little-endian length, then that much JSON, then the data."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), most likely an interrupted download or "
                              "copy. Download or copy it again.")
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            raise CheckpointError(f"{path}: not a safetensors file (it does not start with a safetensors "
                                  f"header). Expected a .safetensors model file; check that this is the right "
                                  "file and that it downloaded completely.")
        header_len = int.from_bytes(head[:8], "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file: its header claims {header_len:,} bytes but only "
                f"{size - 8:,} follow. The download or copy was cut off; download it again.")
        f.seek(8)
        raw = f.read(header_len)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}). Download the file again.") from None
    metadata = entries.pop("__metadata__", None) or {}
    data_len, end = size - 8 - header_len, 0
    tensors = {}
    name = ""
    try:
        for name, entry in entries.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            tensors[name] = meta = TensorMeta(tuple(int(n) for n in entry["shape"]), dtype)
            start, stop = (int(n) for n in entry["data_offsets"])
            if dtype in _ITEM_SIZES and stop - start != meta.numel() * _ITEM_SIZES[dtype]:
                raise ValueError
            end = max(end, stop)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (the entry for {name!r} lacks a dtype, shape "
                              "or data_offsets, or they disagree). Download the file again.") from None
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header places tensor data up to byte {end:,}, but the "
            f"file holds only {data_len:,} bytes of data ({end - data_len:,} missing). The download or copy "
            "was cut off; download it again.")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_index(path: Path) -> Header:
    """A sharded checkpoint: the index names, for each tensor, the shard file that holds it."""
    try:
        index = json.loads(path.read_text())
        shard_names = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid sharded-checkpoint index ({e}); expected JSON with a "
                              "`weight_map` of tensor name -> shard file.") from None
    tensors, metadata, files, size = {}, {}, [], 0
    for name in shard_names:
        shard = path.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: the shard {name} that this index lists is missing from "
                                  f"{path.parent}. Download all shards of the model.")
        shard_tensors, shard_metadata = _read_safetensors_header(shard)
        tensors.update(shard_tensors)
        metadata.update(shard_metadata)
        files.append(shard)
        size += shard.stat().st_size
    return Header(tensors, metadata, path, tuple(files), size)


def _read_pickle(path: Path) -> dict:
    """A torch pickle of plain tensors. torch's weights-only unpickler refuses anything else (a pickle can
    name any function to call while it loads) before running it; a refusal becomes a CheckpointError."""
    import pickle

    import torch

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), most likely an interrupted download or "
                              "copy. Download or copy it again.")
    # Only the zip format (torch >= 1.6) can be memory-mapped; older pickles are read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({e}); the file is corrupt or "
                                  "truncated. Download it again.") from None
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(
            f"{path}: refused: this pickle would run code or build objects that are not plain tensors while "
            f"loading ({reason}). Zoetrope loads .pth/.pt/.bin files only when they hold nothing but tensors, "
            "and ran nothing from this one. Use a .safetensors version of the model (ComfyUI's repackaged "
            "files, or a diffusers folder), or convert the file on a machine where you trust it.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]}); the file is "
                              "corrupt or truncated. Download it again.") from None
    # Some trainers wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not any(
                isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors. "
                              "Expected the weights of a Wan transformer, VAE or umT5 text encoder.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors and obj:
        raise CheckpointError(f"{path}: holds no tensors (keys: {_few(obj)}). Expected the weights of a Wan "
                              "transformer, VAE or umT5 text encoder.")
    return tensors


def _locate(path: Path, kind: str | None) -> Path:
    """The one weights file (or index) behind a path that may be a folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Check the path (models belong in ComfyUI's "
                              "models/diffusion_models, models/vae and models/text_encoders).")
    if path.is_file():
        return path
    if (path / "model_index.json").is_file():
        if kind is None:
            raise CheckpointError(f"{path}: a diffusers pipeline folder; say which part to read (transformer, "
                                  "vae or text_encoder), or point to that subfolder.")
        sub = path / _DIFFUSERS_SUBFOLDERS[kind]
        if not sub.is_dir():
            raise CheckpointError(f"{path}: a diffusers pipeline folder without the {sub.name}/ subfolder that "
                                  f"holds its {_KIND_WORDS[kind]}. Download the complete folder.")
        return _locate(sub, kind)
    candidates = weight_files(path)
    if not candidates:
        raise CheckpointError(f"{path}: the folder holds no weights file (.safetensors, {_INDEX_SUFFIX}, "
                              ".pth). Point to the model file itself.")
    if len(candidates) == 1:
        return candidates[0]
    if kind is not None:
        # An official Wan folder keeps transformer, VAE and text encoder side by side: take the one of `kind`.
        # Safetensors headers are cheap to read, so look at them before unpickling anything.
        for group in ([c for c in candidates if c.suffix not in _PICKLE_SUFFIXES],
                      [c for c in candidates if c.suffix in _PICKLE_SUFFIXES]):
            matching = [c for c in group if detect(read_header(c)).kind == kind]
            if len(matching) == 1:
                return matching[0]
    raise CheckpointError(f"{path}: the folder holds several weight files ({_few([c.name for c in candidates])}); "
                          "point to the one you mean.")


def weight_files(folder: Path) -> list[Path]:
    """The weights files of a folder: indexes of sharded checkpoints (not their shards), safetensors, pickles."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    indexes = [p for p in files if p.name.endswith(_INDEX_SUFFIX)]
    sharded = set()
    for index in indexes:
        try:
            sharded |= set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    safetensors = [p for p in files if p.suffix in _SAFETENSORS_SUFFIXES and p.name not in sharded]
    pickles = [p for p in files if p.suffix in _PICKLE_SUFFIXES]
    # diffusers and HF folders often hold the same weights twice (model.safetensors, pytorch_model.bin).
    if (indexes or safetensors) and all(p.name.startswith(("pytorch_model", "diffusion_pytorch_model"))
                                        for p in pickles):
        pickles = []
    return indexes + safetensors + pickles


def _few(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(f"`{x}`" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------------------
# Detection

@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint is, decided from its tensor names and shapes (and its metadata) alone."""
    kind: str                          # transformer | vae | text_encoder | lora | image-model | unknown
    name: str                          # what it is, in words: "Wan 2.1 T2V 1.3B", "Wan 2.2 VAE", "a LoRA ..."
    family: str | None = None          # wan2.1 | wan2.2 | builtin | custom (None: not a Wan-family model)
    variant: Variant | None = None     # the released transformer it matches, with its recommended settings
    config: DiTConfig | VAEConfig | TextEncoderConfig | None = None
    precision: str = ""                # fp32 | fp16 | bf16 | fp8_e4m3fn | fp8_e4m3fn scaled | ...
    dtype: str = ""                    # storage dtype of the full-precision tensors (see ops.default_dtype)
    num_params: int = 0
    file_size: int | None = None
    layout: str = ""                   # official | comfyui-prefixed | diffusers | hf
    prefix: str = ""                   # the wrapper prefix stripped from every name
    path: str | None = None
    problem: str | None = None         # why our loaders refuse it (what it is, what to do); None if one takes it
    notes: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict, compare=False, hash=False)  # other `zoetrope.config` entries

    @property
    def folder(self) -> str | None:
        """The ComfyUI models/ subfolder this file belongs in."""
        return COMFYUI_FOLDERS.get(self.kind)

    @property
    def loader(self) -> str | None:
        """Which of our loaders takes it (None when none does)."""
        return LOADERS.get(self.kind) if self.problem is None else None


class _Incomplete(Exception):
    """A tensor every model of the detected kind has is missing."""


def detect(source) -> ModelInfo:
    """Tell what a checkpoint is from its header (see `read_header`; a path or state dict is read first).

    Allocates no tensor memory. A file our loaders refuse comes back with `problem` set, so that `zoetrope
    inspect` can still say what it is; CheckpointError is only for a file that cannot be read, or whose
    `zoetrope.config` metadata contradicts its tensors."""
    header = read_header(source)
    where = header.where
    common = dict(path=None if header.path is None else str(header.path), file_size=header.file_size)
    if not header.tensors:
        return ModelInfo("unknown", "an empty checkpoint", problem=f"{where}: holds no tensors at all. Expected "
                         "a Wan transformer, VAE or umT5 text encoder; download the file again.", **common)
    names = list(header.tensors)
    lora = _lora_marker(names)
    if lora:
        target = "a Wan transformer" if any(".self_attn" in n or ".cross_attn" in n for n in names) else "a model"
        return ModelInfo(
            "lora", f"a LoRA for {target}", num_params=_count(header.tensors.values()), layout="lora",
            precision=_precision(header.tensors, False)[0], **common,
            problem=f"{where}: this is a LoRA for {target} (low-rank patch tensors such as `{lora}`), not a full "
                    "model. Zoetrope does not apply LoRAs yet; load the full Wan model it was trained for (ComfyUI "
                    "folder models/diffusion_models) instead.")
    prefix = _prefix_of(names)
    tensors = {n.removeprefix(prefix): m for n, m in header.tensors.items() if not _is_extra(n.removeprefix(prefix))}
    image = _image_model({_without_prefix(n): m for n, m in header.tensors.items()})
    if image:
        return ModelInfo(
            "image-model", image, num_params=_count(tensors.values()), precision=_precision(tensors, False)[0],
            layout="comfyui-prefixed" if prefix else "official", prefix=prefix, **common,
            problem=f"{where}: this is {image}, not part of a Wan video model. Zoetrope needs Wan files (a "
                    "transformer in models/diffusion_models, a VAE in models/vae, umT5 in models/text_encoders); "
                    "load this one with ComfyUI's core image nodes.")
    kind, layout = _classify(tensors)
    if kind is None:
        return ModelInfo("unknown", "an unknown model", num_params=_count(tensors.values()), prefix=prefix,
                         precision=_precision(tensors, False)[0], **common,
                         problem=f"{where}: unknown file: its {len(tensors)} tensors (e.g. {_few(sorted(tensors))}) "
                                 "match no model Zoetrope knows. Expected a Wan transformer, a Wan VAE or a umT5 "
                                 "text encoder; check that this is the right file.")
    if layout != "official":
        try:
            tensors = _key_mapper(kind, layout)(tensors)
        except ValueError as e:
            return ModelInfo(kind, f"a {_KIND_WORDS[kind]} in {layout} naming", layout=layout, prefix=prefix, **common,
                             problem=f"{where}: looks like a {_KIND_WORDS[kind]} in {layout} naming, but its names "
                                     f"do not map onto Wan's ({e}). Check that this is a complete, unmodified file.")
    elif prefix:
        layout = "comfyui-prefixed"
    scaled = any(n.endswith(_SCALE_SUFFIXES) for n in header.tensors)
    precision, dtype = _precision(tensors, scaled)
    common.update(layout=layout, prefix=prefix, precision=precision, dtype=dtype, num_params=_count(tensors.values()))
    try:
        meta = _zoetrope_metadata(header)
        derive = {"transformer": _detect_transformer, "vae": _detect_vae, "text_encoder": _detect_text_encoder}[kind]
        fields = derive(tensors, meta, where, str(header.path or ""))
    except _Incomplete as e:
        return ModelInfo(kind, f"an incomplete {_KIND_WORDS[kind]}", **common,
                         problem=f"{where}: looks like a {_KIND_WORDS[kind]} but lacks `{e}`, which every such "
                                 "model has: the file is incomplete or a variant Zoetrope does not know. Check "
                                 "that it downloaded completely.")
    return ModelInfo(kind, **fields, **common)


def _lora_marker(names) -> str | None:
    return next((n for n in names if re.search(r"(^|[._])(lora_|lora\.|hada_w|lokr_w)", n)), None)


def _prefix_of(names: list[str]) -> str:
    for prefix in PREFIXES:
        if sum(n.startswith(prefix) for n in names) * 2 >= len(names):
            return prefix
    return ""


def _without_prefix(name: str) -> str:
    return next((name.removeprefix(p) for p in PREFIXES if name.startswith(p)), name)


def _is_extra(name: str) -> bool:
    """Tensors beside the weights: tokenizer bytes, fp8 markers and scales."""
    return (name in (_TOKENIZER_TENSOR, _SCALED_FP8_MARKER)
            or name.endswith(_SCALE_SUFFIXES + _IGNORED_SUFFIXES + (_QUANT_SUFFIX,)))


# (name test, what it is): the layouts of image models people most often pick by mistake.
_IMAGE_MODELS = (
    (lambda n, m: n.startswith("input_blocks."), "a Stable Diffusion-style image UNet (input_blocks)"),
    (lambda n, m: n.startswith(("double_blocks.", "single_blocks.")), "a Flux-style image model (double_blocks)"),
    (lambda n, m: n.startswith("joint_blocks."), "an SD3-style image model (joint_blocks)"),
    (lambda n, m: n.startswith("conditioner."), "an SDXL-style image checkpoint (conditioner)"),
    (lambda n, m: n.startswith(("cond_stage_model.", "first_stage_model.")), "a Stable Diffusion image checkpoint"),
    (lambda n, m: n.startswith(("single_transformer_blocks.", "transformer_blocks.")),
     "a diffusers image transformer (Flux/SD3-style)"),
    (lambda n, m: n.startswith("down_blocks.") and "attentions" in n, "a diffusers image UNet"),
    (lambda n, m: n in ("encoder.conv_in.weight", "encoder.conv1.weight") and len(m.shape) == 4,
     "an image VAE (2D convolutions, SD/Flux-style)"),
    (lambda n, m: n.startswith("text_model.encoder.layers."), "a CLIP text encoder (used by image models)"),
    (lambda n, m: n.startswith(("vision_model.", "visual.")), "a CLIP vision encoder"),
)


def _image_model(tensors: Mapping[str, TensorMeta]) -> str | None:
    for test, what in _IMAGE_MODELS:
        if any(test(n, m) for n, m in tensors.items()):
            return what
    return None


def _classify(t: Mapping[str, TensorMeta]) -> tuple[str | None, str]:
    """(kind, layout) from marker names; layout is the naming the keys follow."""
    if "patch_embedding.weight" in t:
        diffusers = any(n.startswith("condition_embedder.") or n == "proj_out.weight" for n in t)
        return "transformer", "diffusers" if diffusers else "official"
    if "decoder.mid_block.resnets.0.norm1.gamma" in t or ("encoder.conv_in.weight" in t and "quant_conv.weight" in t):
        return "vae", "diffusers"
    if any(n.startswith(("decoder.middle.", "encoder.downsamples.")) for n in t):
        return "vae", "official"
    if any(n.startswith("encoder.block.") for n in t):
        return "text_encoder", "hf"
    if "token_embedding.weight" in t and any(n.startswith("blocks.") for n in t):
        return "text_encoder", "official"
    return None, ""


def _key_mapper(kind: str, layout: str):
    """The owning model module's rename from `layout` to the official names our modules use."""
    if kind == "transformer" and layout == "diffusers":
        from .dit import map_diffusers_keys
        return map_diffusers_keys
    if kind == "vae" and layout == "diffusers":
        from .vae import map_diffusers_keys
        return map_diffusers_keys
    if kind == "text_encoder" and layout == "hf":
        from .text_encoder import map_hf_keys
        return map_hf_keys
    return dict


def _shape(t: Mapping[str, TensorMeta], name: str) -> tuple[int, ...]:
    if name not in t:
        raise _Incomplete(name)
    return t[name].shape


def _block_count(t: Mapping[str, TensorMeta], prefix: str) -> int:
    indices = {int(m.group(1)) for n in t if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
    return max(indices) + 1 if indices else 0


def _count(metas) -> int:
    return sum(m.numel() for m in metas)


def _precision(t: Mapping[str, TensorMeta], scaled: bool) -> tuple[str, str]:
    """(precision in words, storage dtype of the full-precision tensors), by the bulk of the parameters."""
    elements: dict[str, int] = {}
    for m in t.values():
        if m.dtype in _PRECISION_WORDS:
            elements[m.dtype] = elements.get(m.dtype, 0) + m.numel()
    if not elements:
        return "", ""
    bulk = max(elements, key=elements.get)
    full = {d: n for d, n in elements.items() if d not in _FP8}
    dtype = max(full, key=full.get) if full else "float32"
    words = _PRECISION_WORDS[bulk] + (" scaled" if scaled and bulk in _FP8 else "")
    return words, dtype


def _zoetrope_metadata(header: Header) -> dict:
    """The `zoetrope.config` JSON; a separate `zoetrope.family` entry, if any, counts as its "family"."""
    raw = header.metadata.get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{header.where}: its `{METADATA_KEY}` metadata is not a JSON object ({e}). "
                              "Re-save the file with zoetrope.pipeline.checkpoints.config_metadata().") from None
    if FAMILY_KEY in header.metadata:
        meta.setdefault("family", header.metadata[FAMILY_KEY])
    return meta


def _make_config(cls, derived: dict, meta: dict, where: str):
    """The config from the shapes, completed by metadata for what shapes cannot tell (head count, latent
    statistics, ...). Metadata that contradicts the shapes is an error: one of the two is wrong."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(derived)
    for key, value in meta.items():
        if key not in names:
            continue
        value = tuple(value) if isinstance(value, list) else value
        if key in derived and derived[key] != value:
            raise CheckpointError(f"{where}: its `{METADATA_KEY}` metadata says {key} = {value}, but its tensors "
                                  f"have {key} = {derived[key]}. The file was saved inconsistently; re-save it.")
        values[key] = value
    return cls(**values)


def _settings(meta: dict, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} | {"family", "name"}
    return {k: v for k, v in meta.items() if k not in names}


def _detect_transformer(t, meta: dict, where: str, hint: str) -> dict:
    dim, in_dim, *patch = _shape(t, "patch_embedding.weight")
    patch_size = tuple(patch)
    num_layers = _block_count(t, "blocks.")
    derived = dict(dim=dim, in_dim=in_dim, patch_size=patch_size, num_layers=num_layers,
                   ffn_dim=_shape(t, "blocks.0.ffn.0.weight")[0],
                   out_dim=_shape(t, "head.head.weight")[0] // math.prod(patch_size),
                   freq_dim=_shape(t, "time_embedding.0.weight")[1],
                   text_dim=_shape(t, "text_embedding.0.weight")[1],
                   image_embedding=any(n.startswith("img_emb.") for n in t))
    notes, problem = [], None
    variant = _transformer_variant(derived, meta.get("family"), hint, notes)
    family = meta.get("family") or (variant.family if variant else "custom")
    name = meta.get("name") or (variant.name if variant else
                                f"a {family} Wan-architecture transformer (dim {dim}, {num_layers} layers)")
    config = None
    if "num_heads" in meta or variant is not None or dim % 128 == 0:
        # Every released Wan transformer has 128-dim heads; the head count itself is in no shape.
        derived.setdefault("num_heads", meta.get("num_heads", dim // 128))
        if "num_heads" not in meta and variant is None:
            notes.append(f"head count {dim // 128} assumed (head size 128): store `num_heads` in the file's "
                         f"`{METADATA_KEY}` metadata if it differs")
        config = _make_config(DiTConfig, derived, meta, where)
    else:
        problem = (f"{where}: a Wan-architecture transformer of a size no release has (dim {dim}), and its head "
                   f"count is in no shape: dim {dim} is no multiple of the usual head size 128. Store "
                   f"`num_heads` in the file's `{METADATA_KEY}` metadata (see "
                   "zoetrope.pipeline.checkpoints.config_metadata) and load it again.")
    if any(n.startswith("vace_blocks.") for n in t):
        problem = (f"{where}: this is a Wan VACE model (it has `vace_blocks`): VACE's control inputs are not "
                   "supported. Use a plain Wan text-to-video or image-to-video model.")
    elif derived["image_embedding"]:
        problem = (f"{where}: this is {name}, whose CLIP image branch (`img_emb`) Zoetrope does not support yet. "
                   "For image-to-video use Wan 2.2 TI2V 5B or Wan 2.2 I2V A14B, or load this file with "
                   "ComfyUI's core Wan nodes.")
    return dict(name=name, family=family, variant=variant, config=config, problem=problem, notes=tuple(notes),
                settings=_settings(meta, DiTConfig))


def _transformer_variant(derived: dict, family: str | None, hint: str, notes: list) -> Variant | None:
    """The released variant of these shapes (of `family`, when the file's metadata names one). Wan 2.1 T2V 14B
    and each Wan 2.2 A14B expert have the very same tensors; only the file or folder name can tell them apart."""
    candidates = [v for v in VARIANTS if (v.dim, v.in_dim, v.num_layers) ==
                  (derived["dim"], derived["in_dim"], derived["num_layers"])
                  and (v.family == "wan2.1" and v.kind == "i2v") == derived["image_embedding"]
                  and family in (None, v.family)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    says_22 = re.search(r"wan[-_ ]?2[._]?2|a14b|high[-_]noise|low[-_]noise", hint, re.IGNORECASE)
    chosen = next((v for v in candidates if v.family == "wan2.2"), candidates[0]) if says_22 else candidates[0]
    others = " / ".join(v.name for v in candidates if v is not chosen)
    notes.append(f"same shapes as {others}: told apart by the file name only")
    return chosen


def _detect_vae(t, meta: dict, where: str, hint: str) -> dict:
    dim, in_channels = _shape(t, "encoder.conv1.weight")[:2]
    z_dim = _shape(t, "conv2.weight")[0]
    residual = any(n.startswith("encoder.downsamples.0.downsamples.") for n in t)
    stages = _vae_stages(t, residual)
    if not stages:
        raise _Incomplete("encoder.downsamples.0.residual.2.weight")
    dim_mult = tuple(out // dim for out, _, _ in stages)
    derived = dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=stages[0][1],
                   temporal_downsample=tuple(temporal for _, _, temporal in stages[:-1]),
                   patch_size=math.isqrt(in_channels // 3), residual=residual,
                   dec_dim=_shape(t, "decoder.conv1.weight")[0] // dim_mult[-1])
    released = {16: WAN21_VAE, 48: WAN22_VAE}.get(z_dim)
    if released is not None and not {"latents_mean", "latents_std"} & meta.keys():
        derived.update(latents_mean=released.latents_mean, latents_std=released.latents_std)
    config = _make_config(VAEConfig, derived, meta, where)
    is_released = released is not None and dataclasses.replace(
        config, latents_mean=released.latents_mean, latents_std=released.latents_std) == released
    release = {16: ("wan2.1", "Wan 2.1 VAE"), 48: ("wan2.2", "Wan 2.2 VAE")}[z_dim] if is_released else None
    family = meta.get("family") or (release[0] if release else "custom")
    name = meta.get("name") or (release[1] if release else f"a {family} Wan-architecture VAE (z {z_dim})")
    problem = None
    if len(config.latents_mean) != z_dim or len(config.latents_std) != z_dim:
        problem = (f"{where}: a Wan-architecture VAE with {z_dim} latent channels, whose latent mean and std "
                   f"(one per channel) are neither those of a released Wan VAE nor in the file's `{METADATA_KEY}` "
                   "metadata. Store `latents_mean` and `latents_std` there (config_metadata) and load it again.")
    return dict(name=name, family=family, config=config, problem=problem, settings=_settings(meta, VAEConfig))


def _vae_stages(t, nested: bool) -> list[tuple[int, int, bool]]:
    """(output channels, residual blocks, downsamples in time) per encoder stage, read from its blocks.
    Wan 2.1 keeps the encoder flat (blocks and resamplers in one sequence); Wan 2.2 nests one per stage."""
    def block(prefix: str) -> str | None:
        if f"{prefix}.residual.2.weight" in t:
            return "residual"
        if f"{prefix}.resample.1.weight" in t:
            return "resample"
        return None

    if nested:
        groups = [[f"encoder.downsamples.{s}.downsamples.{i}"
                   for i in range(_block_count(t, f"encoder.downsamples.{s}.downsamples."))]
                  for s in range(_block_count(t, "encoder.downsamples."))]
    else:
        groups, current = [], []
        for i in range(_block_count(t, "encoder.downsamples.")):
            current.append(f"encoder.downsamples.{i}")
            if block(current[-1]) == "resample":
                groups.append(current)
                current = []
        groups.append(current)
    stages = []
    for group in groups:
        blocks = [p for p in group if block(p) == "residual"]
        if not blocks:
            return []
        resample = next((p for p in group if block(p) == "resample"), None)
        stages.append((t[f"{blocks[0]}.residual.2.weight"].shape[0], len(blocks),
                       resample is not None and f"{resample}.time_conv.weight" in t))
    return stages


def _detect_text_encoder(t, meta: dict, where: str, hint: str) -> dict:
    vocab_size, dim = _shape(t, "token_embedding.weight")
    num_layers = _block_count(t, "blocks.")
    num_buckets, num_heads = _shape(t, "blocks.0.pos_embedding.embedding.weight")
    derived = dict(vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
                   num_buckets=num_buckets, dim_attn=_shape(t, "blocks.0.attn.q.weight")[0],
                   dim_ffn=_shape(t, "blocks.0.ffn.fc1.weight")[0])
    config = _make_config(TextEncoderConfig, derived, meta, where)
    problem = None
    if num_layers > 1 and "blocks.1.pos_embedding.embedding.weight" not in t:
        problem = (f"{where}: this is a T5 encoder (relative position bias in its first layer only), not umT5: "
                   "Wan is conditioned on umT5-XXL. Use umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled"
                   ".safetensors (ComfyUI folder models/text_encoders).")
        return dict(name="a T5 encoder (not umT5)", family=None, config=config, problem=problem)
    family = meta.get("family") or ("wan2.1" if config == UMT5_XXL else "custom")
    name = meta.get("name") or ("umT5-XXL encoder (Wan 2.1 and 2.2)" if config == UMT5_XXL else
                                f"a {family} umT5-architecture text encoder (dim {dim}, {num_layers} layers)")
    return dict(name=name, family=family, config=config, settings=_settings(meta, TextEncoderConfig))


def config_metadata(config, family: str | None = None, name: str | None = None, **settings) -> dict[str, str]:
    """Safetensors metadata that records what the shapes of a custom model cannot (head count, latent
    statistics, ...): `save_file(state_dict, path, metadata=config_metadata(config, family="builtin"))`.
    Extra keyword entries (e.g. recommended sampling settings) come back in `ModelInfo.settings`."""
    entries = dataclasses.asdict(config)
    entries.update({k: v for k, v in dict(family=family, name=name).items() if v is not None}, **settings)
    return {METADATA_KEY: json.dumps(entries)}


# --------------------------------------------------------------------------------------------------------------
# Loading

def load_transformer(path_or_state_dict, device=None, dtype=None):
    """A Wan transformer (`WanModel`) from a file, folder, index or state dict; `.info` says what it is."""
    return _load("transformer", path_or_state_dict, device, dtype)


def load_vae(path_or_state_dict, device=None, dtype=None):
    """A Wan VAE (`WanVAE`) with its family's latent statistics; `.info` says what it is."""
    return _load("vae", path_or_state_dict, device, dtype)


def load_text_encoder(path_or_state_dict, device=None, dtype=None):
    """A umT5 `TextEncoder`: the encoder and its tokenizer, which comes from the file's `spiece_model` tensor
    or from a spiece.model / tokenizer/ / google/umt5-xxl/ beside the weights."""
    return _load("text_encoder", path_or_state_dict, device, dtype)


def _load(kind: str, source, device, dtype):
    import torch

    header = read_header(source, kind)
    info = detect(header)
    _check_loadable(info, kind)
    device = torch.device(device if device is not None else "cpu")
    dtype = resolve_dtype(dtype, info, device)
    tensors = _read_tensors(header)
    tokenizer = _find_tokenizer(tensors, header) if kind == "text_encoder" else None
    state_dict, scales = _prepare(tensors, header.metadata, info, kind)
    model = _build(kind, info.config, dtype)
    # The module decides what each parameter is kept in (WanModel keeps modulation tables float32).
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    _check_keys(model, state_dict, info)
    model.load_state_dict(state_dict, strict=True, assign=True)
    _place(model, scales, device, dtypes)
    model.eval()
    model.info = info
    if kind == "text_encoder":
        from .text_encoder import TextEncoder
        try:
            model = TextEncoder(model, tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{header.where}: {e}") from None
        model.info = info
    return model


def _check_loadable(info: ModelInfo, kind: str) -> None:
    where = info.path or "the given state dict"
    function, words, folder = LOADERS[kind].split(" / ")[1], _KIND_WORDS[kind], COMFYUI_FOLDERS[kind]
    if info.kind in LOADERS and info.kind != kind:
        raise CheckpointError(
            f"{where}: this is {_article(info.name)}, a {_KIND_WORDS[info.kind]}, not the {words} that {function} "
            f"expects (ComfyUI folder models/{folder}). Load it with {LOADERS[info.kind]} (ComfyUI folder "
            f"models/{info.folder}).")
    if info.problem:
        raise CheckpointError(info.problem if info.kind == kind else
                              f"{info.problem} ({function} expects a {words}, from ComfyUI's models/{folder}.)")


def _article(name: str) -> str:
    return name if name.startswith(("a ", "an ")) else f"the {name}"


def resolve_dtype(dtype, info: ModelInfo, device):
    """The torch dtype a model described by `info` computes in on `device`: `dtype` as given (a torch dtype or a
    name such as "bf16"), or when None the default for the device and the file's precision (ops.default_dtype)."""
    import torch

    from . import ops

    if isinstance(dtype, str):
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
        name, dtype = dtype, getattr(torch, aliases.get(dtype, dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}; expected float32, float16 or bfloat16 (or fp32/fp16/bf16)")
    if dtype is None:
        dtype = ops.default_dtype(device, getattr(torch, info.dtype or "float32"))
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"cannot compute in {dtype}: expected float32, float16 or bfloat16. fp8 files stay fp8 in "
                         "memory by themselves; pass the dtype to compute in.")
    return dtype


def _find_tokenizer(tensors: dict, header: Header):
    from .tokenizer import Tokenizer

    if _TOKENIZER_TENSOR in tensors:
        return Tokenizer.from_bytes(tensors[_TOKENIZER_TENSOR])
    if header.path is not None:
        folder = header.path if header.path.is_dir() else header.path.parent
        # beside the weights, or one level up (a diffusers pipeline keeps tokenizer/ next to text_encoder/)
        for base in (folder, folder.parent):
            try:
                return Tokenizer.from_path(base)
            except FileNotFoundError:
                continue
    raise CheckpointError(
        f"{header.where}: a umT5 text encoder without its tokenizer: there is no `{_TOKENIZER_TENSOR}` tensor in "
        "it and no spiece.model, tokenizer/ or google/umt5-xxl/ beside it. Put the umT5 spiece.model "
        "(google/umt5-xxl) next to the weights, or use ComfyUI's umt5_xxl_*.safetensors, which carry it.")


def _prepare(tensors: dict, metadata: dict, info: ModelInfo, kind: str) -> tuple[dict, dict]:
    """Stored tensors -> (state dict in our names, weight scales by our parameter name).

    Scales are matched to their weights before the rename and followed through it by tensor identity, so the
    rename (owned by each model module) needs to know nothing about quantisation."""
    where = info.path or "the given state dict"
    stripped = {name.removeprefix(info.prefix): t for name, t in tensors.items()}
    weights, scale_of = {}, {}
    for name, t in stripped.items():
        if not _is_extra(name):
            weights[name] = t
    for name, t in stripped.items():
        if name.endswith(_SCALE_SUFFIXES):
            weight = weights.get(name.rsplit(".", 1)[0] + ".weight")
            if weight is None:
                raise CheckpointError(f"{where}: the fp8 scale `{name}` has no weight beside it. The file is "
                                      "damaged or in a quantisation format Zoetrope does not know.")
            if t.numel() not in (1, weight.shape[0]):
                raise CheckpointError(f"{where}: the fp8 scale `{name}` has shape {tuple(t.shape)}, which fits its "
                                      f"weight {tuple(weight.shape)} neither per tensor nor per output channel; "
                                      "Zoetrope reads those two kinds only. Use a 16-bit version of this model.")
            scale_of[id(weight)] = t
        elif name.endswith(_QUANT_SUFFIX):
            _check_quant_format(t.numpy().tobytes(), name, where)
    _check_quantization_metadata(metadata.get("_quantization_metadata"), where)
    state_dict = _key_mapper(kind, info.layout)(weights)
    scales = {name: scale_of[id(t)] for name, t in state_dict.items() if id(t) in scale_of}
    if len(scales) != len(scale_of):
        raise CheckpointError(f"{where}: {len(scale_of) - len(scales)} fp8 scales belong to tensors that the "
                              f"{info.layout} key map renamed or dropped; this file's quantised layout is not "
                              "supported. Use a 16-bit or plain fp8 file.")
    return state_dict, scales


def _check_quantization_metadata(raw: str | None, where: str) -> None:
    """ComfyUI's alternative to per-layer comfy_quant tensors: {"layers": {name: {"format": ...}}} in the header."""
    if not raw:
        return
    try:
        layers = json.loads(raw).get("layers", {})
    except (ValueError, AttributeError):
        raise CheckpointError(f"{where}: its `_quantization_metadata` is not JSON; the file is damaged.") from None
    for layer, entry in layers.items():
        _check_quant_format(json.dumps(entry).encode(), layer, where)


def _check_quant_format(raw: bytes, name: str, where: str) -> None:
    try:
        fmt = json.loads(raw.decode()).get("format")
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise CheckpointError(f"{where}: the quantisation entry `{name}` is not JSON; the file is damaged.") from None
    if fmt not in _FP8:
        raise CheckpointError(f"{where}: `{name}` is stored as {fmt!r}; Zoetrope reads per-tensor fp8 "
                              f"({' or '.join(_FP8)}) only. Use a 16-bit or fp8 version of this model.")


def _build(kind: str, config, dtype):
    """The module on the `meta` device: shapes and dtypes only, no memory, nothing initialised."""
    if kind == "transformer":
        from .dit import WanModel as cls
    elif kind == "vae":
        from .vae import WanVAE as cls
    else:
        from .text_encoder import UMT5Encoder as cls
    return cls(config, device="meta", dtype=dtype)


def _check_keys(model: nn.Module, state_dict: dict, info: ModelInfo) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
                 f"{len(mismatched)} of another shape ({'; '.join(mismatched[:3])})" if mismatched else ""]
        raise CheckpointError(
            f"{info.path or 'the given state dict'}: its tensors do not fit the {info.name} they look like: "
            f"{', '.join(p for p in parts if p)}. The file is incomplete or a variant Zoetrope does not know; "
            "check the download, and report it with the output of `zoetrope inspect FILE`.")


def _place(model: nn.Module, scales: dict, device, dtypes: dict) -> None:
    """Cast each parameter to the dtype the module built it in and move it, once. fp8 weights of ops.Linear
    layers stay fp8 (with their scale); other fp8 tensors are up-cast, scaled; buffers keep their dtype."""
    import torch
    from torch import nn

    from . import ops

    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            key = f"{module_name}.{name}" if module_name else name
            scale, dtype = scales.get(key), dtypes.get(key, param.dtype)
            if isinstance(module, ops.Linear) and name == "weight" and param.dtype in ops.FP8_DTYPES:
                value = param.detach().to(device)
                module.weight_scale = None if scale is None else _scale_shape(scale, param).to(device, torch.float32)
            elif scale is not None:
                value = (param.detach().to(device, torch.float32) * _scale_shape(scale, param).to(device)).to(dtype)
            elif param.is_floating_point():
                value = param.detach().to(device, dtype)
            else:
                value = param.detach().to(device)
            grad = param.requires_grad and value.dtype not in ops.FP8_DTYPES
            module._parameters[name] = nn.Parameter(value, requires_grad=grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                # A buffer computed in __init__ is in no file; on `meta` it has no values to load.
                raise RuntimeError(f"{type(model).__name__} holds a buffer `{module_name}.{name}` that no checkpoint "
                                   "fills: compute it lazily (in forward) so that loading on `meta` works")
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _scale_shape(scale, weight):
    """A per-tensor scale as a scalar; a per-output-channel one shaped to broadcast over the weight."""
    scale = scale.float()
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *[1] * (weight.dim() - 1))
