"""Ensemble files: ours (one file, with its metadata) and DiffuseSeg's / the official per-member MLP files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from diffuseseg.errors import UserError
from diffuseseg.io import atomic_torch_save, load_torch_file
from diffuseseg.pixel_classifier.model import ENSEMBLE_FORMAT, PixelEnsemble


MEMBER_FILE_PATTERNS = (r"mlp_(\d+)_best\.pt", r"model_(\d+)\.pth")  # DiffuseSeg, official ddpm-segmentation


def member_files(folder: str | Path) -> list[Path]:
    """DiffuseSeg's ``mlp_<k>_best.pt`` (or the official ``model_<k>.pth``) files in ``folder``, by k."""
    folder = Path(folder)
    for pattern in MEMBER_FILE_PATTERNS:
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
        if found:
            return [p for _, p in sorted(found)]
    raise UserError(f"{folder}: no pixel-MLP files in this folder (expected mlp_<k>_best.pt from DiffuseSeg "
                    f"or model_<k>.pth from ddpm-segmentation)")


def load_diffuseseg_mlps(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> PixelEnsemble:
    """An ensemble from DiffuseSeg's ``mlp_<k>_best.pt`` (or official ``model_<k>.pth``) files."""
    dicts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"MLP file not found: {path}")
        try:
            dicts.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # torch raises several types for corrupt / foreign files
            raise UserError(f"cannot read MLP file {path}: {str(err).splitlines()[0]}") from None
    try:
        return PixelEnsemble.from_member_state_dicts(dicts).to(device)
    except UserError as err:  # name the file instead of the member index
        message = str(err)
        for k, path in enumerate(paths):
            message = message.replace(f"MLP {k}:", f"{path}:")
        raise UserError(message) from None


def _check_plain(value: Any, where: str = "meta") -> None:
    """Raise unless ``value`` loads back with ``torch.load(weights_only=True)``."""
    # Exact types: numpy scalars subclass float but do not load with weights_only=True.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; ensemble meta may hold only dicts, lists, "
                    "tuples, str, numbers, bools, None and tensors (e.g. use FeatureSpec.to_dict())")


def save_ensemble(path: str | Path, ensemble: PixelEnsemble, meta: dict | None = None) -> Path:
    """Write the stacked weights, the architecture and the caller's ``meta`` (class names, palette,
    feature spec ...) atomically, in a file ``torch.load(weights_only=True)`` can read."""
    meta = dict(meta or {})
    _check_plain(meta)
    return atomic_torch_save({
        "format": ENSEMBLE_FORMAT,
        "config": ensemble.config(),
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
        "meta": meta,
    }, path)


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> tuple[PixelEnsemble, dict]:
    """(ensemble in eval mode, meta) from a ``save_ensemble`` file."""
    path = Path(path)
    obj = load_torch_file(path, "ensemble file")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != ENSEMBLE_FORMAT:
        hint = ""
        if isinstance(obj, dict) and ("fc1.weight" in obj or "model_state_dict" in obj
                                      or "layers.0.weight" in obj or "module.layers.0.weight" in obj):
            hint = " It looks like a single pixel MLP: load a set of those with load_diffuseseg_mlps([...])."
        found = f"format {fmt!r}" if fmt is not None else f"a {type(obj).__name__} without a format tag"
        raise UserError(f"{path} is not a pixel ensemble file (expected format {ENSEMBLE_FORMAT!r}, "
                        f"found {found}).{hint}")
    try:
        cfg = obj["config"]
        ensemble = PixelEnsemble(cfg["in_dim"], cfg["num_classes"], cfg["members"], tuple(cfg["hidden"]),
                                 cfg["layer_order"])
        ensemble.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: damaged ensemble file ({str(err).splitlines()[0]})") from None
    return ensemble.to(device).eval(), obj.get("meta", {})
