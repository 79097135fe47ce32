"""DDPM training: AdamW with warmup, gradient clipping, EMA, optional mixed precision, DDP,
atomic checkpoints, exact resume, sample grids and a JSONL log.

All randomness of step ``s`` (data, timesteps, noise, dropout) is derived from (run.seed, s, rank),
so ``k`` steps + resume + ``k`` steps gives bit-identical weights to ``2k`` uninterrupted steps,
and no RNG state has to be carried in the checkpoint.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from diffuseseg.checkpoint import (build_unet, check_compatible, export_weights, load_unet, read_checkpoint,
                                   save_training_state, stored_prediction_type)
from diffuseseg.config import Config, save_config
from diffuseseg.datasets import training_batches, training_image_files
from diffuseseg.diffusion import diffusion_loss
from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteGuard
from diffuseseg.io import exclusive_folder
from diffuseseg.runtime import autocast, autocast_dtype, device_for, init_distributed, maybe_compile, thread_scope
from diffuseseg.sampling import generate_images, schedule_from_config
from diffuseseg.unet import count_parameters
from diffuseseg.visualize import save_grid

LAST_CHECKPOINT = "last.pt"
EMA_WEIGHTS = "ema_fp16.pt"
SNAPSHOTS = "snapshots"  # EMA weights kept every train.snapshot_every_min


def snapshot_name(minute: float) -> str:
    """File name of the EMA snapshot at ``minute`` training minutes (``snapshot_minute`` reads it back)."""
    return f"ema_fp16_min{minute:g}.pt"


SNAPSHOT_GLOB = snapshot_name(0).replace("min0", "min*")


def snapshot_minute(name: str) -> float:
    return float(name.removeprefix("ema_fp16_min").removesuffix(".pt"))
EMA_DIFFUSERS = "ema_diffusers"  # a diffusers backbone's EMA, in save_pretrained layout (a pipeline folder)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    stopped_by: str  # "max_steps", "time_budget" or "interrupt"


def ema_decay(cfg: Config, step: int) -> float:
    if cfg.train.ema_warmup:
        return min(cfg.train.ema_decay, (1 + step) / (10 + step))
    return cfg.train.ema_decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)


def run_progress(cfg: Config, step: int, train_seconds: float) -> float:
    """How far the run is, 0..1: by steps or by the time budget, whichever ends it first."""
    progress = step / cfg.train.max_steps
    if cfg.train.time_budget_min:
        progress = max(progress, train_seconds / (cfg.train.time_budget_min * 60))
    return min(1.0, progress)


def learning_rate(cfg: Config, step: int, progress: float = 0.0) -> float:
    """Linear warmup, then constant or a cosine decay over the run's progress (0..1).

    A time-budgeted run decays by the clock, so a run that stops by its budget ends annealed
    (annealing is where the reference model's val mIoU rose most)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))
    if cfg.train.lr_schedule == "constant":
        return cfg.train.lr * warmup
    floor = cfg.train.lr_min_ratio
    decay = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.train.lr * warmup * decay


class _StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint is a
    clean step boundary); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _step_seed(cfg: Config, step: int, rank: int) -> int:
    return (cfg.run.seed * 1_000_003 + step) * 64 + rank


def _progress_bar(cfg: Config, step: int, train_seconds: float, enabled: bool) -> tqdm:
    """Counts steps, or training minutes when a time budget is set (so elapsed and remaining are
    times, not a step count the budget will never reach). Minutes spent sampling grids are not counted."""
    if cfg.train.time_budget_min:
        return tqdm(total=round(cfg.train.time_budget_min, 2), initial=round(train_seconds / 60, 2),
                    desc="train ddpm", unit="min", dynamic_ncols=True, disable=not enabled,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.train.max_steps, initial=step, desc="train ddpm", unit="step", dynamic_ncols=True,
                disable=not enabled)


def train_ddpm(cfg: Config, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a DDPM as configured; returns where the run lives and why it stopped.
    The run folder has one writer: a second run into it is refused while this one lives."""
    dist_info = init_distributed()
    init_state = _check_before_writing(cfg, dist_info, resume)
    with exclusive_folder(cfg.train.out_dir) if dist_info.is_main else nullcontext(), thread_scope(cfg.run.threads):
        return _train_ddpm(cfg, dist_info, resume, progress, init_state)


def _check_before_writing(cfg: Config, dist_info, resume: bool) -> dict | None:
    """The mistakes that need no run folder (device, image folder, weights to start from, --resume
    without a run) are reported before the folder is made, so a refused run leaves no output.
    Returns the ``train.init_weights`` state dict of a new run (None without one)."""
    device_for(dist_info, cfg.run.device)
    if cfg.data.source == "folder":
        training_image_files(cfg)
    ckpt_path = Path(cfg.train.out_dir) / LAST_CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}")
        return None
    if not cfg.train.init_weights:
        return None
    # A new run may change what the weights predict: fine-tuning an ε model into a v-prediction one is how
    # Stable Diffusion 2's 768-v model was made, and far cheaper than training it from scratch.
    weights = load_unet(cfg.train.init_weights, cfg, any_prediction_type=True)
    stored = stored_prediction_type(cfg.train.init_weights)
    if stored not in (None, cfg.diffusion.prediction_type) and dist_info.is_main:
        print(f"train.init_weights {cfg.train.init_weights} was trained to predict {stored}: this run fine-tunes "
              f"it to predict {cfg.diffusion.prediction_type} (diffusion.prediction_type)")
    return weights.state_dict()


def _train_ddpm(cfg: Config, dist_info, resume: bool, progress: bool, init_state: dict | None) -> TrainResult:
    device = device_for(dist_info, cfg.run.device)
    out = Path(cfg.train.out_dir)
    ckpt_path = out / LAST_CHECKPOINT

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_unet(cfg).to(device)  # a diffusers backbone starts from its pretrained weights
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    step = 0
    train_seconds = 0.0  # wall-clock seconds spent in training steps, carried across resumes
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        check_compatible(state["config"], cfg, ckpt_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        train_seconds = float(state.get("train_seconds", 0.0))
    elif resume:  # the file went away since _check_before_writing
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    elif ckpt_path.is_file():
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another "
                        f"train.out_dir")
    elif init_state is not None:
        # Fine-tune / train longer from exported weights: model and EMA start equal, optimizer fresh.
        model.load_state_dict(init_state)
        ema.load_state_dict(model.state_dict())
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if dist_info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # Compiled or not, the plain ``model`` is what is checkpointed, clipped and averaged into the EMA.
    net = maybe_compile(net, cfg.train.compile, cfg.run.compile_backend)

    schedule = schedule_from_config(cfg.diffusion)
    amp_dtype = autocast_dtype(device, cfg.train.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    def checkpoint() -> None:
        if dist_info.is_main:
            save_training_state(ckpt_path, model=model, ema=ema, optimizer=optimizer, step=step, cfg=cfg,
                                extra={"train_seconds": train_seconds})
            if cfg.model.backbone == "diffusers":
                from diffuseseg.backbones import export_diffusers
                export_diffusers(out / EMA_DIFFUSERS, ema, cfg)
            else:
                export_weights(out / EMA_WEIGHTS, ema.state_dict(), cfg, extra={"step": step})

    batches = training_batches(cfg, step, dist_info.rank, dist_info.world_size)
    budget_s = cfg.train.time_budget_min * 60 if cfg.train.time_budget_min else math.inf
    bar = _progress_bar(cfg, step, train_seconds, enabled=progress and dist_info.is_main)
    log = (out / "train_log.jsonl").open("a") if dist_info.is_main else None
    window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
    stopped_by = "max_steps"
    if dist_info.is_main and step == 0:
        print(f"model: {count_parameters(model) / 1e6:.2f} M parameters, device {device}, "
              f"autocast {amp_dtype or 'off'}, world size {dist_info.world_size}")
    interrupted = _StopOnInterrupt()
    guard = NonFiniteGuard("train ddpm", cfg.train.max_bad_steps,
                           hint="Lower train.lr, keep train.grad_clip on, or resume from the last checkpoint.")
    try:
        while step < cfg.train.max_steps:
            if interrupted.requested:
                stopped_by = "interrupt"
                if dist_info.is_main:
                    print(f"\ninterrupted at step {step}: saving a checkpoint to {ckpt_path}")
                break
            if train_seconds >= budget_s:
                stopped_by = "time_budget"
                break
            step_start = time.monotonic()
            x0 = next(batches).to(device, non_blocking=True)
            if cfg.train.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            seed = _step_seed(cfg, step, dist_info.rank)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, run_progress(cfg, step, train_seconds))
            with autocast(device, amp_dtype):
                loss = diffusion_loss(net, schedule, x0, prediction_type=cfg.diffusion.prediction_type,
                                      loss_weighting=cfg.diffusion.loss_weighting,
                                      min_snr_gamma=cfg.diffusion.min_snr_gamma, generator=generator)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            # fp16's scaler skips overflowing steps itself (that is how it finds its scale): only the loss counts there.
            if guard.ok(step, loss.detach(), None if scaler.is_enabled() else model.parameters()):
                scaler.step(optimizer)
                scaler.update()
                update_ema(ema, model, ema_decay(cfg, step))
            optimizer.zero_grad(set_to_none=True)
            step += 1

            window_loss += loss.item() if math.isfinite(loss.item()) else 0.0
            window_images += x0.shape[0] * dist_info.world_size
            step_seconds = time.monotonic() - step_start
            train_seconds += step_seconds
            bar.update(min(step_seconds / 60, bar.total - bar.n) if cfg.train.time_budget_min else 1)  # no 101 %
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                n = cfg.train.log_every if step % cfg.train.log_every == 0 else step % cfg.train.log_every
                lr = optimizer.param_groups[0]["lr"]
                record = {"step": step, "loss": window_loss / max(1, n), "lr": lr,
                          "img_per_s": window_images / elapsed, "skipped_nonfinite": guard.skipped,
                          "time": time.time()}
                bar.set_postfix(step=step, loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
            if step % cfg.train.ckpt_every == 0:
                checkpoint()
            every_s = cfg.train.snapshot_every_min * 60
            if every_s and dist_info.is_main and train_seconds // every_s > (train_seconds - step_seconds) // every_s:
                minute = int(train_seconds // every_s) * cfg.train.snapshot_every_min
                export_weights(out / SNAPSHOTS / snapshot_name(minute), ema.state_dict(), cfg,
                               extra={"step": step, "train_seconds": train_seconds})
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and dist_info.is_main:
                images = generate_images(ema, cfg, cfg.train.sample_images, sampler="ddim",
                                         steps=cfg.train.sample_steps, seed=cfg.run.seed, device=device,
                                         progress=False)
                save_grid(images, out / "samples" / f"step_{step:07d}.png", scale=2)
    finally:
        interrupted.restore()
        bar.close()
        if log:
            log.close()
    checkpoint()
    return TrainResult(out, step, stopped_by)
