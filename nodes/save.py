"""The save node: frames to mp4 / webm / animated webp / gif, with the workflow inside the file."""
from __future__ import annotations

import logging

from . import host

log = logging.getLogger("zoetrope")

FORMATS = ["mp4", "webm", "webp", "gif"]


class ZoetropeSaveVideo:
    DESCRIPTION = ("Saves frames as a video in ComfyUI's output folder and plays it on the node. mp4 (H.264) and "
                   "webm (VP9) carry the prompt and the workflow, so dropping the file on ComfyUI restores the "
                   "graph. An existing file is never overwritten.")
    CATEGORY = "Zoetrope"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    RETURN_NAMES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The frames, from ZoetropeVAEDecode or any image node."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                              "tooltip": "Frames per second (the built-in model: 8; Wan 2.1: 16; Wan 2.2 TI2V 5B: 24)."}),
            "format": (FORMATS, {"default": "mp4",
                                 "tooltip": "mp4 (H.264, plays everywhere), webm (VP9), webp or gif (animated "
                                            "images)."}),
            "crf": ("INT", {"default": 19, "min": 0, "max": 63,
                            "tooltip": "Quality of mp4/webm: lower is better and larger (0 lossless for webm; 17-23 "
                                       "looks clean in H.264)."}),
            "filename_prefix": ("STRING", {"default": "Zoetrope/video",
                                           "tooltip": "File name start, inside the output folder; may hold "
                                                      "subfolders ('videos/cat'). A counter is appended."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, frames, fps: float = 16.0, format: str = "mp4", crf: int = 19,
             filename_prefix: str = "Zoetrope/video", prompt=None, extra_pnginfo=None):
        from ..pipeline.video_io import write_video
        if format not in FORMATS:
            raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] < 3:
            raise ValueError(f"frames {list(frames.shape)} are not an IMAGE [frames, height, width, 3]")
        if format == "mp4" and crf > 51:
            raise ValueError(f"crf {crf} is out of H.264's range 0..51; choose 0-51 for mp4 (webm goes to 63)")
        frames = frames[..., :3]
        folder, stem, counter, subfolder = host.save_path(filename_prefix, frames.shape[2], frames.shape[1])
        metadata = None
        if host.metadata_enabled():
            metadata = {}
            if prompt is not None:
                metadata["prompt"] = prompt
            if isinstance(extra_pnginfo, dict):
                metadata.update(extra_pnginfo)
        host.check_interrupt()
        path = write_video(frames, folder / f"{stem}_{counter:05}_.{format}", fps=fps, crf=crf, metadata=metadata)
        log.info("Zoetrope: saved %s (%d frames, %dx%d, %g fps)", path, frames.shape[0], frames.shape[2],
                 frames.shape[1], fps)
        return {"ui": {"images": [{"filename": path.name, "subfolder": subfolder, "type": "output"}],
                       "animated": (True,)}}
