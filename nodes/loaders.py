"""Loader nodes: a transformer, a text encoder and a VAE from ComfyUI's model folders, or the built-in model.

The checkpoint loader decides what a file is from its tensors and refuses a wrong one (a VAE in the model loader)
with a message saying which loader takes it; these nodes add the device and precision choices.
"""
from __future__ import annotations

import logging

from . import host
from .models import BUILTIN, DEVICES, PRECISIONS, Loaded, compute_dtype, latent_format, recommended, store_fp8

log = logging.getLogger("zoetrope")

PRECISION_TIP = ("Precision the weights are computed in. auto: fp32 on a CPU; on a GPU the file's own 16-bit "
                 "precision, else bf16 (fp16 on GPUs without hardware bf16, such as RTX 20xx and T4). fp8 keeps the "
                 "big layers in 8 bits (half the memory of 16 bits) and computes as auto does.")
DEVICE_TIP = ("Where the model computes. auto: ComfyUI's GPU when there is one, else the CPU. Between stages the "
              "model waits in system memory.")


def _choices(folder: str) -> list[str]:
    # Called when ComfyUI builds /object_info: a broken models folder must not take the node list down with it.
    try:
        files = host.list_models(folder)
    except Exception as e:  # noqa: BLE001 - listing is best effort; loading reports real errors
        log.warning("Zoetrope: could not list models/%s: %s", folder, e)
        files = []
    return [BUILTIN] + [f for f in files if f != BUILTIN]


def _check_choice(folder: str, name: str):
    """VALIDATE_INPUTS of the loaders: one of the listed files (outside ComfyUI also the path of any file, so that
    `zoetrope run --set` can point a loader at one). Declaring it makes ComfyUI leave the list check to us."""
    from pathlib import Path
    if name == BUILTIN or name in _choices(folder):
        return True
    if not host.in_comfyui() and Path(name).is_file():
        return True
    return (f"{name!r} is not in models/{folder}; choose one of the files listed there or 'builtin' (put the file "
            f"in the {folder} folder and refresh)")


def _file(folder: str, name: str, builtin_path):
    if name == BUILTIN:
        from ..pipeline import builtin
        builtin.require()
        return builtin_path()
    return host.model_path(folder, name)


def _facts(handle: Loaded) -> dict:
    """What the loader node shows on the page (and `zoetrope inspect` prints)."""
    info = handle.info
    variant = getattr(info, "variant", None)
    return {"name": handle.label, "family": getattr(info, "family", None), "kind": getattr(info, "kind", None),
            "variant": getattr(variant, "name", None), "precision": getattr(info, "precision", None),
            "device": str(handle.device), "file": handle.name}


def _load(kind: str, folder: str, name: str, precision: str, device: str, builtin_path) -> Loaded:
    from .. import pipeline
    from ..pipeline import checkpoints
    path = _file(folder, name, builtin_path)
    dev = host.compute_device(device)
    offload = host.offload_device(dev)
    loader = {"transformer": pipeline.load_transformer, "vae": pipeline.load_vae,
              "text_encoder": pipeline.load_text_encoder}[kind]
    # The model waits in system memory, so its default dtype is decided here for the device it computes on.
    header = checkpoints.read_header(path, kind)
    dtype = checkpoints.resolve_dtype(compute_dtype(precision), checkpoints.detect(header), dev)
    module = loader(header, device=offload, dtype=dtype)
    if precision == "fp8":
        store_fp8(module)
    handle = Loaded(module, name, dev, offload, getattr(module, "info", None))
    log.info("Zoetrope: loaded %s from %s (%s, computes on %s)", handle.label, path, dtype, dev)
    return handle


class ZoetropeModelLoader:
    DESCRIPTION = ("Loads a Wan video transformer (the diffusion model): Wan 2.1 T2V 1.3B/14B, Wan 2.2 A14B experts "
                   "or TI2V 5B, in the official, ComfyUI or diffusers layout, 16-bit or fp8; or the built-in model, "
                   "which needs no download and runs on a CPU.")
    CATEGORY = "Zoetrope/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("ZOETROPE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The transformer, with its recommended sampling settings, for ZoetropeSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_choices("diffusion_models"), {
                "tooltip": "A file from models/diffusion_models, or 'builtin' for the small model shipped with "
                           "Zoetrope (64x64 clips of shapes; use it with the builtin VAE and text encoder)."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": PRECISION_TIP}),
            "device": (list(DEVICES), {"default": "auto", "tooltip": DEVICE_TIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return _check_choice("diffusion_models", model_name)

    def load(self, model_name, precision="auto", device="auto"):
        from ..pipeline import builtin
        handle = _load("transformer", "diffusion_models", model_name, precision, device, lambda: builtin.TRANSFORMER)
        handle.latent = latent_format(handle.module, model_name)
        handle.defaults = recommended(handle.module, model_name)
        return {"ui": {"zoetrope_model": [_facts(handle)]}, "result": (handle,)}


class ZoetropeTextEncoderLoader:
    DESCRIPTION = ("Loads a umT5 text encoder with its tokenizer: umt5_xxl (fp16 or fp8 scaled) for the Wan models, "
                   "or the built-in model's own small encoder.")
    CATEGORY = "Zoetrope/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("ZOETROPE_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder, for ZoetropeTextEncode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (_choices("text_encoders"), {
                "tooltip": "A file from models/text_encoders (umt5_xxl_fp16 or umt5_xxl_fp8_e4m3fn_scaled for Wan), "
                           "or 'builtin' for the built-in model's encoder."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": PRECISION_TIP}),
            "device": (list(DEVICES), {"default": "auto", "tooltip": DEVICE_TIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_name):
        return _check_choice("text_encoders", text_encoder_name)

    def load(self, text_encoder_name, precision="auto", device="auto"):
        from ..pipeline import builtin
        handle = _load("text_encoder", "text_encoders", text_encoder_name, precision, device,
                       lambda: builtin.TEXT_ENCODER)
        return {"ui": {"zoetrope_model": [_facts(handle)]}, "result": (handle,)}


class ZoetropeVAELoader:
    DESCRIPTION = ("Loads a Wan video VAE: wan_2.1_vae for Wan 2.1 and the Wan 2.2 A14B experts, wan2.2_vae for "
                   "TI2V 5B, or the built-in model's VAE. It sets the clip geometry for ZoetropeVideoNoise.")
    CATEGORY = "Zoetrope/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("ZOETROPE_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for ZoetropeVideoNoise, ZoetropeVAEDecode and ZoetropeVAEEncode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices("vae"), {
                "tooltip": "A file from models/vae (wan_2.1_vae or wan2.2_vae), or 'builtin' for the built-in "
                           "model's VAE."}),
            "precision": (["auto", "fp32", "bf16", "fp16"], {
                "default": "auto", "tooltip": "Precision the VAE computes in. auto: fp32 on a CPU; on a GPU the "
                           "file's own 16-bit precision, else bf16 (fp16 on GPUs without hardware bf16)."}),
            "device": (list(DEVICES), {"default": "auto", "tooltip": DEVICE_TIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return _check_choice("vae", vae_name)

    def load(self, vae_name, precision="auto", device="auto"):
        from ..pipeline import builtin
        handle = _load("vae", "vae", vae_name, precision, device, lambda: builtin.VAE)
        return {"ui": {"zoetrope_model": [_facts(handle)]}, "result": (handle,)}
