"""Text encode, seeded video noise and the sampler: the phases of pipeline.generate(), one node each.

The sampler runs generate()'s own sampling phase (pipeline.generate.sample), so a graph and the command line
make the same video from the same seed. Wires carry ComfyUI's types: CONDITIONING [(tensor [1, L, D], {})] and
LATENT {"samples": [B, C, T, H, W]} holding raw VAE latents; the transformer's standardised latent space lives
only inside the sampler.
"""
from __future__ import annotations

import logging

from . import host
from .models import Loaded, preview_image
from .preview import sampler_preview

log = logging.getLogger("zoetrope")

SEED_MAX = 0xFFFFFFFFFFFFFFFF
SOLVER_CHOICES = ["auto", "unipc", "euler", "euler_ancestral"]


class ZoetropeTextEncode:
    DESCRIPTION = ("Encodes one prompt with a umT5 text encoder. Use one node for the prompt and one for the "
                   "negative prompt. The output is ComfyUI's CONDITIONING, so core nodes can use it too.")
    CATEGORY = "Zoetrope"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's embedding [1, tokens, width], for ZoetropeSampler's positive or negative.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("ZOETROPE_TEXT_ENCODER", {"tooltip": "From ZoetropeTextEncoderLoader."}),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "The prompt: what the video shows and how it moves. Leave empty for an "
                                           "empty negative prompt."}),
        }}

    def encode(self, text_encoder: Loaded, text: str):
        import torch
        if text_encoder.builtin and text.strip():
            unknown = text_encoder.module.tokenizer.unknown_words(text)
            if unknown:
                log.warning("Zoetrope: the built-in model does not know the words %s; it will do what it can",
                            ", ".join(repr(w) for w in unknown))
        with torch.no_grad(), text_encoder.active() as te:
            emb = te.encode([text])[0]                                      # [L, D]
        emb = emb.float().to(host.intermediate_device())[None]              # [1, L, D]
        return ([(emb, {})],)


class ZoetropeVideoNoise:
    DESCRIPTION = ("Seeded starting noise for a clip of the given size and length, shaped like the VAE's latent "
                   "(the seed draws the same noise as core ComfyUI's samplers). Sizes the model cannot take are "
                   "snapped to the nearest valid ones, with a note in the log: frames to 4k+1, width and height to "
                   "multiples of the VAE stride times 2.")
    CATEGORY = "Zoetrope"
    FUNCTION = "noise"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Noise [batch, channels, latent frames, height/stride, width/stride] for ZoetropeSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("ZOETROPE_VAE", {"tooltip": "The VAE that will decode the clip: it sets the latent geometry."}),
            "width": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8,
                              "tooltip": "Width in pixels (the built-in model: 64; Wan 2.1: 832 or 480; "
                                         "Wan 2.2 TI2V 5B: 1280 or 704)."}),
            "height": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8,
                               "tooltip": "Height in pixels (the built-in model: 64; Wan 2.1: 480; Wan 2.2 "
                                          "TI2V 5B: 704)."}),
            "frames": ("INT", {"default": 17, "min": 1, "max": 1025, "step": 1,
                               "tooltip": "Number of frames: 4k+1 (1, 5, 9, ... 81, 121); others are snapped. "
                                          "Duration = frames / fps of the save node."}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                              "tooltip": "How many clips to make at once (frames of all clips come out one after "
                                         "the other)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                             "tooltip": "The random seed: the same seed and settings make the same video."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def noise(self, vae: Loaded, width: int, height: int, frames: int, batch: int, seed: int, unique_id=None):
        from ..pipeline.generate import plan, seeded_noise
        p = plan(vae.module, frames, width, height)
        for note in p.notes:
            host.notice(note, unique_id)
        samples = seeded_noise((batch, *p.latent_shape), seed).to(host.intermediate_device())
        # The seed travels with the noise: a stochastic solver seeds the noise it adds with it.
        return ({"samples": samples, "seed": seed},)


class ZoetropeSampler:
    DESCRIPTION = ("Turns noise into a clip's latent with the transformer, guided by the prompts (flow matching, "
                   "UniPC, Euler or Euler ancestral). 0 or 'auto' in steps, cfg, shift and solver take the model's "
                   "recommended values. Connect a start image's latent (ZoetropeVAEEncode) to first_frame for "
                   "image-to-video, or a clip's latent to video with denoise below 1 for video-to-video.")
    CATEGORY = "Zoetrope"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The clip's raw latent, for ZoetropeVAEDecode (or core VAEDecode with a Wan VAE).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("ZOETROPE_MODEL", {"tooltip": "From ZoetropeModelLoader."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, from ZoetropeTextEncode."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (what to avoid), from ZoetropeTextEncode. "
                                                     "Unused at cfg 1."}),
            "latent": ("LATENT", {"tooltip": "The starting noise, from ZoetropeVideoNoise: it sets the clip's size, "
                                             "length and batch."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                              "tooltip": "Sampling steps; 0 = the model's recommendation (built-in 20, Wan 50)."}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance scale: how strongly the prompt (against the negative) steers; "
                                         "1 = no guidance (twice as fast); 0 = the model's recommendation."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                "tooltip": "Flow shift of the noise schedule: higher spends more steps at high noise "
                                           "(Wan uses 3 to 12); 0 = the model's recommendation."}),
            "solver": (SOLVER_CHOICES, {"default": "auto",
                                        "tooltip": "unipc: the official Wan solver (2nd order). euler: first order, "
                                                   "ComfyUI's flow Euler schedule. euler_ancestral: Euler that adds "
                                                   "fresh noise every step (seeded by the noise's seed), as "
                                                   "ComfyUI's euler_ancestral. auto = the model's recommendation."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 draws the clip from noise. Below 1 restyles the clip connected to "
                                             "'video', keeping more of it the lower the value."}),
            "high_noise_cfg": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 30.0, "step": 0.05, "round": 0.01,
                "tooltip": "Guidance scale for the first, noisiest steps (timestep 900 and up; Wan 2.2 A14B: "
                           "while the high-noise expert runs), where the layout is decided; 'cfg' applies after. "
                           "Below 1 lets the layout form with less pull from the prompt: the built-in model's "
                           "first-frame picture uses 0.5, which more than halves its stray extra objects. 0 = the "
                           "same as cfg; with cfg 0 too, the model's recommendation (Wan 2.2 A14B and the built-in "
                           "model guide their noisiest steps harder)."}),
        }, "optional": {
            "first_frame": ("LATENT", {"tooltip": "Image-to-video: the start image's latent from ZoetropeVAEEncode, "
                                                  "the same width and height as the noise. The clip begins on it."}),
            "video": ("LATENT", {"tooltip": "Video-to-video: a clip's latent from ZoetropeVAEEncode, the same size "
                                            "and length as the noise; use with denoise below 1."}),
            "low_noise_model": ("ZOETROPE_MODEL", {
                "tooltip": "Wan 2.2 A14B only: the low-noise expert. 'model' is then the high-noise expert; they "
                           "switch at the boundary timestep."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model: Loaded, positive, negative, latent, steps: int = 0, cfg: float = 0.0,
               shift: float = 0.0, solver: str = "auto", denoise: float = 1.0, high_noise_cfg: float = 0.0,
               first_frame=None, video=None, low_noise_model: Loaded | None = None, unique_id=None):
        import torch
        from ..pipeline import generate as gen
        from ..pipeline import sampling

        dit = model.module
        rec = model.defaults
        steps = int(steps) or int(rec["steps"])
        # Guidance below the boundary and at or above it (sampling.GUIDANCE_BOUNDARY; A14B: the experts' switch). A
        # given cfg applies throughout unless high_noise_cfg is given too; 0 takes the model's recommendation, which
        # is one scale for most models and two for A14B and the built-in model (cfg_high above the boundary).
        cfg_low = float(cfg) or float(rec.get("cfg_low", rec["cfg"]))
        cfg_high = float(high_noise_cfg) or (float(cfg) if cfg else float(rec.get("cfg_high", cfg_low)))
        shift = float(shift) or float(rec["shift"])
        solver = rec["solver"] if solver == "auto" else solver
        if solver not in sampling.SOLVERS:
            raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVER_CHOICES)}")
        if not 0.0 <= denoise <= 1.0:
            raise ValueError(f"denoise {denoise} is outside 0..1: 1 draws from noise, lower keeps more of 'video'")

        noise = _latent_samples(latent, "latent")
        fmt = model.latent
        _check_model_takes(model, noise)
        b = noise.shape[0]
        cond = conditioning_rows(positive, b, dit.config.text_dim, "positive")
        uncond = None
        if sampling.needs_uncond(cfg_low) or sampling.needs_uncond(cfg_high):
            uncond = conditioning_rows(negative, b, dit.config.text_dim, "negative")

        first_latent = None
        if first_frame is not None:
            if getattr(getattr(model.info, "variant", None), "kind", None) == "t2v":
                log.warning("Zoetrope: %s was trained for text-to-video only; a pinned first frame works best with "
                            "Wan 2.2 TI2V 5B or the built-in model", model.label)
            z = _latent_samples(first_frame, "first_frame")
            _check_same_geometry(z, noise, "first_frame", frames=False)
            first_latent = fmt.normalize(z[:, :, :1])
        init_latent = None
        if video is not None:
            z = _latent_samples(video, "video")
            _check_same_geometry(z, noise, "video", frames=True)
            init_latent = fmt.normalize(z)
            if denoise >= 1.0:
                log.warning("Zoetrope: denoise is 1, so the clip connected to 'video' is redrawn entirely; lower "
                            "denoise (e.g. 0.6) to keep some of it")
        elif denoise < 1.0:
            raise ValueError(f"denoise {denoise} restyles a clip, but nothing is connected to 'video': connect a "
                             "clip's latent from ZoetropeVAEEncode, or set denoise to 1")

        net = _Net(model)
        experts = None
        if low_noise_model is not None:
            _check_model_takes(low_noise_model, noise)
            low = _Net(low_noise_model)
            net.other, low.other = low, net
            experts = (net, low, float(rec.get("boundary", 0.875)), cfg_high, cfg_low)
        elif "boundary" in rec:
            log.warning("Zoetrope: %s is one expert of Wan 2.2 A14B; connect the other one to low_noise_model for "
                        "the full model (sampling with this expert alone)", model.label)

        denoise = denoise if video is not None else 1.0
        sigmas = sampling.sigmas_for_denoise(sampling.default_sigmas(solver, steps, shift), denoise)
        log.info("Zoetrope: sampling with %s, %d of %d steps, cfg %s, shift %g, %s", model.label, len(sigmas) - 1,
                 steps, f"{cfg_low:g}" if cfg_high == cfg_low else f"{cfg_high:g} then {cfg_low:g}", shift, solver)
        device = model.device
        to = (lambda t: None if t is None else t.to(device))
        live = sampler_preview(model, unique_id)     # the animated preview on the page (None standalone)

        def progress(step, total, x0):
            # The animated preview replaces ComfyUI's still one, which would be drawn in the same place.
            bar.update(step, None if live is not None else (lambda: preview_image(x0)))
            if live is not None:
                live(step, total, x0)

        with torch.no_grad(), host.Progress(len(sigmas) - 1, "sampling") as bar:
            try:
                x = gen.sample(
                    net, noise.to(device), [c.to(device) for c in cond],
                    None if uncond is None else [c.to(device) for c in uncond], steps=steps, cfg=cfg_low, shift=shift,
                    solver=solver, first_latent=to(first_latent), init_latent=to(init_latent), denoise=denoise,
                    experts=experts, high_noise_cfg=cfg_high,
                    boundary=float(rec.get("boundary", sampling.GUIDANCE_BOUNDARY)), seed=int(latent.get("seed", 0)),
                    progress=progress, should_stop=host.check_interrupt)
            finally:
                if live is not None:
                    live.close()
                for n in (net, *(experts[1:2] if experts else ())):
                    n.release()
        return ({"samples": fmt.denormalize(x).to(host.intermediate_device())},)


class _Net:
    """The transformer as make_denoiser sees it. It checks for Cancel before every forward pass (a guided step
    is two), and comes onto its compute device at its first call. For Wan 2.2 A14B each expert is one of these:
    the first call of one sends the `other` back first, so one 14B model is on the GPU at a time (the switch
    happens once). release() sends it back to its offload device."""

    def __init__(self, handle: Loaded):
        self.handle = handle
        self.config = handle.module.config
        self.other: _Net | None = None

    def parameters(self):
        return self.handle.module.parameters()

    def __call__(self, *args):
        from .models import move
        host.check_interrupt()
        if next(self.handle.module.parameters()).device != self.handle.device:
            if self.other is not None:
                self.other.release()
            move(self.handle.module, self.handle.device)
        return self.handle.module(*args)

    def release(self):
        from .models import move
        if self.handle.offload != self.handle.device:
            move(self.handle.module, self.handle.offload)
            host.empty_cache()


def _latent_samples(latent, name: str):
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"'{name}' must be a LATENT ({{'samples': tensor}}), got {type(latent).__name__}")
    z = latent["samples"]
    if z.ndim == 4:
        raise ValueError(f"'{name}' is an image latent {list(z.shape)} [B, C, H, W]; the sampler needs a video latent "
                         "[B, C, frames, H, W]: use ZoetropeVideoNoise or ZoetropeVAEEncode")
    if z.ndim != 5:
        raise ValueError(f"'{name}' has shape {list(z.shape)}; expected a video latent [B, C, frames, H, W]")
    return z.float()


def _check_model_takes(model: Loaded, noise) -> None:
    cfg = model.module.config
    if cfg.in_dim != cfg.out_dim:
        raise ValueError(
            f"{model.label} is an image-to-video model that takes its start image by channel concatenation "
            f"(in_dim {cfg.in_dim}); ZoetropeSampler does not drive those yet. Use Wan 2.2 TI2V 5B or the built-in "
            "model, which start from first_frame, or a text-to-video model.")
    if noise.shape[1] != cfg.out_dim:
        raise ValueError(
            f"the latent has {noise.shape[1]} channels but {model.label} samples {cfg.out_dim}: make the noise with "
            f"this model's VAE ({'Wan 2.2 VAE' if cfg.out_dim == 48 else 'Wan 2.1 VAE or the built-in VAE'})")
    _, ph, pw = cfg.patch_size
    if noise.shape[3] % ph or noise.shape[4] % pw:
        raise ValueError(f"the latent is {noise.shape[4]}x{noise.shape[3]}, not a multiple of the model's patch "
                         f"{pw}x{ph}: make the noise with ZoetropeVideoNoise, which snaps the size")


def _check_same_geometry(z, noise, name: str, frames: bool) -> None:
    """A start image must match the noise in channels, height and width; a clip to restyle also in frames."""
    dims = (1, 2, 3, 4) if frames else (1, 3, 4)
    if [z.shape[i] for i in dims] == [noise.shape[i] for i in dims] and z.shape[0] in (1, noise.shape[0]):
        return
    if frames:
        hint = "make the noise with the clip's width, height and frames (or set them on ZoetropeVAEEncode)"
    else:
        hint = ("give it the width and height of this sampler's ZoetropeVideoNoise: on ZoetropeVAEEncode (the start "
                "image is then centre-cropped and resized to fit), or on the noise of the sampler that drew the "
                "first frame")
    raise ValueError(f"'{name}' latent {list(z.shape)} [B, C, frames, H, W] does not match the noise "
                     f"{list(noise.shape)}: {hint}")


def conditioning_rows(conditioning, batch: int, width: int, name: str) -> list:
    """CONDITIONING [(tensor [B', L, D], {...}), ...] -> one [L, D] tensor per sample of the batch."""
    if not conditioning or not isinstance(conditioning, (list, tuple)):
        raise ValueError(f"'{name}' is empty; connect a CONDITIONING from ZoetropeTextEncode")
    if len(conditioning) > 1:
        log.warning("Zoetrope: '%s' holds %d conditionings; the sampler uses the first", name, len(conditioning))
    t = conditioning[0][0]
    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3 or t.shape[-1] != width:
        raise ValueError(f"'{name}' conditioning {list(t.shape)} does not fit the model, which takes text "
                         f"embeddings {width} wide: encode the prompt with this model's text encoder "
                         f"({'umT5-XXL' if width == 4096 else 'the built-in text encoder'})")
    rows = list(t.float().unbind(0))
    if len(rows) == 1:
        rows = rows * batch
    if len(rows) != batch:
        raise ValueError(f"'{name}' holds {len(rows)} prompts for a batch of {batch}; give one prompt")
    return rows
