"""Safe file output: atomic writes (a temporary file beside the target, then rename) and one writer
per run folder.

A crash or Ctrl-C mid-write leaves either the old file or the new one, never half of one; two
processes never write into the same run folder at once.
"""
from __future__ import annotations

import fcntl
import io
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's 0600 would hide outputs from others


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temp file in ``path``'s folder, fsync, rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
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


LOCK_FILE = ".lock"


@contextmanager
def exclusive_folder(folder: str | Path, lock_name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold ``folder/<lock_name>`` (created with the folder) while the block runs; a second process that
    asks for the same lock gets a UserError naming the holder. The lock is an ``flock``: the kernel drops
    it when its process dies, even by kill -9, so a stale lock file is simply taken over. (An output that
    is replaced by renaming, like a feature store, is locked from its parent: ``lock_name=".<name>.lock"``.)"""
    from diffuseseg.errors import UserError
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / lock_name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        where = folder if lock_name == LOCK_FILE else folder / lock_name.strip(".").removesuffix(".lock")
        raise UserError(f"{where} is in use by {holder}: wait for it to finish, or choose another output "
                        "folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    try:
        yield folder
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
