"""Speed as a share of the machine: the measured fp32 GEMM peak and the FLOPs of a DDPM training step.

Machines differ several-fold (2-thread fp32 GEMM peaks from 105 to 331 GFLOP/s have been measured on
"the same" 2-core VM), so throughput is reported as a fraction of the peak measured in the same run.
FLOPs are counted with torch.utils.flop_counter on the real forward/backward (a multiply-add = 2 FLOPs;
``flop_counter`` mends its count of grouped convolutions' backward and adds CPU attention, which it missed).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from diffuseseg.config import Config
from diffuseseg.diffusion import diffusion_loss
from diffuseseg.sampling import schedule_from_config
from diffuseseg.unet import UNet


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost what its forward costs.
    torch's own formula counts a grouped convolution's weight gradient ``groups`` times over (it treats the
    weight gradient as one ungrouped convolution), which overstated the conv heads' rate by half."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def attention_flops(batch_heads: int, queries: int, keys: int, head_dim: int, backward: bool = False) -> int:
    """FLOPs of softmax attention over ``batch_heads`` heads (query and value widths both ``head_dim``): the
    forward's two matmuls (scores = q k^T, out = p v); a flash backward recomputes the scores and then runs four
    (grad p, grad v, grad q, grad k), the count torch uses for its GPU attention kernels."""
    one_matmul = 2 * batch_heads * queries * keys * head_dim
    return one_matmul * (5 if backward else 2)


def _cpu_flash_forward_flops(query_shape, key_shape, _value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query_shape
    return attention_flops(b * h, s_q, key_shape[2], d)


def _cpu_flash_backward_flops(_grad_out_shape, query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query_shape
    return attention_flops(b * h, s_q, key_shape[2], d, backward=True)


# torch's counter has formulas for the CUDA attention kernels only: on a CPU, F.scaled_dot_product_attention
# dispatches to these two ops, which it counted as 0 FLOPs (DiffuseSeg's 64 px attention is half its step's time).
_FORMULAS = {
    torch.ops.aten.convolution_backward: _conv_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs), with grouped convolutions'
    backward and CPU attention counted; use as ``with flop_counter() as c: ...; c.get_total_flops()``."""
    return FlopCounterMode(display=False, custom_mapping=_FORMULAS)


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
# convolutions the benchmarked workloads run (batch, in channels, out channels, side, kernel, groups): the
# U-Nets' 3x3 convolutions at 64, 32 and 16 px, and the read-out heads' 1x1 input projection and grouped 3x3
# layers on 32 px windows. Each convolution is timed forward and forward + backward: oneDNN's kernels differ
# by shape and direction, and one GEMM alone understated the machine (a 64 px U-Net's training step ran at
# 110 % of the 2048^3 GEMM's rate; the heads at 111 % of a peak without their own shapes).
_PEAK_GEMMS = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 288, 256), (16384, 576, 64))
_PEAK_CONVS = ((16, 32, 32, 64, 3, 1), (16, 64, 64, 64, 3, 1), (16, 96, 96, 32, 3, 1), (32, 128, 128, 32, 3, 1),
               (32, 256, 256, 16, 3, 1), (8, 336, 192, 32, 1, 1), (8, 192, 192, 32, 3, 3))


def conv_flops(batch: int, c_in: int, c_out: int, side: int, kernel: int, groups: int = 1) -> int:
    """FLOPs of one same-padded stride-1 convolution's forward pass (a multiply-add = 2 FLOPs)."""
    return 2 * batch * c_out * (c_in // groups) * kernel * kernel * side * side


def conv_gflops(device: torch.device | str, batch: int, c_in: int, c_out: int, side: int, kernel: int = 3,
                groups: int = 1, backward: bool = False, dtype: torch.dtype = torch.float32,
                repeats: int = 5) -> float:
    """Achieved GFLOP/s of a convolution, forward only or forward + backward (input and weight gradients, twice
    the forward's FLOPs); the median of ``repeats`` runs after 2 warm-up runs."""
    device = torch.device(device)
    x = torch.randn(batch, c_in, side, side, device=device, dtype=dtype, requires_grad=backward)
    w = torch.randn(c_out, c_in // groups, kernel, kernel, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(batch, c_out, side, side, device=device, dtype=dtype)

    def run() -> None:
        y = torch.nn.functional.conv2d(x, w, padding=kernel // 2, groups=groups)
        if backward:
            torch.autograd.grad(y, (x, w), grad)

    flops = conv_flops(batch, c_in, c_out, side, kernel, groups) * (3 if backward else 1)
    return flops / median_seconds(run, device, warmup=2, steps=repeats) / 1e9


def peak_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 5,
                rounds: int = 2) -> tuple[float, dict[str, float]]:
    """The machine's achieved peak: the best GFLOP/s over several GEMM and convolution shapes (each the median
    of ``repeats`` runs after warm-up, the whole list timed ``rounds`` times and each shape's best kept, so a
    round slowed by another process does not lower it) on the current threads and device, and every shape's
    figure. A workload's share of it should stay under 100 %; one that does not says the list misses a case."""
    device = torch.device(device)
    figures: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        figures[name] = max(figures.get(name, 0.0), value)

    for _ in range(rounds):
        for m, k, n in _PEAK_GEMMS:
            keep(f"gemm {m}x{k}x{n}", gemm_gflops(device, m, k, n, dtype, repeats))
        for batch, c_in, c_out, side, kernel, groups in _PEAK_CONVS:
            name = f"conv{kernel}x{kernel} {batch}x{c_in}->{c_out}x{side}^2" + (f"/{groups}" if groups > 1 else "")
            for backward in (False, True):
                keep(name + (" fwd+bwd" if backward else " fwd"),
                     conv_gflops(device, batch, c_in, c_out, side, kernel, groups, backward, dtype, repeats))
    return max(figures.values()), figures


def training_flops_per_image(cfg: Config, batch: int = 2) -> float:
    """FLOPs of one DDPM training step (forward + backward of the configured loss) per image."""
    torch.manual_seed(0)
    model = UNet(cfg.model)
    schedule = schedule_from_config(cfg.diffusion)
    x0 = torch.rand(batch, cfg.model.im_channels, cfg.model.im_size, cfg.model.im_size) * 2 - 1
    with flop_counter() as counter:
        diffusion_loss(model, schedule, x0, prediction_type=cfg.diffusion.prediction_type,
                       loss_weighting=cfg.diffusion.loss_weighting,
                       min_snr_gamma=cfg.diffusion.min_snr_gamma).backward()
    return counter.get_total_flops() / batch
