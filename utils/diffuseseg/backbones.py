"""Pretrained diffusers ``UNet2DModel`` checkpoints as the frozen DDPM (``model.backbone=diffusers``).

Most users of this method start from a published unconditional DDPM (e.g. the ``ddpm-ema-*-256``
family), which ships as a diffusers folder. Two layouts are read:

* a model folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), optionally
  ``scheduler_config.json`` beside them;
* a pipeline folder: ``model_index.json``, ``unet/`` (as above) and ``scheduler/scheduler_config.json``.

``run.checkpoint`` is such a folder, or a Hugging Face hub id (``ORG/NAME``, where no such folder exists): its
files are then taken from the Hugging Face cache, and downloaded into it where missing, by huggingface_hub's
``snapshot_download`` (the cache, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` rules that diffusers'
``from_pretrained`` uses); ``from_pretrained`` then loads the snapshot folder like any other. Only the two
layouts' files are fetched, safetensors weights in preference to ``.bin``. Offline, unknown or unreachable:
one line saying how to get the files (``hub_snapshot``).

``DiffusersUNet`` gives such a model this project's U-Net interface: ``model(x, t)`` is the network's
prediction, ``block_names`` / ``forward_features`` read named blocks (``down_blocks.<i>``, ``mid_block``,
``up_blocks.<i>``, or any finer module such as ``up_blocks.1.resnets.0``) through forward hooks and stop
the forward pass after the last one. The noise schedule comes from the checkpoint's scheduler config
(``adopt_checkpoint_schedule``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import Tensor, nn

from diffuseseg.config import Config, ConfigError, DiffusionConfig
from diffuseseg.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers name -> ours
PREDICTION_TYPES = ("epsilon", "v_prediction")


class BackboneError(UserError):
    """A diffusers checkpoint folder that cannot be used as configured."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME, as the hub spells model ids
# What either layout needs from a hub repository; the weights are asked for one format at a time.
HUB_CONFIG_FILES = ["model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
                    "scheduler/scheduler_config.json"]


def is_hub_id(path: str | Path) -> bool:
    """``path`` names no file or folder here and reads as a hub model id ``ORG/NAME``."""
    return not Path(path).exists() and HUB_ID.fullmatch(str(path)) is not None


def _download_hint(repo_id: str) -> str:
    # `hf` is huggingface_hub's CLI from 1.0 on (the one installed here); older installs have huggingface-cli.
    return (f"download it where there is network (`hf download {repo_id} --local-dir DIR`, or `huggingface-cli "
            f"download {repo_id} --local-dir DIR` with huggingface_hub < 1.0), copy DIR here and set "
            f"run.checkpoint=DIR")


@functools.lru_cache(maxsize=None)
def hub_snapshot(repo_id: str) -> Path:
    """The Hugging Face cache's snapshot folder of hub model ``repo_id`` with the files either layout needs,
    downloading those missing (see the module docstring); BackboneError in one line where it cannot."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read again so that a later setting counts too.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    where = f"run.checkpoint={repo_id}: no such folder here, and as a Hugging Face hub id"
    try:
        for weights in WEIGHT_FILES:  # safetensors first: .bin is fetched only where the repository has no other
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_CONFIG_FILES + [weights, f"unet/{weights}"],
                                            local_files_only=offline))
            if (folder / weights).is_file() or (folder / "unet" / weights).is_file():
                break
    except HFValidationError as err:  # e.g. "a--b/c": reads as ORG/NAME here, but the hub allows no such id
        raise BackboneError(f"diffusers checkpoint folder not found: {repo_id} (nor is it a valid hub id: "
                            f"{str(err).splitlines()[0]})") from None
    except RepositoryNotFoundError:  # also gated repositories
        raise BackboneError(f"{where} it is not on the Hub, or is private or gated (log in with `hf auth login`)"
                            ) from None
    except LocalEntryNotFoundError:  # not (completely) in the cache, and the Hub not asked or not reachable
        if offline:
            raise BackboneError(f"{where} it is not in the cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                                f"set: unset HF_HUB_OFFLINE to download it into the cache, or "
                                f"{_download_hint(repo_id)}") from None
        raise BackboneError(f"{where} it is not in the cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
                            f"reached: {_download_hint(repo_id)}") from None
    except HfHubHTTPError as err:
        raise BackboneError(f"{where} the Hub refused it ({str(err).splitlines()[0]})") from None
    if not folder.is_dir():
        raise BackboneError(f"{where} it has no diffusers UNet2DModel files (config.json and "
                            f"{' or '.join(WEIGHT_FILES)}, at its root or under unet/)")
    return folder


def checkpoint_root(path: str | Path) -> Path:
    """``run.checkpoint`` as a local path: the path itself, or a hub id's snapshot folder in the cache."""
    return hub_snapshot(str(path)) if is_hub_id(path) else Path(path)


def model_folder(path: str | Path) -> Path:
    """The folder holding the U-Net's ``config.json`` and weights, for either layout (a hub id: in its
    snapshot); a clear error for anything else (a file, a folder of another kind)."""
    p = checkpoint_root(path)
    if not p.exists():
        raise BackboneError(f"diffusers checkpoint folder not found: {path} (nor is it a hub id ORG/NAME)")
    if not p.is_dir():
        raise BackboneError(f"{path} is a file; model.backbone=diffusers needs a diffusers folder (config.json + "
                            f"weights, or a pipeline folder with model_index.json and unet/) or a hub id")
    if (p / "model_index.json").is_file() and (p / "unet").is_dir():
        p = p / "unet"
    if not (p / "config.json").is_file():
        raise BackboneError(f"{path}: no config.json (a UNet2DModel folder) and no model_index.json with unet/ "
                            "(a pipeline folder)")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise BackboneError(f"{p}: no weights ({' or '.join(WEIGHT_FILES)})")
    return p


def scheduler_config(path: str | Path) -> tuple[dict, Path] | None:
    """The checkpoint's scheduler config and its file (pipeline: scheduler/; model folder: beside it)."""
    root = checkpoint_root(path)
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                      model_folder(root) / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()), candidate
    return None


def adopt_checkpoint_schedule(cfg: Config) -> Config:
    """``cfg`` with the diffusion schedule of the checkpoint's scheduler config. A key the YAML sets to
    something other than its default and other than the checkpoint's value is a ConfigError naming both
    (the weights were trained with one schedule; features and samples need that one)."""
    found = scheduler_config(cfg.run.checkpoint)
    if found is None:
        return cfg
    sched, where = found
    beta = sched.get("beta_schedule", "linear")
    if beta not in BETA_SCHEDULES:
        raise BackboneError(f"{where}: beta_schedule {beta!r} is not supported (supported: {sorted(BETA_SCHEDULES)})")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise BackboneError(f"{where}: prediction_type {prediction!r} is not supported (supported: {PREDICTION_TYPES})")
    theirs = {"num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
              "beta_schedule": BETA_SCHEDULES[beta], "beta_start": float(sched.get("beta_start", 1e-4)),
              "beta_end": float(sched.get("beta_end", 0.02)), "prediction_type": prediction}
    defaults, ours = DiffusionConfig(), cfg.diffusion
    clashes = [f"diffusion.{k}: config {getattr(ours, k)!r} != checkpoint {v!r}" for k, v in theirs.items()
               if getattr(ours, k) != getattr(defaults, k) and getattr(ours, k) != v]
    if clashes:
        raise ConfigError(f"the YAML's noise schedule contradicts {where}: " + "; ".join(clashes)
                          + ". Remove those keys (the checkpoint's schedule is used) or use another checkpoint.")
    return dataclasses.replace(cfg, diffusion=dataclasses.replace(ours, **theirs))


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` behind this project's U-Net interface."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        c = net.config
        self.cfg = SimpleNamespace(im_size=int(c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]),
                                   im_channels=int(c.in_channels))

    @property
    def block_names(self) -> list[str]:
        n_down, n_up = len(self.net.down_blocks), len(self.net.up_blocks)
        return [f"down_blocks.{i}" for i in range(n_down)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(n_up)]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, return_dict=False)[0]

    def forward_features(self, x: Tensor, t: Tensor, blocks: Sequence[str]) -> dict[str, Tensor]:
        """Outputs of the named modules for (x, t); the pass stops after the last of them runs."""
        if not blocks:
            raise ValueError("forward_features needs at least one block name")
        modules = dict(self.net.named_modules())
        unknown = [b for b in blocks if b not in modules]
        if unknown:
            raise KeyError(f"unknown U-Net block(s) {unknown}; blocks: {self.block_names} (or finer module names)")
        captured: dict[str, Tensor] = {}

        class _Done(Exception):
            pass

        def hook(name: str):
            def grab(module, inputs, output):
                captured[name] = output[0] if isinstance(output, tuple) else output
                if len(captured) == len(blocks):
                    raise _Done
            return grab

        handles = [modules[b].register_forward_hook(hook(b)) for b in blocks]
        try:
            self.net(x, t, return_dict=False)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        return {b: captured[b] for b in blocks}


def load_diffusers_unet(path: str | Path, cfg: Config | None = None,
                        device: torch.device | str = "cpu") -> DiffusersUNet:
    """The UNet2DModel in ``path`` (either layout, or a hub id; safetensors or .bin), fp32, eval mode. With
    ``cfg``, ``model.im_size`` and ``model.im_channels`` must match the checkpoint's."""
    from diffusers import UNet2DModel
    folder = model_folder(path)
    try:
        net = UNet2DModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except Exception as err:  # diffusers raises several types for foreign or damaged folders
        raise BackboneError(f"cannot load a UNet2DModel from {folder}: {str(err).splitlines()[0]}") from None
    model = DiffusersUNet(net)
    if cfg is not None:
        for key in ("im_size", "im_channels"):
            if getattr(cfg.model, key) != getattr(model.cfg, key):
                raise ConfigError(f"model.{key}: config {getattr(cfg.model, key)} != checkpoint "
                                  f"{getattr(model.cfg, key)} ({folder / 'config.json'})")
    return model.to(device).eval()


def weights_sha256(path: str | Path, length: int = 16) -> str:
    """Short content hash of the checkpoint's weights file (ties feature specs to these weights)."""
    folder = model_folder(path)
    weights = next(folder / n for n in WEIGHT_FILES if (folder / n).is_file())
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


@torch.no_grad()
def describe_blocks(model: DiffusersUNet | nn.Module, timestep: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape (C, H, W)) of every named block, from one forward pass on zeros."""
    size, channels = model.cfg.im_size, model.cfg.im_channels
    device = next(model.parameters()).device
    x = torch.zeros(1, channels, size, size, device=device)
    t = torch.full((1,), timestep, dtype=torch.long, device=device)
    outs = model.forward_features(x, t, model.block_names)
    return [(name, tuple(outs[name].shape[1:])) for name in model.block_names]


def export_diffusers(folder: str | Path, model: DiffusersUNet, cfg: Config) -> Path:
    """Write ``model`` as a diffusers pipeline folder (``model_index.json``, ``unet/`` in safetensors,
    ``scheduler/`` with this run's schedule) that ``DDPMPipeline.from_pretrained`` loads, and that this
    project reads back with ``model.backbone=diffusers``. Built beside ``folder`` and renamed into place."""
    import shutil

    from diffusers import DDPMScheduler
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.net.save_pretrained(tmp / "unet", safe_serialization=True)
    d = cfg.diffusion
    beta = {v: k for k, v in BETA_SCHEDULES.items()}[d.beta_schedule]
    DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=beta, beta_start=d.beta_start,
                  beta_end=d.beta_end, prediction_type=d.prediction_type,
                  clip_sample=cfg.diffusion.clip_sample).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}, indent=1))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
