"""Image files: finding them, decoding them (one-line errors naming the file), resizing them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffuseseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

def list_images(root: str | Path) -> list[Path]:
    """All png/jpg/jpeg files under ``root`` (recursive, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images under {root}")
    return files


def open_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB: grey becomes three equal channels, alpha is dropped, and 16-bit grey is
    scaled to 8 bits (PIL's own conversion would clip every value above 255 to white)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey
                grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                return Image.fromarray(grey).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Scale the shorter side to ``size`` (smooth filter by default), then crop the centre."""
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img
