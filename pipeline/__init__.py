"""Zoetrope's pure-PyTorch pipeline: the Wan family and the built-in model. Never imports ComfyUI.

Public API (a contract, called from outside):
    load_transformer(path_or_state_dict, device=None, dtype=None) -> WanModel
    load_vae(path_or_state_dict, device=None, dtype=None)         -> WanVAE
    load_text_encoder(path_or_state_dict, device=None, dtype=None) -> TextEncoder
"""
_LOADERS = ("load_transformer", "load_vae", "load_text_encoder")
__all__ = list(_LOADERS)


def __getattr__(name):
    # Loaded on first use, so that importing the package (and the ComfyUI node pack) stays cheap.
    if name in _LOADERS:
        from . import checkpoints
        return getattr(checkpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
