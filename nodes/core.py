"""Small standalone versions of the core ComfyUI nodes our example workflows use, so that the headless runner can
run them without ComfyUI. Same class names, inputs (and widget order) and outputs as core; written from core's
documented behaviour (comfy nodes.py LoadImage, ImageInvert, ImageScale). Inside ComfyUI the real ones are used.
"""
from __future__ import annotations

from . import host

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def _input_files() -> list[str]:
    try:
        folder = host.input_directory()
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    except OSError:
        return []


class LoadImage:
    DESCRIPTION = "Loads an image (every frame of an animated one) from the input folder, and its alpha as a mask."
    CATEGORY = "image"
    FUNCTION = "load_image"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_files(), {"image_upload": True, "tooltip": "An image file."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:
            host.input_path(image)
        except FileNotFoundError as e:
            return str(e)
        return True

    def load_image(self, image):
        import numpy as np
        import torch
        from PIL import Image, ImageOps, ImageSequence
        frames, masks = [], []
        with Image.open(host.input_path(image)) as im:
            for frame in ImageSequence.Iterator(im):
                frame = ImageOps.exif_transpose(frame)
                rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
                if frames and rgb.shape != frames[0].shape:
                    break                                   # core keeps only frames of the first frame's size
                frames.append(rgb)
                if "A" in frame.getbands():
                    masks.append(1.0 - np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0)
                else:
                    masks.append(np.zeros(rgb.shape[:2], dtype=np.float32))
        return torch.from_numpy(np.stack(frames)), torch.from_numpy(np.stack(masks))


class ImageInvert:
    DESCRIPTION = "Inverts the colours of every image."
    CATEGORY = "image/color"
    FUNCTION = "invert"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image):
        return (1.0 - image,)


class ImageScale:
    DESCRIPTION = "Resizes every image to width x height (0 keeps the aspect ratio from the other side)."
    CATEGORY = "image/upscaling"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
            "crop": (CROP_METHODS,),
        }}

    def upscale(self, image, upscale_method, width, height, crop):
        import torch
        import torch.nn.functional as F
        n, h, w, _ = image.shape
        if width == 0 and height == 0:
            return (image,)
        width = width or max(1, round(w * height / h))
        height = height or max(1, round(h * width / w))
        x = image.movedim(-1, 1)                                              # [N, 3, H, W]
        if crop == "center":
            target, source = width / height, w / h
            if source > target:
                cw = round(h * target)
                x = x[..., (w - cw) // 2:(w - cw) // 2 + cw]
            elif source < target:
                ch = round(w / target)
                x = x[..., (h - ch) // 2:(h - ch) // 2 + ch, :]
        if upscale_method == "lanczos":
            from PIL import Image
            import numpy as np
            out = [torch.from_numpy(np.asarray(Image.fromarray(
                (f.movedim(0, -1).clamp(0, 1) * 255).round().byte().numpy()).resize((width, height),
                                                                                  Image.LANCZOS),
                dtype=np.float32) / 255.0) for f in x]
            return (torch.stack(out),)
        x = F.interpolate(x, size=(height, width), mode=upscale_method)
        return (x.movedim(1, -1),)


NODE_CLASS_MAPPINGS = {"LoadImage": LoadImage, "ImageInvert": ImageInvert, "ImageScale": ImageScale}
# ComfyUI's names for them: the frontend writes these into an untitled node's _meta.title.
NODE_DISPLAY_NAME_MAPPINGS = {"LoadImage": "Load Image", "ImageInvert": "Invert Image Colors",
                              "ImageScale": "Upscale Image"}
