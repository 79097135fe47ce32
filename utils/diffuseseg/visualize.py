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


# Distinct, colour-blind-friendly line colours (Okabe & Ito).
LINE_COLOURS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
                (240, 228, 66), (0, 0, 0)]


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (480, 340), log_x: bool = False,
               levels: dict[str, float] | None = None) -> Image.Image:
    """A small line chart (one line with point markers per series, legend, axis ticks) drawn with PIL,
    so plotting needs no extra package. ``log_x``: a logarithmic x axis ticked at the data's x values (label
    counts); ``levels``: named horizontal lines across the chart (a ceiling)."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 52, 130, 26, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    levels = levels or {}
    points = [p for line in series.values() for p in line]
    if not points:
        raise ValueError("nothing to plot")
    if log_x and min(x for x, _ in points) <= 0:
        raise ValueError("a logarithmic x axis needs x > 0")
    fx = math.log10 if log_x else float
    xs = sorted({x for x, _ in points})
    x_lo, x_hi = (fx(xs[0]), fx(xs[-1])) if log_x else (0.0, xs[-1])
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0
    ys = [y for _, y in points] + list(levels.values())
    y_lo, y_hi = min(ys), max(ys)
    margin = 0.08 * (y_hi - y_lo) or 0.05
    y_lo, y_hi = y_lo - margin, y_hi + margin

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(90, 90, 90))
    x_ticks = xs if log_x else [x_lo + i * (x_hi - x_lo) / 4 for i in range(5)]
    for x in x_ticks:  # ticks and light grid
        px, _ = to_px(x, y_lo)
        draw.line([px, top, px, height - bottom], fill=(232, 232, 232))
        draw.text((px, height - bottom + 4), f"{x:g}", fill="black", font=font, anchor="ma")
    for i in range(5):
        _, py = to_px(xs[0] if log_x else x_lo, y_lo + i * (y_hi - y_lo) / 4)
        draw.line([left, py, width - right, py], fill=(232, 232, 232))
        draw.text((left - 4, py), f"{y_lo + i * (y_hi - y_lo) / 4:.3f}", fill="black", font=font, anchor="rm")
    draw.text(((left + width - right) / 2, 6), title, fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) / 2, height - 14), xlabel + (" (log scale)" if log_x else ""), fill="black",
              font=font, anchor="ma")
    draw.text((4, top - 16), ylabel, fill="black", font=font)
    for k, (name, line) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        xy = [to_px(x, y) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 6 + 16 * k
        draw.line([width - right + 8, ly, width - right + 24, ly], fill=colour, width=3)
        draw.text((width - right + 28, ly), name, fill="black", font=font, anchor="lm")
    for k, (name, y) in enumerate(levels.items(), start=len(series)):
        _, py = to_px(xs[0], y)
        for x0 in range(left, width - right, 10):  # dashed, so it reads as a reference, not a series
            draw.line([x0, py, min(x0 + 5, width - right), py], fill=(60, 60, 60), width=2)
        ly = top + 6 + 16 * k
        draw.line([width - right + 8, ly, width - right + 13, ly], fill=(60, 60, 60), width=2)
        draw.line([width - right + 18, ly, width - right + 24, ly], fill=(60, 60, 60), width=2)
        draw.text((width - right + 28, ly), name, fill="black", font=font, anchor="lm")
    return image


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Pictures of the same height in one row."""
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out
