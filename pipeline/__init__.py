"""Zoetrope's pure-PyTorch pipeline: the Wan family and the built-in model. Never imports ComfyUI.

Public API (a contract, called from outside):
    load_transformer(path_or_state_dict, device=None, dtype=None) -> WanModel
    load_vae(path_or_state_dict, device=None, dtype=None)         -> WanVAE
    load_text_encoder(path_or_state_dict, device=None, dtype=None) -> TextEncoder
"""
from .checkpoints import load_text_encoder, load_transformer, load_vae  # noqa: F401
