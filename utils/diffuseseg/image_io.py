"""Image files: finding them, decoding them as a viewer shows them (one-line errors naming the file), and
framing them at the model's size.

``open_rgb`` decodes every file the way an image viewer shows it:

* the EXIF orientation is applied: a phone stores a portrait photo as landscape pixels plus a "rotate" tag;
* grey (``L``, ``1``) becomes three equal channels; CMYK (e.g. a print-shop JPEG) takes PIL's plain
  conversion, without colour management (an embedded ICC profile is not applied: colours are close, not
  exact);
* 16-bit (and 32-bit integer) grey is scaled to 8 bits (PIL's own conversion would clip above 255 to white);
* transparency (``RGBA``, ``LA``, a palette or RGB/grey image with a transparent colour) is composited over
  white (``TRANSPARENT_BACKGROUND``): the colour stored under a transparent pixel is whatever the saving
  program left there (often black), and white is what browsers and documents put behind it;
* a file larger than PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``, 179 MP by default) is
  refused with one line naming it and its size, rather than decoded at a reduced size (``Image.draft``): masks
  come at each photo's own size, which a silently shrunk decode could not honour. Between one and two times
  ``MAX_IMAGE_PIXELS`` (89-179 MP, e.g. a 108 MP phone photo) PIL only warns; such a file decodes, without
  the warning.

``frame`` places a decoded image in the model's square input (``center``: shorter side scaled to it, the
middle kept; ``pad``: longer side scaled to it, the rest filled with ``PAD_FILL``) and returns a ``Framing``
that says where the photo's pixels lie in that square, so predictions can be mapped back onto the photo.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffuseseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TRANSPARENT_BACKGROUND = (255, 255, 255)  # what a transparent pixel shows: white, as on a web page
# Mid grey: 0 in the model's [-1, 1] input range, no colour and no brightness pulled either way. The padded
# border is never mapped back onto the photo; it only has to disturb the features of pixels near it least.
PAD_FILL = (128, 128, 128)
CROP_MODES = ("center", "pad")


def list_images(root: str | Path) -> list[Path]:
    """All png/jpg/jpeg files under ``root`` (recursive, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images under {root}")
    return files


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _too_large(path: str | Path, err: Exception) -> DataError:
    # PIL names the pixel count only in its message ("Image size (N pixels) exceeds limit of M pixels, ...").
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found[1]):,} pixels" if found else str(err)
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return DataError(f"image {path} is too large to decode safely: {size}, above the limit of {limit:,} (PIL's "
                     f"decompression-bomb guard, 2 x PIL.Image.MAX_IMAGE_PIXELS); downscale it first, e.g. to half "
                     f"its width and height")


def open_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB, as a viewer shows it (see the module docstring); DataError naming the file
    when it cannot be decoded or is too large."""
    try:
        with warnings.catch_warnings():
            # Only the 1x-2x zone warns; above it PIL raises, and that is caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey
                    grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                    return Image.fromarray(grey).convert("RGB")
                if _has_alpha(img):
                    background = Image.new("RGBA", img.size, TRANSPARENT_BACKGROUND + (255,))
                    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
                return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        # SyntaxError: what PIL's plugins raise for some malformed headers (and EXIF blocks)
        raise DataError(f"cannot decode image {path}: {err}") from None


def open_rgb_or_skip(path: str | Path, on_bad_image: str = "fail") -> Image.Image | None:
    """``open_rgb`` under ``data.on_bad_image``: a file that cannot be decoded stops the run with one line
    naming it and the key ("fail"), or is reported in a warning and returned as None ("skip")."""
    try:
        return open_rgb(path)
    except DataError as err:
        if on_bad_image == "fail":
            raise DataError(f"{err} (set data.on_bad_image=skip to skip such files)") from None
        warnings.warn(f"skipping {err}", stacklevel=3)
        return None


@dataclass(frozen=True)
class Framing:
    """Where a photo lies in the model's ``side`` x ``side`` input.

    ``size``: the photo's (width, height) as shown; ``resized``: its size after scaling; ``offset``: where the
    scaled photo's top-left corner lands in the square (negative with ``center``: cut off; positive with
    ``pad``: border). The photo's full extent covers ``box`` = (left, top, right, bottom) in model pixels."""
    size: tuple[int, int]
    side: int
    resized: tuple[int, int]
    offset: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        (x, y), (w, h) = self.offset, self.resized
        return x, y, x + w, y + h

    @property
    def is_identity(self) -> bool:
        """The photo is the model's input, pixel for pixel (not moved or scaled, as a shift or zoom would)."""
        return self.size == self.resized == (self.side, self.side) and self.offset == (0, 0)


def framing(size: tuple[int, int], side: int, crop: str = "center") -> Framing:
    """The framing of an image of ``size`` (width, height) at ``side``: ``center`` scales the shorter side to
    ``side`` and keeps the middle (the long side's ends are cut off); ``pad`` scales the longer side to
    ``side`` and centres the image on a ``PAD_FILL`` border (nothing is cut off)."""
    w, h = size
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_MODES}")
    if (w, h) == (side, side):
        return Framing(size, side, (side, side), (0, 0))
    if crop == "center":
        scale = side / min(w, h)
        rw, rh = max(side, round(w * scale)), max(side, round(h * scale))
        return Framing(size, side, (rw, rh), (-((rw - side) // 2), -((rh - side) // 2)))
    scale = side / max(w, h)
    rw, rh = min(side, max(1, round(w * scale))), min(side, max(1, round(h * scale)))
    return Framing(size, side, (rw, rh), ((side - rw) // 2, (side - rh) // 2))


def frame(img: Image.Image, where: Framing, resample: int = Image.BICUBIC,
          fill: int | tuple[int, ...] = PAD_FILL) -> Image.Image:
    """``img`` (of ``where.size``) placed in the model's square as ``where`` says; ``fill`` where it does not
    reach (``pad``, or a framing moved or scaled as robustness.py makes). Masks: ``Image.NEAREST`` and the ignore index as ``fill``."""
    if img.size != where.size:
        raise ValueError(f"image is {img.size}, its framing is for {where.size}")
    if where.is_identity:
        return img
    scaled = img.resize(where.resized, resample)
    (x, y), (w, h) = where.offset, where.resized
    if x <= 0 and y <= 0 and x + w >= where.side and y + h >= where.side:  # the square lies inside: a crop
        return scaled.crop((-x, -y, -x + where.side, -y + where.side))
    canvas = Image.new(img.mode, (where.side, where.side), fill)
    canvas.paste(scaled, (x, y))
    return canvas


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Scale the shorter side to ``size`` (smooth filter by default), then crop the centre."""
    return frame(img, framing(img.size, size, "center"), resample)
