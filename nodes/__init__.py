"""ComfyUI node classes: thin translations of widgets into pipeline calls. Importing them loads no model and
imports neither torch nor ComfyUI (see host.py)."""
from .generation import ZoetropeSampler, ZoetropeTextEncode, ZoetropeVideoNoise
from .loaders import ZoetropeModelLoader, ZoetropeTextEncoderLoader, ZoetropeVAELoader
from .save import ZoetropeSaveVideo
from .vae_nodes import ZoetropeVAEDecode, ZoetropeVAEEncode

# Class names are a contract: saved workflows refer to them.
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    ZoetropeModelLoader, ZoetropeTextEncoderLoader, ZoetropeVAELoader, ZoetropeTextEncode, ZoetropeVideoNoise,
    ZoetropeSampler, ZoetropeVAEDecode, ZoetropeVAEEncode, ZoetropeSaveVideo)}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ZoetropeModelLoader": "Zoetrope Load Model",
    "ZoetropeTextEncoderLoader": "Zoetrope Load Text Encoder",
    "ZoetropeVAELoader": "Zoetrope Load VAE",
    "ZoetropeTextEncode": "Zoetrope Text Encode",
    "ZoetropeVideoNoise": "Zoetrope Video Noise",
    "ZoetropeSampler": "Zoetrope Sampler",
    "ZoetropeVAEDecode": "Zoetrope VAE Decode",
    "ZoetropeVAEEncode": "Zoetrope VAE Encode",
    "ZoetropeSaveVideo": "Zoetrope Save Video",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
