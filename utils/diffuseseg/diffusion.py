"""Noise schedules, the training loss, and DDPM / DDIM samplers.

The API mirrors diffusers' schedulers (``add_noise``, ``set_timesteps``, ``step``) so that
results can be checked against diffusers numerically, but the code is self-contained:
diffusers is only a test dependency.

Conventions
-----------
* Timesteps are integers in ``[0, T-1]``; ``t = 0`` is the least noisy step.
* Schedule tables are computed in float64 and stored as float32 CPU tensors; per-step
  scalar coefficients are taken from the float64 tables, so they are slightly *more*
  accurate than diffusers' float32 arithmetic (differences are ~1e-7 relative).
* All random draws go through :func:`_randn`, which draws on the generator's device
  (normally the CPU) and then moves the result. With the same seeded CPU generator the
  stream matches diffusers' ``randn_tensor``, and a seed gives the same images on CPU and GPU.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
           dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Standard normal noise drawn on the generator's device (CPU by default), then moved.

    Drawing on the CPU keeps the random stream independent of where the model runs. A list of
    generators (one per batch element, as in diffusers) makes each image's stream independent of
    the batch it is sampled in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([_randn(tuple(shape[1:]), g, dtype, device) for g in generator])
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _as_int(t: int | Tensor) -> int:
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"expected a single timestep, got a tensor of shape {tuple(t.shape)}")
        return int(t.item())
    return int(t)


class NoiseSchedule:
    """Forward process q(x_t | x_0) for T steps."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        T = int(num_train_timesteps)
        if beta_schedule == "linear":
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        else:
            # Nichol & Dhariwal (2021), eq. 17; the 0.999 cap avoids a singular last step.
            def abar(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                             dtype=np.float64)
        alphas = 1.0 - betas
        abar64 = np.cumprod(alphas)

        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.betas = torch.from_numpy(betas).float()
        self.alphas = torch.from_numpy(alphas).float()
        self.alphas_cumprod = torch.from_numpy(abar64).float()
        # float64 copy for per-step Python-scalar coefficients (samplers).
        self._abar64 = abar64
        # sqrt tables precomputed in float64 so that 1 - abar near t=0 does not lose digits.
        self._sqrt_abar = torch.from_numpy(np.sqrt(abar64)).float()
        self._sqrt_1m_abar = torch.from_numpy(np.sqrt(1.0 - abar64)).float()
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r})"

    def alpha_bar(self, t: int) -> float:
        """abar_t as a float64 Python scalar; t < 0 means 'before step 0' (abar = 1)."""
        return 1.0 if t < 0 else float(self._abar64[t])

    def _coefs(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) on like's device/dtype, shaped to broadcast over like.

        t may be a Python int, a 0-dim tensor (same t for the whole batch) or a (B,) tensor.
        """
        dev = like.device
        if dev not in self._device_cache:  # move the tables once per device, not every call
            self._device_cache[dev] = (self._sqrt_abar.to(dev), self._sqrt_1m_abar.to(dev))
        sa, s1ma = self._device_cache[dev]
        t = torch.as_tensor(t, device=dev).long()
        if t.ndim > 1:
            raise ValueError(f"t must be an int, a 0-dim tensor or a (B,) tensor, got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        a, b = sa[t].to(like.dtype), s1ma[t].to(like.dtype)
        if t.ndim == 1:  # (B,) -> (B, 1, 1, ...) to broadcast over C, H, W
            shape = (-1,) + (1,) * (like.ndim - 1)
            a, b = a.reshape(shape), b.reshape(shape)
        return a, b

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, b = self._coefs(t, x0)
        return a * x0 + b * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v-prediction target (Salimans & Ho 2022): sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        a, b = self._coefs(t, x0)
        return a * noise - b * x0

    def predict_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor | int,
                       prediction_type: str) -> tuple[Tensor, Tensor]:
        """Convert a model output into (predicted x0, predicted eps)."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        a, b = self._coefs(t, x_t)
        if prediction_type == "epsilon":
            return (x_t - b * model_output) / a, model_output
        # v = a eps - b x0 and x_t = a x0 + b eps, with a^2 + b^2 = 1
        return a * x_t - b * model_output, a * model_output + b * x_t

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (float32, on t's device if t is a tensor)."""
        dev = t.device if isinstance(t, Tensor) else torch.device("cpu")
        idx = torch.as_tensor(t).long().cpu()
        abar = torch.from_numpy(self._abar64)[idx]
        return (abar / (1.0 - abar)).float().to(dev)


def diffusion_loss(model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule, x0: Tensor, *,
                   prediction_type: str = "epsilon", loss_weighting: str = "none", min_snr_gamma: float = 5.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Sample t ~ U{0..T-1} and noise, return the mean training loss (scalar).

    'min_snr' = Hang et al. 2023 Min-SNR-gamma weighting: min(snr, gamma) / snr for epsilon,
    min(snr, gamma) / (snr + 1) for v. The model is called as model(x_t, t).
    Draw order (for reproducibility): t first, then noise, both from ``generator``.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    if loss_weighting == "min_snr" and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    B = x0.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=gen_device).to(x0.device)
    noise = _randn(tuple(x0.shape), generator, x0.dtype, x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else schedule.velocity(x0, noise, t)
    out = model(x_t, t)
    if out.shape != target.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} != target shape {tuple(target.shape)}")
    # float32 loss even under autocast / half inputs.
    per_sample = (out.float() - target.float()).pow(2).reshape(B, -1).mean(dim=1)
    if loss_weighting == "min_snr":
        snr = schedule.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        # For v the effective x0-space weight is snr + 1, hence the different denominator.
        weight = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)
        per_sample = per_sample * weight
    return per_sample.mean()


class DDPMSampler:
    """Ancestral sampling (Ho et al. 2020), posterior variance beta_tilde ('fixed_small', as diffusers' default)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", clip_sample: bool = True,
                 clip_sample_range: float = 1.0) -> None:
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = float(clip_sample_range)
        self.set_timesteps(None)

    def set_timesteps(self, num_inference_steps: int | None = None) -> None:
        """None = all T steps; fewer = strided like diffusers' "leading" spacing (k * (T // N))."""
        T = self.schedule.num_train_timesteps
        if num_inference_steps is None:
            ts = np.arange(T)[::-1]
        else:
            if not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
            ts = (np.arange(num_inference_steps) * (T // num_inference_steps))[::-1]
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts.astype(np.int64).copy())
        # With a strided schedule the step goes to the next listed timestep, not t - 1.
        tl = self.timesteps.tolist()
        self._prev = {t: (tl[i + 1] if i + 1 < len(tl) else -1) for i, t in enumerate(tl)}

    def previous_timestep(self, t: int) -> int:
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the sampler's timesteps; call set_timesteps first")
        return self._prev[t]

    def step(self, model_output: Tensor, t: int | Tensor, sample: Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """One reverse step x_t -> x_{prev}: posterior mean from the (clipped) x0 estimate plus noise."""
        t = _as_int(t)
        prev_t = self.previous_timestep(t)
        abar_t, abar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(prev_t)
        # Effective alpha/beta of the (possibly strided) jump t -> prev_t.
        alpha_t = abar_t / abar_prev
        beta_t = 1.0 - alpha_t

        x0, _ = self.schedule.predict_x0_eps(model_output, sample, t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        # Posterior q(x_prev | x_t, x0) mean, DDPM eq. 7.
        c_x0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        c_xt = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        prev = c_x0 * x0 + c_xt * sample
        if t > 0:  # the last step (to x_0) is the mean; no noise drawn, as in diffusers
            var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
            prev = prev + math.sqrt(var) * _randn(tuple(sample.shape), generator, sample.dtype, sample.device)
        return prev


class DDIMSampler:
    """Song et al. 2021. eta=0 deterministic; eta=1 ~ DDPM variance.

    Unlike diffusers (which always strides by T // N, see diffusers issue #12633), each step
    goes to the *next timestep in the list*. This is identical to diffusers for "leading"
    and for "trailing" when N divides T, and correct for "linspace".
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", clip_sample: bool = True,
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 set_alpha_to_one: bool = True) -> None:
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = float(clip_sample_range)
        self.timestep_spacing = timestep_spacing
        # abar "before" step 0: 1 (a clean final image) or abar_0 (the original DDIM code).
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else schedule.alpha_bar(0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self._prev: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Spacings as in diffusers' DDIMScheduler with steps_offset=0 (Lin et al. 2023, table 2)."""
        T = self.schedule.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        N = num_inference_steps
        if self.timestep_spacing == "leading":
            ts = (np.arange(N) * (T // N))[::-1]
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / N)) - 1
        else:  # linspace
            ts = np.linspace(0, T - 1, N).round()[::-1]
        self.num_inference_steps = N
        self.timesteps = torch.from_numpy(ts.astype(np.int64).copy())
        tl = self.timesteps.tolist()
        self._prev = {t: (tl[i + 1] if i + 1 < len(tl) else -1) for i, t in enumerate(tl)}

    def previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError("DDIMSampler.set_timesteps(num_inference_steps) must be called before step()")
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the sampler's timesteps {self.timesteps.tolist()}")
        return self._prev[t]

    def step(self, model_output: Tensor, t: int | Tensor, sample: Tensor, eta: float = 0.0,
             generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """One DDIM update (Song et al. eq. 12) from t to the next listed timestep."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = _as_int(t)
        prev_t = self.previous_timestep(t)
        abar_t = self.schedule.alpha_bar(t)
        abar_prev = self.schedule.alpha_bar(prev_t) if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = self.schedule.predict_x0_eps(model_output, sample, t, self.prediction_type)
        if self.clip_sample:
            # eps is deliberately left unclipped (diffusers' use_clipped_model_output=False).
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)  # sigma_t^2 at eta=1
        std = eta * math.sqrt(max(var, 0.0))
        prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - std**2, 0.0)) * eps
        if eta > 0:  # drawn even when std == 0 (last step) so the random stream matches diffusers
            prev = prev + std * _randn(tuple(sample.shape), generator, sample.dtype, sample.device)
        return prev


@torch.no_grad()
def sample_images(model: Callable[[Tensor, Tensor], Tensor], sampler: DDPMSampler | DDIMSampler,
                  shape: tuple[int, ...], *, generator: torch.Generator | list[torch.Generator] | None = None,
                  device: torch.device | str = "cpu", eta: float = 0.0, progress: bool = True,
                  on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Start from N(0, I), run sampler.timesteps, return samples in [-1, 1] (clamped).

    ``on_step(t, x)`` sees the sample after each step (e.g. to record the denoising trajectory).
    Noise is drawn from a CPU generator and moved to `device`, so a seed gives the same images
    on CPU and GPU. `eta` only applies to DDIMSampler. tqdm progress bar when progress=True.
    """
    if len(sampler.timesteps) == 0:
        raise RuntimeError("sampler has no timesteps; call sampler.set_timesteps(...) first")
    device = torch.device(device)
    x = _randn(tuple(shape), generator, torch.float32, device)
    steps = sampler.timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for t in steps:
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        out = model(x, t_batch)
        if isinstance(sampler, DDIMSampler):
            x = sampler.step(out, t, x, eta=eta, generator=generator)
        else:
            x = sampler.step(out, t, x, generator=generator)
        if on_step is not None:
            on_step(t, x)
    return x.clamp(-1.0, 1.0)
