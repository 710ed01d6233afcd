"""Flow-matching sampling for the Wan family: noise schedules, solvers and classifier-free guidance.

Conventions (flow matching, Lipman et al. 2023, on Wan's straight noise-to-data paths):
    x_sigma = (1 - sigma) * x0 + sigma * noise,  sigma in [0, 1], 1 = pure noise
    the model predicts the velocity v = noise - x0, so x0 = x_sigma - sigma * v
    the network's timestep input is t = 1000 * sigma

Schedules are small pure functions that return float64 grids ending at sigma = 0. They are float64 on purpose:
the official UniPC path truncates `sigma * 1000` to an integer timestep in float64, and a float32 sigma lands
on the other side of an integer now and then. Solvers share one signature, in the manner of k-diffusion:

    sample_x(model, x, sigmas, callback=None) -> x0

(the stochastic ones, listed in STOCHASTIC, also take `seed`).

`model(x, sigma) -> v` is the caller's closure: it gets the float32 latent and one element of `sigmas` (a
0-dim tensor of the grid's dtype), turns sigma into the network's timestep (see `timesteps`), runs the network
and applies guidance. `callback(step, total, x, x0_estimate)` runs after every step with `step` counting the
steps done (1..total); it may raise (Cancel) and the exception propagates. The solvers always step in float32,
whatever the network's dtype, as the official code does.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

# The official FlowUniPCMultistepScheduler takes its largest sigma from a float32 training grid,
# 1 - linspace(1, 1/1000, 1000)[::-1], so its schedule starts at float32(0.999) = 0.99900001287..., not at
# 0.999. The difference decides truncated timesteps: with shift 1 and 3 steps it gives 666 where 0.999 gives 665.
OFFICIAL_SIGMA_MAX = float(np.float32(0.999))


# ---------------------------------------------------------------------------------------------------------------
# Schedules

def shift_sigmas(sigmas, shift: float) -> torch.Tensor:
    """Wan's timestep shift, sigma' = shift * sigma / (1 + (shift - 1) * sigma): more steps at high noise."""
    if not shift > 0:
        raise ValueError(f"shift must be a positive number, got {shift!r}; Wan models use 3 to 12 (1 = no shift)")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    # Same operation order as the official and diffusers code, so the float64 results agree to the last bit.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def official_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The official Wan UniPC grid: linspace(0.999, 0, steps + 1)[:-1], shifted, then a final 0. [steps + 1]."""
    _check_steps(steps)
    # numpy's linspace, not torch's: they round differently in the last bit, and the official code uses numpy.
    grid = shift_sigmas(np.linspace(OFFICIAL_SIGMA_MAX, 0.0, steps + 1)[:-1], shift)
    return torch.cat([grid, grid.new_zeros(1)])


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """linspace(1, 0, steps + 1), shifted: the official DPM++ grid and ComfyUI's flow Euler grid. [steps + 1]."""
    _check_steps(steps)
    return shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift)


def sigmas_for_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of a grid for video-to-video: keep the last round(steps * denoise) steps.

    denoise 1 keeps every step (start from pure noise); denoise 0 keeps none (one sigma, no step: the input
    comes back unchanged). Start the sampler from `noise_latent(x0, noise, result[0])`.
    """
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be between 0 and 1, got {denoise!r}: 1 redraws the whole clip, "
                         "0 keeps the input as it is")
    steps = len(sigmas) - 1
    keep = math.floor(steps * denoise + 0.5)  # round half up: Python's round() would make 2.5 steps into 2
    return sigmas[steps - keep:]


def timesteps(sigmas, integer: bool) -> torch.Tensor:
    """The network's timestep input, t = 1000 * sigma.

    integer=True truncates toward zero to int64, as the official Wan schedulers (UniPC and DPM++) feed the model;
    integer=False keeps the float (ComfyUI, diffusers' flow Euler), returned as float32.
    """
    t = torch.as_tensor(sigmas).to(torch.float64) * 1000
    return t.to(torch.int64) if integer else t.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Solvers

def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """Euler on the flow ODE, dx/dsigma = v: x <- x + (sigma_next - sigma) * v.

    Exact for a straight-line flow; the final step to sigma 0 lands on the x0 estimate.
    """
    sigmas = _check_sigmas(sigmas, "sample_euler")
    s = sigmas.to(torch.float32)
    x = x.to(torch.float32)                                       # [B, C, F, H, W]
    total = len(sigmas) - 1
    for i in range(total):
        v = model(x, sigmas[i]).to(torch.float32)
        x0 = x - s[i] * v
        x = x + (s[i + 1] - s[i]) * v
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


_ANCESTRAL_SEED_OFFSET = 0x9E3779B97F4A7C15   # any large constant: seeds n and n + 1 stay far apart


def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                           seed: int = 0, eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral for flow models, as ComfyUI's `euler_ancestral` steps a flow model (k-diffusion's
    rectified-flow form): an Euler step down to sigma_down < sigma_next, then fresh noise back up to sigma_next.

    With eta 1, sigma_down = sigma_next^2 / sigma. The fresh noise lets each step revise what the steps before
    it committed to; a small model whose early guesses average several layouts (two half-objects) draws one
    object with it where an ODE solver keeps both. eta 0 is plain Euler. The noise comes from a CPU generator,
    one randn of x's shape a step, so a seed makes the same clip on any device; the generator's seed is offset
    from `seed` so that its draws are not the starting noise the same seed drew.
    """
    sigmas = _check_sigmas(sigmas, "sample_euler_ancestral")
    s = sigmas.to(torch.float32)
    x = x.to(torch.float32)                                       # [B, C, F, H, W]
    gen = torch.Generator(device="cpu").manual_seed((int(seed) + _ANCESTRAL_SEED_OFFSET) % 2 ** 63)
    total = len(sigmas) - 1
    for i in range(total):
        v = model(x, sigmas[i]).to(torch.float32)
        x0 = x - s[i] * v
        if s[i + 1] == 0:
            x = x0
        else:
            down = s[i + 1] * (1 + (s[i + 1] / s[i] - 1) * eta)
            # x at sigma_down, scaled so that its signal part matches sigma_next's (1 - sigma_next) x0; the
            # noise added makes the noise part's variance sigma_next^2 again.
            scale = (1 - s[i + 1]) / (1 - down)
            renoise = (s[i + 1] ** 2 - (down * scale) ** 2).clamp_min(0).sqrt()
            x = scale * (x + (down - s[i]) * v)
            x = x + renoise * torch.randn(x.shape, generator=gen).to(x.device)
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


def sample_unipc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 order: int = 2) -> torch.Tensor:
    """UniPC, the unified predictor-corrector multistep solver (Zhao et al. 2023, "UniPC: A Unified
    Predictor-Corrector Framework for Fast Sampling of Diffusion Models"), in the configuration Wan samples with:
    data (x0) prediction, B(h) = e^h - 1 ("bh2"), multistep order `order` with a warm-up from order 1, lower
    order on the final steps, and a final sigma of 0.

    Each step evaluates the model once. That evaluation first corrects the sample the previous step predicted
    (UniC, free of extra evaluations), then predicts the next sample from the last `order` x0 estimates (UniP).
    Follows the official Wan FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py), itself diffusers'
    UniPCMultistepScheduler with alpha = 1 - sigma; the step arithmetic is float32 like theirs.
    """
    sigmas = _check_sigmas(sigmas, "sample_unipc")
    if order < 1:
        raise ValueError(f"UniPC order must be 1 or more, got {order!r}; Wan uses 2")
    s = sigmas.to(torch.float32)
    if s[0] >= 1:
        # log(alpha) is -inf at sigma 1; nudge the solver's copy off it as diffusers does. The model still sees 1.
        s = s.clone()
        s[0] = 1 - 1e-6
    x = x.to(torch.float32)                                       # [B, C, F, H, W]
    total = len(sigmas) - 1
    x0s: list[torch.Tensor] = []   # x0 estimate of every step so far, newest last
    last_x = None                  # the sample the previous predictor started from
    last_order = 0
    for i in range(total):
        v = model(x, sigmas[i]).to(torch.float32)
        x0 = x - s[i] * v
        if i > 0:
            # UniC: with x0 at sigma_i known, redo the last step from last_x at one order higher.
            history = x0s[::-1][:last_order]
            x = _unipc_update(last_x, s, i - 1, i, history, x0_t=x0)
        x0s.append(x0)
        # Warm up from order 1 while history is short; drop to lower orders on the last steps, where the
        # log-SNR gaps grow (the final one is infinite) and high-order extrapolation is unstable.
        step_order = min(order, i + 1, total - i)
        last_x, last_order = x, step_order
        x = _unipc_update(x, s, i, i + 1, x0s[::-1][:step_order])
        if len(x0s) > order:
            x0s.pop(0)
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


def _unipc_update(x: torch.Tensor, s: torch.Tensor, i0: int, i1: int, history: list[torch.Tensor],
                  x0_t: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC bh2 update of x from s[i0] to s[i1] in data prediction.

    history: x0 estimates at s[i0], s[i0 - 1], ... (newest first). Without x0_t this is the predictor UniP of
    order len(history); with x0_t (the estimate at s[i1]) it is the corrector UniC of that order.
    """
    sigma_0, sigma_t = s[i0], s[i1]
    m0 = history[0]
    if sigma_t == 0 and x0_t is None and len(history) == 1:
        # First order to sigma 0 is the x0 estimate itself (h is infinite there).
        return m0
    alpha_0, alpha_t = 1 - sigma_0, 1 - sigma_t
    lam_0 = torch.log(alpha_0) - torch.log(sigma_0)             # log signal-to-noise ratio
    h = torch.log(alpha_t) - torch.log(sigma_t) - lam_0
    # Difference quotients of the older estimates, at their relative log-SNR positions r_k.
    rks, ds = [], []
    for k in range(1, len(history)):
        sigma_k = s[i0 - k]
        rk = (torch.log(1 - sigma_k) - torch.log(sigma_k) - lam_0) / h
        rks.append(rk)
        ds.append((history[k] - m0) / rk)
    if x0_t is not None:
        rks.append(torch.ones_like(h))
        ds.append(x0_t - m0)

    hh = -h                          # data prediction integrates in -h
    h_phi_1 = torch.expm1(hh)        # h * phi_1(h)
    b_h = h_phi_1                    # "bh2" takes B(h) = e^h - 1, the same quantity
    x_t = sigma_t / sigma_0 * x - alpha_t * h_phi_1 * m0
    if not ds:
        return x_t
    n = len(ds)
    if n == 1:
        rhos = [0.5]                 # the paper's choice for one term, as in the reference code
    else:
        # Solve sum_k rho_k r_k^(j-1) = b_j (j = 1..n), b_j = j! * h*phi_{j+1}(h) / B(h).
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b = []
        for j in range(1, n + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r = torch.stack(rks)
        vandermonde = torch.stack([r ** (j - 1) for j in range(1, n + 1)])
        rhos = list(torch.linalg.solve(vandermonde, torch.stack(b)).to(x.dtype))
    residual = sum(rho * d for rho, d in zip(rhos, ds))
    return x_t - alpha_t * b_h * residual


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"unipc": sample_unipc, "euler": sample_euler,
                                                  "euler_ancestral": sample_euler_ancestral}
# Solvers that draw noise as they go: they take a `seed` keyword.
STOCHASTIC = frozenset({"euler_ancestral"})

# Each solver's grid in the reference code it follows: the official UniPC schedule; ComfyUI's flow Euler.
DEFAULT_SCHEDULES: dict[str, Callable[[int, float], torch.Tensor]] = {
    "unipc": official_sigmas, "euler": flow_sigmas, "euler_ancestral": flow_sigmas}


def default_sigmas(solver: str, steps: int, shift: float) -> torch.Tensor:
    """The sigma grid `solver` is used with by default: official_sigmas for "unipc", flow_sigmas for the Eulers."""
    if solver not in DEFAULT_SCHEDULES:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(DEFAULT_SCHEDULES)}")
    return DEFAULT_SCHEDULES[solver](steps, shift)


# ---------------------------------------------------------------------------------------------------------------
# Guidance, starting latents, experts, per-token timesteps

def needs_uncond(cfg: float) -> bool:
    """Whether guidance at this scale needs the unconditional (negative prompt) pass. Check it before running
    the network a second time: at cfg 1 the guided velocity is the conditional one, so the pass is wasted."""
    return cfg != 1.0


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    """Classifier-free guidance, v = v_uncond + cfg * (v_cond - v_uncond). v_uncond may be None at cfg 1."""
    if not needs_uncond(cfg):
        return v_cond
    if v_uncond is None:
        raise ValueError(f"guidance scale {cfg} needs the unconditional velocity, got None; run the negative "
                         "prompt when needs_uncond(cfg) is true")
    return v_uncond + cfg * (v_cond - v_uncond)


def noise_latent(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x0 noised to level sigma along the flow, (1 - sigma) * x0 + sigma * noise: the video-to-video start."""
    sigma = float(sigma)
    return (1 - sigma) * x0.to(torch.float32) + sigma * noise.to(torch.float32)


# Where guidance switches to `high_noise_cfg` for a single model: the boundary Wan 2.2 A14B's image-to-video experts
# switch at. The A14B models use their own (config.py).
GUIDANCE_BOUNDARY = 0.9


def expert_for(t, boundary: float) -> str:
    """Which Wan 2.2 A14B expert denoises at timestep t (0..1000): "high" when t >= boundary * 1000, else "low".

    Pass the timestep the network receives (`timesteps(sigma, integer=True)` on the official path), not sigma.
    """
    return "high" if float(t) >= boundary * 1000 else "low"


def expert_switch_step(sigmas: torch.Tensor, boundary: float, integer: bool = True) -> int:
    """How many steps of the grid the high-noise expert runs before the low-noise one takes over.

    Steps [0, n) go to "high" and [n, steps) to "low"; n = 0 or n = steps when one expert does everything.
    """
    t = timesteps(sigmas[:-1], integer)
    low = (t.to(torch.float64) < boundary * 1000).nonzero()
    return int(low[0]) if len(low) else len(t)


def token_timesteps(t, frame_mask: torch.Tensor, patch: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """Per-token timesteps [B, L] for a latent with pinned, clean positions (Wan 2.2 TI2V image-to-video).

    frame_mask: [B, F, H, W] or [F, H, W], 0 on pinned latent positions and 1 elsewhere. It is sampled at
    the patch stride and flattened in the transformer's token order (f, h, w), so a pinned token gets timestep
    0 and every other one t (a scalar or [B]). Follows Wan 2.2's textimage2video.py.
    """
    if frame_mask.dim() == 3:
        frame_mask = frame_mask[None]
    if frame_mask.dim() != 4:
        raise ValueError(f"frame_mask must be [B, F, H, W] or [F, H, W] latent positions, got shape "
                         f"{tuple(frame_mask.shape)}; pass the latent mask without its channel dimension")
    pf, ph, pw = patch
    tokens = frame_mask[:, ::pf, ::ph, ::pw].flatten(1).to(torch.float32)   # [B, L]
    t = torch.as_tensor(t, device=tokens.device).to(torch.float32).reshape(-1, 1)  # [B or 1, 1]
    return tokens * t                                                        # [B, L]


# ---------------------------------------------------------------------------------------------------------------
# Checks

def _check_steps(steps: int) -> None:
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")


def _check_sigmas(sigmas, solver: str) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1 or len(sigmas) < 1 or not sigmas.is_floating_point():
        raise ValueError(f"{solver} needs a 1-D float tensor of sigmas (steps + 1 values, ending at 0), got "
                         f"shape {tuple(sigmas.shape)} {sigmas.dtype}; build one with official_sigmas or flow_sigmas")
    if len(sigmas) > 1 and not (bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[0] <= 1 and sigmas[-1] >= 0):
        raise ValueError(f"{solver} needs sigmas that fall strictly from at most 1 to 0, got "
                         f"{sigmas.tolist()}; build them with official_sigmas or flow_sigmas")
    return sigmas
