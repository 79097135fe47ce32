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


def gemm_gflops(device: torch.device | str, m: int, k: int, n: int, dtype: torch.dtype = torch.float32,
                repeats: int = 5) -> float:
    """Achieved GFLOP/s of an (m x k) @ (k x n) matmul (median of ``repeats`` after 2 warm-up runs)."""
    device = torch.device(device)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / median_seconds(lambda: a @ b, device, warmup=2, steps=repeats) / 1e9


def matmul_peak_gflops(device: torch.device | str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matmul (the recipe study's reference; ``peak_gflops`` is the honest peak)."""
    return gemm_gflops(device, n, n, n, dtype)


# Shapes the peak is the best of: square GEMMs, the tall-skinny ones an im2col convolution makes, and the
# 3x3 convolutions of U-Nets at 64, 32 and 16 px (batch, channels, side). One shape alone understates what the
# machine does: on one 2-core VM a 64 px U-Net's training step ran at 110 % of the 2048^3 GEMM's rate.
_PEAK_GEMMS = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 288, 256), (16384, 576, 64))
_PEAK_CONVS = ((16, 64, 64), (32, 128, 32), (32, 256, 16))


def peak_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                repeats: int = 5) -> tuple[float, dict[str, float]]:
    """The machine's achieved peak: the best GFLOP/s over several GEMM and 3x3-convolution shapes (each the
    median of ``repeats`` runs after warm-up) on the current threads and device, and every shape's figure.
    A workload's share of it should stay under 100 %; one that does not says the shape list misses a case."""
    device = torch.device(device)
    figures = {}
    for m, k, n in _PEAK_GEMMS:
        figures[f"gemm {m}x{k}x{n}"] = gemm_gflops(device, m, k, n, dtype, repeats)
    for batch, channels, side in _PEAK_CONVS:
        x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
        flops = 2 * batch * channels * channels * 9 * side * side
        seconds = median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, 2, repeats)
        figures[f"conv3x3 {batch}x{channels}x{side}^2"] = flops / seconds / 1e9
    return max(figures.values()), figures


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
