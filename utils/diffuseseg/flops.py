"""Speed as a share of the machine: the measured fp32 GEMM peak and the FLOPs of a DDPM training step.

Machines differ several-fold (2-thread fp32 GEMM peaks from 105 to 331 GFLOP/s have been measured on
"the same" 2-core VM), so throughput is reported as a fraction of the peak measured in the same run.
FLOPs are counted with torch.utils.flop_counter on the real forward/backward (a multiply-add = 2 FLOPs).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffuseseg.config import Config
from diffuseseg.diffusion import diffusion_loss
from diffuseseg.sampling import schedule_from_config
from diffuseseg.unet import UNet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(device: torch.device | str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matmul (median of 5 after 2 warm-up runs)."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, warmup=2, steps=5)
    return 2 * n ** 3 / seconds / 1e9


def training_flops_per_image(cfg: Config, batch: int = 2) -> float:
    """FLOPs of one DDPM training step (forward + backward of the configured loss) per image."""
    torch.manual_seed(0)
    model = UNet(cfg.model)
    schedule = schedule_from_config(cfg.diffusion)
    x0 = torch.rand(batch, cfg.model.im_channels, cfg.model.im_size, cfg.model.im_size) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, schedule, x0, prediction_type=cfg.diffusion.prediction_type,
                       loss_weighting=cfg.diffusion.loss_weighting,
                       min_snr_gamma=cfg.diffusion.min_snr_gamma).backward()
    return counter.get_total_flops() / batch
