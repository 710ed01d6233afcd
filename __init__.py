"""Zoetrope: text-to-video nodes for ComfyUI.

ComfyUI imports this folder as a custom node pack; `pip install -e .` makes it the package `zoetrope`.
Importing it must stay cheap: no model is loaded and no GPU is touched until a node runs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
