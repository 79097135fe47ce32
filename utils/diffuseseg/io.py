"""Atomic file output: write to a temporary file beside the target, then rename.

A crash or Ctrl-C mid-write leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temp file in ``path``'s folder, fsync, rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temp files that a killed process (``kill -9`` skips the cleanup above) left under ``folder``."""
    stale = list(Path(folder).rglob(".*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_image(image: Image.Image, path: str | Path, **save_kwargs: Any) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_torch_file(path: str | Path, what: str, error: type[Exception] | None = None) -> Any:
    """``torch.load(weights_only=True)`` on CPU with one-line errors naming the file ("<what> not found",
    "cannot read <what> ...") raised as ``error`` (default: UserError)."""
    from diffuseseg.errors import UserError
    error = error or UserError
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / foreign files
        raise error(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
