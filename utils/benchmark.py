"""Print speed figures: DDPM training and sampling throughput, achieved GFLOP/s against a measured
fp32 matmul peak, for the default toy config and the DiffuseSeg 64 px config.

Examples:
  python utils/benchmark.py                        # both models, this machine's default device
  python utils/benchmark.py --models default --steps 10
  python utils/benchmark.py --set run.device=cuda --set train.mixed_precision=bf16

Figures are medians over timed steps after warm-up. FLOPs are counted with
torch.utils.flop_counter (a multiply-add = 2 FLOPs) on the real forward/backward.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import Config
from diffuseseg.diffusion import diffusion_loss
from diffuseseg.runtime import autocast, autocast_dtype, configure_threads, resolve_device
from diffuseseg.sampling import make_sampler, schedule_from_config
from diffuseseg.unet import UNet, count_parameters, model_config_from_diffuseseg

DIFFUSESEG_64 = dict(im_channels=3, im_size=64, down_channels=[64, 128, 256, 512], mid_channels=[512, 512, 256],
                     down_sample=[True, True, True], time_emb_dim=256, num_down_layers=2, num_mid_layers=2,
                     num_up_layers=2, num_heads=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: a @ b, device, warmup=2, steps=5)
    return 2 * n ** 3 / seconds / 1e9


def bench_model(name: str, cfg: Config, batch: int, device: torch.device, steps: int, peak: float) -> None:
    torch.manual_seed(0)
    model = UNet(cfg.model).to(device)
    schedule = schedule_from_config(cfg.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = autocast_dtype(device, cfg.train.mixed_precision)
    x0 = torch.rand(batch, cfg.model.im_channels, cfg.model.im_size, cfg.model.im_size, device=device) * 2 - 1

    def train_step() -> None:
        with autocast(device, amp):
            loss = diffusion_loss(model, schedule, x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with autocast(device, amp):
            diffusion_loss(model, schedule, x0).backward()
    train_flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    t_train = _median_seconds(train_step, device, warmup=2, steps=steps)

    model.eval()
    t = torch.full((batch,), 500, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x0, t)
    fwd_flops = counter.get_total_flops()

    def denoise() -> None:
        with torch.no_grad(), autocast(device, amp):
            model(x0, t)
    t_fwd = _median_seconds(denoise, device, warmup=2, steps=steps)
    ddim = make_sampler(cfg, "ddim", 100)
    print(f"\n[{name}] {count_parameters(model) / 1e6:.2f} M params, {cfg.model.im_size} px, batch {batch}, "
          f"attention {cfg.model.attention}, autocast {amp or 'off'}")
    print(f"  training : {batch / t_train:8.1f} img/s  {t_train:7.3f} s/step  "
          f"{train_flops / batch / 1e9:6.2f} GFLOP/img  {train_flops / t_train / 1e9:7.1f} GFLOP/s "
          f"({100 * train_flops / t_train / 1e9 / peak:.0f}% of peak)")
    print(f"  denoiser : {batch / t_fwd:8.1f} img/s per network evaluation  "
          f"{fwd_flops / t_fwd / 1e9:7.1f} GFLOP/s ({100 * fwd_flops / t_fwd / 1e9 / peak:.0f}% of peak)")
    print(f"  sampling : {batch / (t_fwd * len(ddim.timesteps)):8.2f} img/s with DDIM-{len(ddim.timesteps)}, "
          f"{batch / (t_fwd * cfg.diffusion.num_train_timesteps):8.3f} img/s with DDPM-"
          f"{cfg.diffusion.num_train_timesteps}")


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--models", nargs="+", default=["default", "diffuseseg64"],
                        choices=["default", "diffuseseg64"], help="which model configs to time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure (median)")
    parser.add_argument("--diffuseseg-batch", type=int, default=8, help="batch for the DiffuseSeg 64 px config")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    peak = matmul_peak_gflops(device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"measured fp32 matmul peak (2048^3): {peak:.1f} GFLOP/s")
    if "default" in args.models:
        bench_model("default toy config", cfg, cfg.train.batch_size, device, args.steps, peak)
    if "diffuseseg64" in args.models:
        ds = dataclasses.replace(cfg, model=model_config_from_diffuseseg(DIFFUSESEG_64))
        bench_model("DiffuseSeg 64 px config", ds, args.diffuseseg_batch, device, args.steps, peak)


if __name__ == "__main__":
    run_main(main)
