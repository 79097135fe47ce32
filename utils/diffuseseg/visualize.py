"""Pictures people would rather look at than read: image grids, colourised masks, overlays."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffuseseg.io import atomic_save_image, atomic_write


def image_grid(images: np.ndarray | Sequence[np.ndarray], nrow: int | None = None, pad: int = 2,
               scale: int = 1, background: int = 255) -> Image.Image:
    """uint8 images (N, H, W, 3) tiled row-major into one picture, optionally up-scaled (nearest)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    canvas = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), background, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    grid = Image.fromarray(canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    return atomic_save_image(image_grid(images, nrow, scale=scale), path)


def colorize(masks: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-id masks (..., H, W) -> RGB (..., H, W, 3) with the class palette."""
    return np.asarray(palette, np.uint8)[masks]


def overlay(images: np.ndarray, masks: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend colourised masks over images (both uint8, same H and W)."""
    blended = (1 - alpha) * images.astype(np.float32) + alpha * colorize(masks, palette).astype(np.float32)
    return blended.round().astype(np.uint8)


def save_animation(frames: Sequence[np.ndarray], path: str | Path, nrow: int | None = None, scale: int = 2,
                   frame_ms: int = 200, hold_last_ms: int = 1500, max_frames: int = 12) -> Path:
    """An animated GIF of image grids, one per frame (each frame uint8 (N, H, W, 3)), e.g. the
    denoising trajectory; at most ``max_frames`` evenly spaced frames (first and last kept: a GIF of every
    sampler step is megabytes), the last one held so the result can be seen. Written atomically."""
    if not frames:
        raise ValueError("no frames to animate")
    if len(frames) > max_frames:
        frames = [frames[round(i * (len(frames) - 1) / (max_frames - 1))] for i in range(max_frames)]
    grids = [image_grid(f, nrow, scale=scale) for f in frames]
    durations = [frame_ms] * (len(grids) - 1) + [hold_last_ms]

    def write(f) -> None:
        grids[0].save(f, format="GIF", save_all=True, append_images=grids[1:], duration=durations, loop=0)
    return atomic_write(Path(path), write)
