"""Saving and loading DDPM weights: training checkpoints, exported weights, DiffuseSeg ``.pth``.

Three formats load through ``load_unet``:
* a training checkpoint (``format: diffuseseg-train/1``): model, EMA, optimizer, step, config;
* exported weights (``format: diffuseseg-weights/1``): one state_dict (e.g. EMA in fp16) + config;
* a plain ``state_dict`` as DiffuseSeg saves it (``DDPM_Celeb_*.pth``), built with the given config.
Everything is read with ``torch.load(weights_only=True)`` and written atomically.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffuseseg.config import Config, config_to_dict, diff_sections
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_torch_save, load_torch_file
from diffuseseg.unet import UNet

TRAIN_FORMAT = "diffuseseg-train/1"
WEIGHTS_FORMAT = "diffuseseg-weights/1"
# Diffusion keys that change what the network learned (sampling-only keys may differ freely).
TRAINED_DIFFUSION_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the configured model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    obj = load_torch_file(path, "checkpoint", CheckpointError)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (state_dict or DiffuseSeg checkpoint), got {type(obj).__name__}")
    return obj


def trained_config(cfg: Config) -> dict:
    """The part of a config that a set of U-Net weights depends on."""
    model = config_to_dict(cfg.model)
    model.pop("dropout")
    diffusion = {k: getattr(cfg.diffusion, k) for k in TRAINED_DIFFUSION_KEYS}
    return {"model": model, "diffusion": diffusion}


# Model keys added after checkpoints were already written, with the value every earlier checkpoint had.
LATER_MODEL_KEYS = {"backbone": "native"}


def check_compatible(stored_config: dict, cfg: Config, path: str | Path) -> None:
    """Raise if the checkpoint was trained with a different model or diffusion config."""
    stored_model = {**LATER_MODEL_KEYS, **stored_config.get("model", {})}
    stored = {"model": {k: v for k, v in stored_model.items() if k != "dropout"},
              "diffusion": {k: v for k, v in stored_config.get("diffusion", {}).items()
                            if k in TRAINED_DIFFUSION_KEYS}}
    differences = diff_sections(stored, trained_config(cfg))
    if differences:
        raise CheckpointError(f"{path} was trained with a different config (checkpoint != current): "
                              + "; ".join(differences)
                              + ". Use the config it was trained with, or --set the keys above.")


def save_training_state(path: str | Path, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, cfg: Config, extra: dict | None = None) -> Path:
    return atomic_torch_save({
        "format": TRAIN_FORMAT, "step": step, "config": config_to_dict(cfg),
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
        **(extra or {}),
    }, path)


def export_weights(path: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config,
                   dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
    """Inference weights only (e.g. the EMA model in fp16: half the size, same samples)."""
    weights = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state_dict.items()}
    # Never replace good weights with NaN/inf (a diverged run, or values beyond fp16's range).
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"not writing {path}: {len(bad)} tensors are NaN/inf in {dtype} (first: {bad[0]}); "
                              "the training diverged or its weights exceed that type's range")
    return atomic_torch_save({"format": WEIGHTS_FORMAT, "config": trained_config(cfg),
                              "state_dict": weights, **(extra or {})}, path)


def unet_state_dict(obj: dict, path: str | Path, use_ema: bool = True) -> tuple[dict, dict | None]:
    """(state_dict, stored config or None) from any supported checkpoint format."""
    fmt = obj.get("format")
    if fmt == TRAIN_FORMAT:
        return obj["ema" if use_ema else "model"], obj["config"]
    if fmt == WEIGHTS_FORMAT:
        return obj["state_dict"], obj["config"]
    if fmt is not None:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None  # a plain state_dict (DiffuseSeg's DDPM .pth)
    raise CheckpointError(f"{path}: neither a state_dict nor a DiffuseSeg checkpoint (keys: {sorted(obj)[:8]})")


def stored_prediction_type(path: str | Path) -> str | None:
    """What the U-Net weights in ``path`` were trained to predict, where the file says (ours do; DiffuseSeg's
    ``.pth`` state dicts do not: None)."""
    stored_config = unet_state_dict(read_checkpoint(path), path, True)[1]
    return (stored_config or {}).get("diffusion", {}).get("prediction_type")


def load_unet(path: str | Path, cfg: Config, *, use_ema: bool = True, device: torch.device | str = "cpu",
              any_prediction_type: bool = False) -> UNet:
    """A U-Net built from ``cfg.model`` with the weights in ``path`` (fp32, eval mode); with
    ``model.backbone=diffusers``, the diffusers UNet2DModel folder or hub id at ``path``.

    ``any_prediction_type``: accept weights trained to predict something other than
    ``cfg.diffusion.prediction_type`` (a new training run may fine-tune them into it); every other model and
    diffusion key must still match."""
    if cfg.model.backbone == "diffusers":
        from diffuseseg.backbones import load_diffusers_unet  # diffusers is imported only when asked for
        return load_diffusers_unet(path, cfg, device)
    state, stored_config = unet_state_dict(read_checkpoint(path), path, use_ema)
    if stored_config is not None:
        stored_type = stored_config.get("diffusion", {}).get("prediction_type")
        if any_prediction_type and stored_type is not None:
            cfg = replace(cfg, diffusion=replace(cfg.diffusion, prediction_type=stored_type))
        check_compatible(stored_config, cfg, path)
    model = UNet(cfg.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
        raise CheckpointError(f"{path} does not fit model config {cfg.model}: "
                              + (f"missing keys: {show(missing)}. " if missing else "")
                              + (f"unexpected keys: {show(unexpected)}." if unexpected else ""))
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(f"{path}: parameter shapes differ from the model config "
                              f"(checkpoint != model): {'; '.join(shapes[:10])}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def build_unet(cfg: Config, pretrained: bool = True) -> nn.Module:
    """The configured network for training or as a baseline: this project's U-Net (fresh), or the
    diffusers model at ``run.checkpoint`` with its weights (``pretrained``) or freshly initialised."""
    if cfg.model.backbone != "diffusers":
        return UNet(cfg.model)
    from diffuseseg.backbones import DiffusersUNet, load_diffusers_unet
    model = load_diffusers_unet(cfg.run.checkpoint, cfg)
    if pretrained:
        return model.train()
    from diffusers import UNet2DModel
    return DiffusersUNet(UNet2DModel.from_config(model.net.config))


def file_sha256(path: str | Path, length: int = 16) -> str:
    """Short content hash of a file (identifies the DDPM behind a feature spec); of the weights file for
    a diffusers folder or hub id (the same weights give the same hash either way)."""
    from diffuseseg.backbones import is_hub_id, weights_sha256
    if Path(path).is_dir() or is_hub_id(path):
        return weights_sha256(path, length)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
