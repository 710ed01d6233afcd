"""VAE decode (LATENT -> IMAGE frames, optionally in spatial tiles) and encode (IMAGE frames -> LATENT)."""
from __future__ import annotations

import logging

from . import host
from .models import Loaded

log = logging.getLogger("zoetrope")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size) with at least `overlap` shared between neighbours;
    the last tile is aligned to the end (it may overlap more)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, fade: int, before: bool, after: bool):
    """Blend weights along one axis of a tile: rising over `fade` samples where a neighbour comes before, falling
    where one comes after, 1 elsewhere. Never 0, so every output pixel has weight."""
    import torch
    w = torch.ones(n)
    fade = min(fade, n)
    if fade > 0:
        rise = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if before:
            w[:fade] = torch.minimum(w[:fade], rise)
        if after:
            w[n - fade:] = torch.minimum(w[n - fade:], rise.flip(0))
    return w


def decode_tiled(vae, z, tile: int, overlap: int, callback=None):
    """Decode a raw latent [B, C, T, h, w] tile by tile in space (tile and overlap in latent pixels), blending
    the overlaps with linear ramps. Peak memory is that of one tile's decode plus the output video on the CPU.

    The decoder's receptive field reaches past a tile, so seams differ slightly from one whole decode; the
    overlap hides them. Returns [B, 3, T', h*s, w*s] float32 on the CPU, like vae.decode.
    """
    import torch
    h, w = z.shape[-2:]
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    s = vae.spatial_compression
    out = weight = None
    total = len(ys) * len(xs)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part_cb = None
            if callback is not None:
                index = i * len(xs) + j
                part_cb = (lambda done, n, index=index: callback(index * n + done, total * n))
            part = vae.decode(z[..., y0:y0 + tile, x0:x0 + tile], callback=part_cb).float().cpu()  # [B, 3, T, H, W]
            if out is None:
                out = torch.zeros(*part.shape[:3], h * s, w * s)
                weight = torch.zeros(h * s, w * s)
            ph, pw = part.shape[-2:]
            wy = _ramp(ph, overlap * s, i > 0, i < len(ys) - 1)
            wx = _ramp(pw, overlap * s, j > 0, j < len(xs) - 1)
            mask = wy[:, None] * wx[None, :]                                                   # [H, W]
            out[..., y0 * s:y0 * s + ph, x0 * s:x0 * s + pw] += part * mask
            weight[y0 * s:y0 * s + ph, x0 * s:x0 * s + pw] += mask
    return out / weight


class ZoetropeVAEDecode:
    DESCRIPTION = ("Decodes a clip's latent into IMAGE frames. For big clips on a small GPU, set tile_size to decode "
                   "in overlapping spatial tiles: peak memory then follows the tile, not the frame.")
    CATEGORY = "Zoetrope"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The frames [frames, height, width, 3] in 0..1: any image node takes them.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("ZOETROPE_VAE", {"tooltip": "The VAE the latent belongs to (the one that made the noise)."}),
            "latent": ("LATENT", {"tooltip": "A clip's latent, from ZoetropeSampler."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32,
                                  "tooltip": "0 decodes whole frames. Otherwise the tile's side in pixels (e.g. 256): "
                                             "less memory, slightly visible seams if the overlap is too small."}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                                "tooltip": "Pixels shared by neighbouring tiles, blended smoothly. Used only with "
                                           "tiling."}),
        }}

    def decode(self, vae: Loaded, latent, tile_size: int = 0, overlap: int = 64):
        import torch
        from ..pipeline.generate import video_to_frames
        z = latent["samples"]
        if z.ndim == 4:                      # a core image latent [B, C, H, W] is one frame
            z = z[:, :, None]
        m = vae.module
        if z.ndim != 5 or z.shape[1] != m.z_dim:
            raise ValueError(
                f"the latent {list(z.shape)} has {z.shape[1] if z.ndim == 5 else '?'} channels but {vae.label} decodes "
                f"{m.z_dim}: decode with the VAE that made the noise (Wan 2.2 TI2V 5B latents need the Wan 2.2 VAE)")
        s = m.spatial_compression
        tile = tile_size // s
        fade = overlap // s
        tiled = tile_size > 0 and (tile < z.shape[-2] or tile < z.shape[-1])
        if tiled and (tile < 2 or fade >= tile):
            raise ValueError(f"tile_size {tile_size} must be larger than overlap {overlap} and at least {2 * s} pixels "
                             f"(this VAE's stride is {s}); or set tile_size to 0 to decode whole frames")
        n_tiles = len(tile_starts(z.shape[-2], tile, fade)) * len(tile_starts(z.shape[-1], tile, fade)) if tiled else 1
        with torch.no_grad(), host.Progress(z.shape[2] * n_tiles, "decoding") as bar, vae.active() as net:
            def callback(done, total):
                bar.update(done)
            if tiled:
                video = decode_tiled(net, z, tile, fade, callback)
            else:
                video = net.decode(z, callback=callback)
        return (video_to_frames(video).to(host.intermediate_device()),)


class ZoetropeVAEEncode:
    DESCRIPTION = ("Encodes IMAGE frames into a latent: one image for image-to-video (ZoetropeSampler's first_frame) "
                   "or a batch of frames for video-to-video (its 'video'). Frames are trimmed to 4k+1; width and "
                   "height are snapped to what the VAE takes, and an image of another aspect ratio is centre-cropped "
                   "(both logged).")
    CATEGORY = "Zoetrope"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The raw latent [1, channels, latent frames, height/stride, width/stride].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("ZOETROPE_VAE", {"tooltip": "The VAE of the model that will sample (the one that makes the noise)."}),
            "image": ("IMAGE", {"tooltip": "One image (a start frame) or a batch of frames (a clip)."}),
            "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                              "tooltip": "Resize to this width first (set it to the noise's width for "
                                         "image-to-video); 0 keeps the image's own width."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                               "tooltip": "Resize to this height first; 0 keeps the image's own height."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, vae: Loaded, image, width: int = 0, height: int = 0, unique_id=None):
        import torch
        from ..pipeline.generate import fit_video, frames_to_video, plan
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"image {list(image.shape)} is not an IMAGE [frames, height, width, 3]")
        image = image[..., :3].float()
        m = vae.module
        t = image.shape[0]
        frames = 1 + m.temporal_compression * ((t - 1) // m.temporal_compression)
        if frames != t:
            host.notice(f"{t} frames -> {frames} (the VAE takes {m.temporal_compression}k+1 frames; the last "
                        f"{t - frames} dropped)", unique_id)
        p = plan(m, frames, width or image.shape[2], height or image.shape[1])
        for note in p.notes:
            host.notice(note, unique_id)
        clip = fit_video(image[:frames], p)                                      # [T, H, W, 3]
        with torch.no_grad(), host.Progress(p.latent_shape[1], "encoding") as bar, vae.active() as net:
            z = net.encode(frames_to_video(clip), callback=lambda done, total: bar.update(done))
        return ({"samples": z.float().to(host.intermediate_device())},)
