"""From config to images: the schedule and sampler a config describes, and batched generation
with one random stream per image, so image ``i`` of seed ``s`` is the same whatever the batch size
or the device, and a resumed generation job continues with exactly the images it would have made."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from diffuseseg.config import Config, DiffusionConfig
from diffuseseg.datasets import to_uint8
from diffuseseg.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule, sample_images


def schedule_from_config(cfg: DiffusionConfig) -> NoiseSchedule:
    return NoiseSchedule(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)


def make_sampler(cfg: Config, sampler: str, steps: int | None,
                 timestep_spacing: str = "trailing") -> DDPMSampler | DDIMSampler:
    """A DDPM sampler (``steps`` None or T = every timestep) or a DDIM sampler with ``steps`` steps."""
    schedule = schedule_from_config(cfg.diffusion)
    d = cfg.diffusion
    if sampler == "ddpm":
        s = DDPMSampler(schedule, d.prediction_type, d.clip_sample)
        s.set_timesteps(None if steps is None or steps >= d.num_train_timesteps else steps)
        return s
    if sampler == "ddim":
        s = DDIMSampler(schedule, d.prediction_type, d.clip_sample, timestep_spacing=timestep_spacing)
        s.set_timesteps(min(steps or 50, d.num_train_timesteps))
        return s
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")


def image_generators(seed: int, ids: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per image id, seeded from (seed, id)."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            for i in ids]


@torch.no_grad()
def generate_images(model: Callable[[Tensor, Tensor], Tensor], cfg: Config, num_images: int, *,
                    sampler: str = "ddim", steps: int | None = 100, seed: int = 0, first_id: int = 0,
                    batch_size: int = 64, eta: float = 0.0, timestep_spacing: str = "trailing",
                    device: torch.device | str = "cpu", progress: bool = True,
                    trajectory: list[np.ndarray] | None = None) -> np.ndarray:
    """Sample images ``first_id .. first_id + num_images - 1`` as uint8 (N, H, W, 3).

    ``trajectory``: a list that receives, after every sampler step, the first batch's current
    samples as uint8 (B, H, W, 3): the denoising trajectory from noise to images."""
    s = make_sampler(cfg, sampler, steps, timestep_spacing)
    size, channels = cfg.model.im_size, cfg.model.im_channels
    out = []
    batches = range(first_id, first_id + num_images, batch_size)
    for lo in tqdm(batches, desc=f"sampling ({sampler})", unit="batch", disable=not progress or len(batches) < 2):
        ids = range(lo, min(lo + batch_size, first_id + num_images))
        record = None
        if trajectory is not None and lo == first_id:
            record = lambda t, x_t: trajectory.append(to_uint8(x_t.clamp(-1.0, 1.0)))  # noqa: E731
        x = sample_images(model, s, (len(ids), channels, size, size), generator=image_generators(seed, ids),
                          device=device, eta=eta, progress=progress and len(batches) < 2, on_step=record)
        out.append(to_uint8(x))
    return np.concatenate(out)
