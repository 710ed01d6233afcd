"""Schedules and solvers against diffusers' schedulers (the official Wan UniPC is a port of diffusers' UniPC),
plus properties of flow matching that hold whatever the numbers."""
import math

import numpy as np
import pytest
import torch

from zoetrope.pipeline import sampling

diffusers = pytest.importorskip("diffusers")

STEPS = (1, 2, 3, 10, 50)
SHIFTS = (1.0, 3.0, 5.0, 8.0)


def official_sigma_max() -> float:
    """The largest sigma of the official FlowUniPCMultistepScheduler, rebuilt the way its __init__ builds it:
    a float32 tensor of 1 - alphas with alphas = linspace(1, 1/1000, 1000) reversed, read back with .item()."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    return torch.from_numpy(1.0 - alphas).to(torch.float32)[0].item()


def diffusers_unipc(steps, shift, order=2, first_sigma=None):
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    first = official_sigma_max() if first_sigma is None else first_sigma
    sched.set_timesteps(sigmas=np.linspace(first, 0, steps + 1)[:-1])
    return sched


def toy_model(seed=0, channels=4):
    """A deterministic, nonlinear flow: x0_hat(x) = 0.5 tanh(W x) + 0.1 over channels, v = (x - x0_hat) / sigma,
    so x0 = x - sigma * v is the map's output. Sigma is read as float32, the precision the schedulers keep."""
    w = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed)) * 0.7
    calls = []

    def model(x, sigma):
        calls.append(sigma)
        s = torch.as_tensor(sigma).to(torch.float32)
        x0 = 0.5 * torch.tanh(torch.einsum("oc,bc...->bo...", w, x)) + 0.1
        return (x - x0) / s
    model.calls = calls
    return model


def start_latent(seed=1):
    return torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(seed))  # [B, C, F, H, W]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def trajectory(solver, model, x, sigmas, **kw):
    steps = []
    out = solver(model, x, sigmas, callback=lambda i, n, x_i, x0: steps.append(x_i), **kw)
    return out, steps


# --- 1. schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_official_sigmas_and_integer_timesteps_match_diffusers(steps, shift):
    sched = diffusers_unipc(steps, shift)
    ours = sampling.official_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and len(ours) == steps + 1 and ours[-1] == 0
    assert torch.equal(ours.to(torch.float32), sched.sigmas)
    ts = sampling.timesteps(ours[:-1], integer=True)
    assert ts.dtype == torch.int64
    assert torch.equal(ts, sched.timesteps)


def test_official_grid_starts_at_float32_0999():
    # With a plain float64 0.999, 3 steps at shift 1 would truncate 0.666 * 1000 to 665; the official grid gives 666.
    assert sampling.OFFICIAL_SIGMA_MAX == official_sigma_max()
    ts = sampling.timesteps(sampling.official_sigmas(3, 1.0)[:-1], integer=True)
    assert ts.tolist() == [999, 666, 333]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_sigmas_is_shifted_linspace_to_zero(steps, shift):
    s = sampling.flow_sigmas(steps, shift)
    u = np.linspace(1, 0, steps + 1)
    assert torch.equal(s, torch.from_numpy(shift * u / (1 + (shift - 1) * u)))
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())


def test_shift_one_is_identity_and_float_timesteps():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(sampling.shift_sigmas(u, 1.0), u)
    t = sampling.timesteps(u, integer=False)
    assert t.dtype == torch.float32 and torch.allclose(t, (u * 1000).float())
    with pytest.raises(ValueError, match="shift"):
        sampling.shift_sigmas(u, 0.0)


def test_default_sigmas():
    assert torch.equal(sampling.default_sigmas("unipc", 7, 5.0), sampling.official_sigmas(7, 5.0))
    assert torch.equal(sampling.default_sigmas("euler", 7, 5.0), sampling.flow_sigmas(7, 5.0))
    assert set(sampling.SOLVERS) == set(sampling.DEFAULT_SCHEDULES)
    with pytest.raises(ValueError, match="unknown solver"):
        sampling.default_sigmas("heun", 7, 5.0)


# --- 2. UniPC against diffusers --------------------------------------------------------------------------------

@pytest.mark.parametrize("order", (1, 2, 3))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_trajectory_matches_diffusers(order, steps, shift):
    model, x = toy_model(), start_latent()
    ours, ours_steps = trajectory(sampling.sample_unipc, model, x, sampling.official_sigmas(steps, shift), order=order)

    sched = diffusers_unipc(steps, shift, order)
    ref, ref_steps = x.clone(), []
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(model(ref, sched.sigmas[i]), t, ref).prev_sample
        ref_steps.append(ref)

    assert len(ours_steps) == len(ref_steps) == steps
    for a, b in zip(ours_steps, ref_steps):
        assert rel_err(a, b) <= 1e-6
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("steps", (2, 10))
def test_unipc_from_sigma_one_matches_diffusers(steps):
    # Starting at exactly 1 (flow_sigmas) both nudge the solver's sigma off 1, where log(1 - sigma) is -inf.
    model, x = toy_model(), start_latent()
    ours = sampling.sample_unipc(model, x, sampling.flow_sigmas(steps, 5.0))
    sched = diffusers_unipc(steps, 5.0, first_sigma=1.0)
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(model(ref, sched.sigmas[i]), t, ref).prev_sample
    assert torch.isfinite(ours).all()
    # diffusers' model also sees the nudged sigma (1 - 1e-6) where ours sees 1.
    assert rel_err(ours, ref) <= 2e-6


# --- 3. Euler against diffusers --------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", (sampling.flow_sigmas, sampling.official_sigmas))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_trajectory_matches_diffusers(grid, steps, shift):
    model, x = toy_model(), start_latent()
    sigmas = grid(steps, shift)
    ours, ours_steps = trajectory(sampling.sample_euler, model, x, sigmas)

    # Explicit sigmas without the final 0 (the scheduler appends it), and shift 1 so it does not shift them again.
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    sched.set_begin_index(0)
    assert torch.equal(sched.sigmas, sigmas.to(torch.float32))
    ref, ref_steps = x.clone(), []
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(model(ref, sched.sigmas[i]), t, ref).prev_sample
        ref_steps.append(ref)

    for a, b in zip(ours_steps, ref_steps):
        assert torch.equal(a, b)
    assert torch.equal(ours, ref)


# --- 4. properties ---------------------------------------------------------------------------------------------

def straight_flow(x0, noise):
    """The exact velocity field of the straight line from x0 to noise."""
    return lambda x, sigma: noise - x0


@pytest.mark.parametrize("solver", ("euler", "unipc"))
@pytest.mark.parametrize("steps", STEPS)
def test_exact_velocity_of_a_straight_flow_recovers_x0(solver, steps):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    sigmas = sampling.default_sigmas(solver, steps, 5.0)
    x = sampling.noise_latent(x0, noise, sigmas[0])
    out = sampling.SOLVERS[solver](straight_flow(x0, noise), x, sigmas)
    assert torch.allclose(out, x0, atol=1e-5)


def test_one_euler_step_from_any_sigma_lands_on_x0():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    for sigma in (1.0, 0.7, 0.2):
        sigmas = torch.tensor([sigma, 0.0], dtype=torch.float64)
        out = sampling.sample_euler(straight_flow(x0, noise), sampling.noise_latent(x0, noise, sigma), sigmas)
        assert torch.allclose(out, x0, atol=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("denoise", (0.0, 0.25, 0.5, 0.7, 1.0))
def test_sigmas_for_denoise_keeps_the_tail(steps, denoise):
    sigmas = sampling.official_sigmas(steps, 5.0)
    tail = sampling.sigmas_for_denoise(sigmas, denoise)
    keep = math.floor(steps * denoise + 0.5)
    assert len(tail) == keep + 1
    assert torch.equal(tail, sigmas[len(sigmas) - len(tail):])
    if denoise == 1.0:
        assert torch.equal(tail, sigmas)
    with pytest.raises(ValueError, match="denoise"):
        sampling.sigmas_for_denoise(sigmas, 1.5)


@pytest.mark.parametrize("solver", tuple(sampling.SOLVERS))
def test_denoise_zero_returns_the_input(solver):
    x, model = start_latent(), toy_model()
    tail = sampling.sigmas_for_denoise(sampling.default_sigmas(solver, 10, 5.0), 0.0)
    out = sampling.SOLVERS[solver](model, x, tail, callback=lambda *a: pytest.fail("no step to report"))
    assert torch.equal(out, x) and not model.calls


@pytest.mark.parametrize("solver", tuple(sampling.SOLVERS))
def test_callback_every_step_and_its_exception_propagates(solver):
    seen = []
    sampling.SOLVERS[solver](toy_model(), start_latent(), sampling.default_sigmas(solver, 6, 3.0),
                             callback=lambda i, n, x, x0: seen.append((i, n, x.shape, x0.shape)))
    assert [(i, n) for i, n, _, _ in seen] == [(i, 6) for i in range(1, 7)]
    assert all(a == b == start_latent().shape for _, _, a, b in seen)

    class Cancelled(Exception):
        pass

    def cancel_at_two(i, n, x, x0):
        if i == 2:
            raise Cancelled

    model = toy_model()
    with pytest.raises(Cancelled):
        sampling.SOLVERS[solver](model, start_latent(), sampling.default_sigmas(solver, 6, 3.0), callback=cancel_at_two)
    assert len(model.calls) == 2


@pytest.mark.parametrize("solver", tuple(sampling.SOLVERS))
def test_model_sees_the_grid_sigma_and_the_result_is_float32(solver):
    sigmas = sampling.default_sigmas(solver, 4, 5.0)
    model = toy_model()

    def low_precision_model(x, sigma):
        assert x.dtype == torch.float32
        return model(x, sigma).to(torch.bfloat16)
    out = sampling.SOLVERS[solver](low_precision_model, start_latent().to(torch.bfloat16), sigmas)
    assert out.dtype == torch.float32
    assert [s.dtype for s in model.calls] == [torch.float64] * 4
    assert torch.equal(torch.stack(model.calls), sigmas[:-1])


def gaussian_data_velocity(c: float):
    """The exact velocity E[noise - x0 | x_sigma] when the data is N(0, c^2): x_sigma is then N(0, (1-s)^2 c^2 + s^2)
    and both x0 and the noise are linear in it."""
    def v(x, sigma):
        s = float(sigma)
        return (s - (1 - s) * c ** 2) / ((1 - s) ** 2 * c ** 2 + s ** 2) * x
    return v


def test_euler_ancestral_draws_the_data_distribution_from_the_exact_velocity():
    # A stochastic solver is right when its samples have the data's spread: too much fresh noise or a wrong
    # rescaling of the Euler part shows up as a wrong standard deviation (measured: 2.7 and 0.69 for such slips).
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    out = sampling.sample_euler_ancestral(gaussian_data_velocity(0.5), x, sampling.flow_sigmas(300, 1.0), seed=1)
    assert abs(out.std().item() - 0.5) < 0.01 and abs(out.mean().item()) < 0.01
    # Fresh noise every step: the result no longer depends on the starting noise, as an ODE solver's does.
    assert abs(torch.corrcoef(torch.stack([out, x]))[0, 1].item()) < 0.05


def test_euler_ancestral_is_seeded_and_at_eta_zero_is_euler():
    model, x, sigmas = toy_model(), start_latent(), sampling.flow_sigmas(8, 3.0)
    a = sampling.sample_euler_ancestral(model, x, sigmas, seed=7)
    assert torch.equal(a, sampling.sample_euler_ancestral(model, x, sigmas, seed=7))
    assert not torch.allclose(a, sampling.sample_euler_ancestral(model, x, sigmas, seed=8))
    assert torch.allclose(sampling.sample_euler_ancestral(model, x, sigmas, seed=7, eta=0.0),
                          sampling.sample_euler(model, x, sigmas), atol=1e-6)


def test_solvers_reject_a_bad_grid():
    for bad in (torch.tensor([0.0, 0.5, 1.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([1.5, 0.0])):
        with pytest.raises(ValueError, match="sigmas"):
            sampling.sample_euler(toy_model(), start_latent(), bad)
    with pytest.raises(ValueError, match="order"):
        sampling.sample_unipc(toy_model(), start_latent(), sampling.official_sigmas(3, 5.0), order=0)


def test_guidance():
    g = torch.Generator().manual_seed(5)
    c, u = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    assert not sampling.needs_uncond(1.0) and sampling.needs_uncond(5.0) and sampling.needs_uncond(0.0)
    assert torch.equal(sampling.guided(c, u, 1.0), c)
    assert torch.equal(sampling.guided(c, None, 1.0), c)
    assert torch.allclose(sampling.guided(c, u, 0.0), u)
    # Linear in cfg: halfway between the unconditional and twice-extrapolated velocities.
    assert torch.allclose(sampling.guided(c, u, 3.0), (sampling.guided(c, u, 1.0) + sampling.guided(c, u, 5.0)) / 2)
    with pytest.raises(ValueError, match="unconditional"):
        sampling.guided(c, None, 5.0)


def test_noise_latent_ends():
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    assert torch.equal(sampling.noise_latent(x0, noise, 0.0), x0)
    assert torch.equal(sampling.noise_latent(x0, noise, torch.tensor(1.0, dtype=torch.float64)), noise)
    assert torch.allclose(sampling.noise_latent(x0, noise, 0.25), x0 + 0.25 * (noise - x0))


def test_expert_switch():
    assert sampling.expert_for(875, 0.875) == "high" and sampling.expert_for(874, 0.875) == "low"
    for steps, shift, boundary in ((40, 12.0, 0.875), (40, 5.0, 0.9), (10, 1.0, 0.875), (3, 1.0, 0.0), (3, 1.0, 1.0)):
        sigmas = sampling.official_sigmas(steps, shift)
        n = sampling.expert_switch_step(sigmas, boundary)
        ts = sampling.timesteps(sigmas[:-1], integer=True)
        assert [sampling.expert_for(t, boundary) for t in ts] == ["high"] * n + ["low"] * (steps - n)


def test_high_noise_cfg_guides_the_steps_at_and_above_the_boundary():
    """sample(high_noise_cfg=...) guides with it while the timestep is at or above GUIDANCE_BOUNDARY, and with cfg
    after. A net whose conditional velocity is 1 and unconditional 0 moves each Euler step by its guidance scale."""
    from zoetrope.pipeline.generate import sample

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context):
            return torch.stack([torch.full_like(x[0], float(c[0, 0])) for c in context])

    cond, uncond, noise = [torch.ones(2, 4)], [torch.zeros(2, 4)], torch.zeros(1, 2, 1, 2, 2)
    sigmas = sampling.default_sigmas("euler", 10, 8.0)
    high = sampling.timesteps(sigmas[:-1], integer=False) >= sampling.GUIDANCE_BOUNDARY * 1000
    assert 0 < int(high.sum()) < 10
    moved = sigmas[1:] - sigmas[:-1]
    for high_noise_cfg, scales in ((0.5, torch.where(high, 0.5, 3.0)), (None, torch.full_like(moved, 3.0)),
                                   (3.0, torch.full_like(moved, 3.0))):
        out = sample(Net(), noise, cond, uncond, steps=10, cfg=3.0, shift=8.0, solver="euler",
                     high_noise_cfg=high_noise_cfg)
        assert torch.allclose(out, torch.full_like(out, float((moved * scales).sum())), atol=1e-6)


def test_token_timesteps_follow_the_patch_grid():
    b, f, h, w = 2, 3, 4, 6
    mask = torch.ones(b, f, h, w)
    mask[:, 0] = 0                     # the pinned first latent frame
    mask[1, 2, 2:, :2] = 0             # and a patch of the second sample, to see the (f, h, w) order
    t = torch.tensor([500.0, 250.0])
    tt = sampling.token_timesteps(t, mask)
    assert tt.shape == (b, f * (h // 2) * (w // 2))
    for bi in range(b):
        expected = [t[bi].item() * mask[bi, fi, hi * 2, wi * 2].item()
                    for fi in range(f) for hi in range(h // 2) for wi in range(w // 2)]
        assert tt[bi].tolist() == expected
    # One mask for the whole batch and a scalar timestep broadcast.
    assert torch.equal(sampling.token_timesteps(999, mask[0]), 999 * mask[0, :, ::2, ::2].reshape(1, -1))
    with pytest.raises(ValueError, match="frame_mask"):
        sampling.token_timesteps(t, mask[:, None])
