"""Check diffuseseg.diffusion against diffusers (a test-only dependency) on identical inputs.

Two references are used for the samplers:
* ``stock``: diffusers exactly as shipped. Its tables and per-step coefficients are float32, and
  ``1 - abar_t / abar_prev`` loses ~3 digits at small t, so agreement there is ~1e-4, not 1e-6.
* ``f64``: the same diffusers scheduler with its ``alphas_cumprod`` replaced by our float64 table.
  This isolates the algorithm from float32 round-off; agreement is (close to) bitwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from diffuseseg.diffusion import (  # noqa: E402
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    diffusion_loss,
    sample_images,
)

T = 1000
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (2, 3, 8, 8)


def _rand(gen: torch.Generator, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _to_f64(ref, sched: NoiseSchedule):
    """Give a diffusers scheduler our float64 abar table (see module docstring)."""
    ref.alphas_cumprod = torch.from_numpy(sched._abar64.copy())
    if hasattr(ref, "one"):
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_schedule_tables_match_diffusers(name, num_steps):
    ours = NoiseSchedule(num_steps, name)
    ref = DDPMScheduler(num_train_timesteps=num_steps, beta_schedule=DIFFUSERS_SCHEDULE[name])
    for attr in ("betas", "alphas", "alphas_cumprod"):
        got = getattr(ours, attr)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (num_steps,)
        assert _max_diff(got, getattr(ref, attr)) < 1e-6, attr
    assert torch.all(ours.betas <= 0.999)


def test_cosine_formula():
    s = NoiseSchedule(T, "cosine")
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 1, 500, 998):
        assert s.betas[i].item() == pytest.approx(min(1 - abar((i + 1) / T) / abar(i / T), 0.999), rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.999)  # capped


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_add_noise_and_velocity_match_diffusers(name):
    s = NoiseSchedule(T, name)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[name])
    g = torch.Generator().manual_seed(0)
    x0, noise = _rand(g, (8, 3, 8, 8)), _rand(g, (8, 3, 8, 8))
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    assert _max_diff(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-5
    assert _max_diff(s.velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < 1e-5
    # the v target is the textbook formula
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected_v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert _max_diff(s.velocity(x0, noise, t), expected_v) < 1e-5


def test_add_noise_scalar_t_and_dtype():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0, noise = _rand(g), _rand(g)
    batch = s.add_noise(x0, noise, torch.full((SHAPE[0],), 123))
    assert torch.equal(s.add_noise(x0, noise, torch.tensor(123)), batch)
    assert torch.equal(s.add_noise(x0, noise, 123), batch)
    out64 = s.add_noise(x0.double(), noise.double(), torch.tensor([5, 6]))
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_predict_x0_eps_inverts_forward_process(pred):
    s = NoiseSchedule(T, "cosine")
    g = torch.Generator().manual_seed(2)
    x0, eps = _rand(g), _rand(g)
    t = torch.tensor([3, 700])
    x_t = s.add_noise(x0, eps, t)
    out = eps if pred == "epsilon" else s.velocity(x0, eps, t)
    x0_hat, eps_hat = s.predict_x0_eps(out, x_t, t, pred)
    assert _max_diff(x0_hat, x0) < 1e-4 and _max_diff(eps_hat, eps) < 1e-4


def test_snr():
    s = NoiseSchedule()
    t = torch.tensor([0, 10, 999])
    a = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, T)))[t]  # float64: 1 - abar_0 is tiny
    assert torch.allclose(s.snr(t).double(), a / (1 - a), rtol=1e-5)
    assert s.snr(5).shape == ()


# --------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("num_inference_steps", [None, 50])
def test_ddpm_step_matches_diffusers(name, pred, clip, num_inference_steps):
    s = NoiseSchedule(T, name)
    ours = DDPMSampler(s, prediction_type=pred, clip_sample=clip)
    kw = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[name], prediction_type=pred, clip_sample=clip)
    stock, f64 = DDPMScheduler(**kw), _to_f64(DDPMScheduler(**kw), s)
    if num_inference_steps is None:
        ts = [0, 1, 2, 10, 500, 998, 999]
        assert torch.equal(ours.timesteps, stock.timesteps)
    else:
        for sch in (ours, stock, f64):
            sch.set_timesteps(num_inference_steps)
        assert torch.equal(ours.timesteps, stock.timesteps)
        ts = [0, 20, 40, 500, 980]
    g = torch.Generator().manual_seed(3)
    for t in ts:
        x_t, out = _rand(g), _rand(g)
        got = ours.step(out, t, x_t, generator=torch.Generator().manual_seed(t))
        ref_stock = stock.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        ref_f64 = f64.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _max_diff(got, ref_f64) < 1e-5, t
        assert _max_diff(got, ref_stock) < 2e-3, t  # float32 cancellation in diffusers at small t


def test_ddpm_t0_adds_no_noise_and_accepts_tensor_t():
    s = NoiseSchedule()
    sampler = DDPMSampler(s)
    g = torch.Generator().manual_seed(4)
    x_t, out = _rand(g), _rand(g)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    a = sampler.step(out, 0, x_t, generator=gen)
    assert torch.equal(gen.get_state(), state)  # nothing drawn at t = 0
    b = sampler.step(out, torch.tensor(0), x_t, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    c = sampler.step(out, torch.tensor(5), x_t, generator=torch.Generator().manual_seed(7))
    d = sampler.step(out, 5, x_t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c, d)


# --------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 1000])
def test_ddim_timesteps_match_diffusers(spacing, n):
    ours = DDIMSampler(NoiseSchedule(), timestep_spacing=spacing)
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(name, spacing, pred, eta):
    s = NoiseSchedule(T, name)
    ours = DDIMSampler(s, prediction_type=pred, timestep_spacing=spacing)
    kw = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[name], prediction_type=pred,
              timestep_spacing=spacing)
    stock, f64 = DDIMScheduler(**kw), _to_f64(DDIMScheduler(**kw), s)
    for sch in (ours, stock, f64):
        sch.set_timesteps(10)
    assert torch.equal(ours.timesteps, stock.timesteps)
    if spacing == "linspace":
        # diffusers' DDIM strides by T // N = 100 (diffusers issue #12633); the linspace gap is 111.
        # We step to the next listed timestep, so give diffusers a stride of 1000 // 9 = 111 to compare.
        assert set(np.diff(ours.timesteps.numpy()).tolist()) == {-111}
        stock.num_inference_steps = f64.num_inference_steps = 9
    g = torch.Generator().manual_seed(5)
    for t in ours.timesteps.tolist():
        x_t, out = _rand(g), _rand(g)
        got = ours.step(out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t))
        ref_stock = stock.step(out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        ref_f64 = f64.step(out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _max_diff(got, ref_f64) < 1e-6, t
        assert _max_diff(got, ref_stock) < 1e-5, t


def test_ddim_steps_to_next_listed_timestep():
    sampler = DDIMSampler(NoiseSchedule(), timestep_spacing="trailing")
    sampler.set_timesteps(7)  # 1000 / 7 is not an integer: gaps are 142 or 143
    ts = sampler.timesteps.tolist()
    assert [sampler.previous_timestep(t) for t in ts] == ts[1:] + [-1]


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_final_alpha(set_alpha_to_one):
    s = NoiseSchedule()
    ours = DDIMSampler(s, set_alpha_to_one=set_alpha_to_one)
    ref = DDIMScheduler(num_train_timesteps=T, set_alpha_to_one=set_alpha_to_one)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(6)
    x_t, out = _rand(g), 0.1 * _rand(g)  # small eps so x0 is not clipped
    got = ours.step(out, 0, x_t)
    assert _max_diff(got, ref.step(out, 0, x_t).prev_sample) < 1e-5
    if set_alpha_to_one:  # prev_t < 0 -> alpha_prod = 1 -> the x0 estimate itself
        x0, _ = s.predict_x0_eps(out, x_t, 0, "epsilon")
        assert _max_diff(got, x0.clamp(-1, 1)) < 1e-6


# --------------------------------------------------------------------------- full loops


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Fixed deterministic 'denoiser': 0.1 x + sin(t / 100)."""
    t = torch.as_tensor(t, device=x.device).float().reshape(-1, *([1] * (x.ndim - 1)))
    return 0.1 * x + torch.sin(t / 100.0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_matches_diffusers(eta):
    s = NoiseSchedule()
    sampler = DDIMSampler(s)
    sampler.set_timesteps(10)
    got = sample_images(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(0), eta=eta,
                        progress=False)

    ref = DDIMScheduler(num_train_timesteps=T)
    ref.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.expand(SHAPE[0])), t, x, eta=eta, generator=gen).prev_sample
    expected = x.clamp(-1, 1)
    assert _max_diff(got, expected) < 1e-5
    assert got.abs().max() <= 1.0


def test_ddpm_loop_matches_diffusers():
    s = NoiseSchedule(T, "cosine")
    sampler = DDPMSampler(s, prediction_type="v_prediction")
    sampler.set_timesteps(20)
    got = sample_images(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(1), progress=True)

    ref = _to_f64(DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                prediction_type="v_prediction"), s)
    ref.set_timesteps(20)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen)
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.expand(SHAPE[0])), t, x, generator=gen).prev_sample
    assert _max_diff(got, x.clamp(-1, 1)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_images_on_cpu_and_gpu():
    sampler = DDIMSampler(NoiseSchedule())
    sampler.set_timesteps(10)
    kw = dict(eta=0.5, progress=False)
    cpu = sample_images(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(0), **kw)
    gpu = sample_images(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(0), device="cuda", **kw)
    assert gpu.device.type == "cuda"
    assert _max_diff(cpu, gpu.cpu()) < 1e-4


# --------------------------------------------------------------------------- loss


def _oracle(schedule: NoiseSchedule, x0: torch.Tensor, pred: str):
    """A 'model' that knows x0, so it can recover the exact eps (or v) from x_t."""
    seen = {}

    def model(x_t, t):
        seen["t"] = t
        a = schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        eps = ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
        return eps if pred == "epsilon" else schedule.velocity(x0, eps, t)

    return model, seen


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_is_zero_for_perfect_model(pred, weighting):
    s = NoiseSchedule()
    x0 = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    model, seen = _oracle(s, x0, pred)
    loss = diffusion_loss(model, s, x0, prediction_type=pred, loss_weighting=weighting,
                          generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.item() < 1e-6
    assert seen["t"].shape == (16,) and seen["t"].dtype == torch.int64
    assert 0 <= seen["t"].min() and seen["t"].max() < T


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_targets_and_min_snr_weights(pred, weighting):
    s = NoiseSchedule()
    B, gamma = 32, 5.0
    x0 = torch.rand(B, 3, 4, 4, generator=torch.Generator().manual_seed(8)) * 2 - 1
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  loss = weighted mean of target^2
    loss = diffusion_loss(zero, s, x0, prediction_type=pred, loss_weighting=weighting, min_snr_gamma=gamma,
                          generator=torch.Generator().manual_seed(1))

    # Replay the documented draw order: t first, then noise.
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, T, (B,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = s.alphas_cumprod.double()[t]
    av = a.view(-1, 1, 1, 1)
    target = noise.double() if pred == "epsilon" else av.sqrt() * noise - (1 - av).sqrt() * x0
    per_sample = target.pow(2).flatten(1).mean(1)
    snr = a / (1 - a)
    if weighting == "none":
        w = torch.ones(B, dtype=torch.float64)
    elif pred == "epsilon":
        w = torch.clamp(snr, max=gamma) / snr
    else:
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    assert loss.item() == pytest.approx((w * per_sample).mean().item(), rel=1e-5)


def test_loss_backpropagates():
    s = NoiseSchedule()
    w = torch.zeros((), requires_grad=True)
    loss = diffusion_loss(lambda x, t: w * x, s, torch.zeros(2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: NoiseSchedule(beta_schedule="quadratic"), "quadratic"),
        (lambda: DDPMSampler(NoiseSchedule(), prediction_type="sample"), "sample"),
        (lambda: DDIMSampler(NoiseSchedule(), prediction_type="x0"), "x0"),
        (lambda: DDIMSampler(NoiseSchedule(), timestep_spacing="uniform"), "uniform"),
        (lambda: diffusion_loss(lambda x, t: x, NoiseSchedule(), torch.zeros(1, 1, 2, 2), loss_weighting="p2"), "p2"),
        (lambda: diffusion_loss(lambda x, t: x, NoiseSchedule(), torch.zeros(1, 1, 2, 2),
                                prediction_type="score"), "score"),
        (lambda: NoiseSchedule().predict_x0_eps(torch.zeros(1), torch.zeros(1), 0, "eps"), "eps"),
    ],
)
def test_bad_choices_raise_value_error(make, bad):
    with pytest.raises(ValueError, match=f"'{bad}'") as exc:
        make()
    assert "expected one of" in str(exc.value)


def test_bad_numbers_raise():
    s = NoiseSchedule()
    ddim = DDIMSampler(s)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ddim.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))
    for n in (0, T + 1):
        with pytest.raises(ValueError, match=str(n)):
            ddim.set_timesteps(n)
        with pytest.raises(ValueError, match=str(n)):
            DDPMSampler(s).set_timesteps(n)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 "):
        ddim.step(torch.zeros(SHAPE), 5, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="eta"):
        ddim.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE), eta=-1.0)
    with pytest.raises(ValueError):
        s.add_noise(torch.zeros(SHAPE), torch.zeros(SHAPE), torch.tensor([0, T]))
