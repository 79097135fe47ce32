"""Segmenting a set of images into a folder, optionally across ``torchrun`` ranks: masks (index PNGs with
the palette embedded), colour masks and overlays, ``uncertainty.csv`` (the official per-image score),
``grid.png`` (image | ground truth | prediction | overlay, as the model saw them) and, with ground truth,
``metrics.json``.

Photos (``segment.input_dir``) come back at their own size and framing. The model sees each one framed to
its square input (``segment.crop``: ``center`` cuts off the long side's ends, ``pad`` shows the whole photo
on a grey border; ``image_io.frame``); each member's class probabilities are then upsampled bilinearly
(as ``F.interpolate(..., align_corners=False)``) from the read-out's grid to the photo pixels it covers and
voted as ``ensemble.vote`` says. A photo pixel whose centre the model did not see (with ``center``: the cut-off
ends) is not guessed: its mask value is ``labels.ignore_index``, and the colour mask and the overlay show it
greyed with dark diagonal hatching. Where a photo is the model's input pixel for pixel, the masks are the
model's own, exactly. The grid shows what the model saw: its input and the mask framed the same way.

Under torchrun each rank segments one contiguous block of the images and writes their files and an
uncertainty shard; rank 0 then merges the shards and computes the grid and the metrics from the masks
on disk, so the folder is byte-identical to one process's.
"""
from __future__ import annotations

import csv
import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from diffuseseg.config import Config, save_config
from diffuseseg.errors import DataError
from diffuseseg.image_io import Framing, frame, framing, list_images, open_rgb, open_rgb_or_skip
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.label_formats import ClassList, palette_image, read_index_mask
from diffuseseg.metrics import METRICS_FILE, SegmentationReport, evaluate
from diffuseseg.pixel_classifier import vote
from diffuseseg.runtime import Distributed, barrier, batched, rank_share
from diffuseseg.segmentation import Readout, classify_scores, configured_views, image_member_scores
from diffuseseg.visualize import overlay, save_grid

if TYPE_CHECKING:
    from diffuseseg.photo_faces import FaceSegmenter

UNCERTAINTY_FILE = "uncertainty.csv"
UNSEEN_GREY = (128, 128, 128)  # colour of ignore / not-seen pixels in the masks' palette and colour masks
# Work per strip of photo rows, so that a 100 MP photo needs bounded memory: pixels when drawing, and
# member x class x pixel values (float32) when upsampling.
STRIP_PIXELS = 1 << 20
STRIP_VALUES = 1 << 22


@dataclass(frozen=True)
class Photo:
    """An input file and where its pixels lie in the model's input."""
    path: Path
    where: Framing


def photo_name(path: Path, root: Path) -> str:
    """A photo's output name: its path under ``root`` without suffix, '/' -> '_'."""
    return path.relative_to(root).with_suffix("").as_posix().replace("/", "_")


def read_photos(root: str | Path, side: int, crop: str = "center",
                on_bad_image: str = "fail") -> tuple[list[str], list[Photo], np.ndarray]:
    """Every image under ``root``: (names, photos, model inputs (N, side, side, 3) uint8). A name is the
    file's path under ``root`` without suffix, '/' -> '_'. An undecodable file stops with one line naming it,
    or with ``on_bad_image='skip'`` is left out with a warning (no masks are written for it)."""
    root = Path(root)
    names, photos, images = [], [], []
    for path in list_images(root):
        img = open_rgb_or_skip(path, on_bad_image)
        if img is None:
            continue
        where = framing(img.size, side, crop)
        names.append(photo_name(path, root))
        photos.append(Photo(path, where))
        images.append(np.asarray(frame(img, where)))
    if not images:
        raise DataError(f"no decodable image under {root}")
    return names, photos, np.stack(images)


def _seen(n: int, lo: int, hi: int, side: int) -> tuple[slice, np.ndarray]:
    """One axis of a photo of ``n`` pixels spanning [lo, hi) model pixels: the (contiguous) range of pixels
    whose centre lies in the model's [0, side), and those centres in model pixels."""
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    inside = np.flatnonzero((centres >= 0) & (centres < side))
    span = slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)
    return span, centres[span]


def seen_region(where: Framing) -> tuple[slice, slice]:
    """(rows, columns) of the photo pixels the model saw: all of them with ``pad``, the middle with ``center``."""
    (width, height), (left, top, right, bottom) = where.size, where.box
    return _seen(height, top, bottom, where.side)[0], _seen(width, left, right, where.side)[0]


def _axis(n: int, lo: int, hi: int, side: int, grid: int) -> tuple[slice, Tensor, Tensor, Tensor]:
    """One axis of the upsampling: the photo pixels the model saw (``_seen``), and for each the two read-out
    cells (of ``grid``) and the second one's weight, as bilinear ``F.interpolate(align_corners=False)``."""
    span, centres = _seen(n, lo, hi, side)
    src = np.maximum(centres * grid / side - 0.5, 0.0)
    first = np.floor(src).astype(np.int64)
    second = np.minimum(first + 1, grid - 1)
    return span, torch.from_numpy(first), torch.from_numpy(second), torch.from_numpy(src - first).float()


@torch.no_grad()
def photo_mask(scores: Tensor, where: Framing, vote_mode: str = "majority", ignore_index: int = 255) -> np.ndarray:
    """The mask (H, W) uint8 of a photo at its own size, from its members' scores (E, L, L, C) on the
    read-out's grid (``member_scores``): each member's softmax upsampled bilinearly to the photo pixels
    the model saw, then voted; ``ignore_index`` where the model saw nothing (see the module docstring).

    Only pixels between grid cells whose labels differ are computed: a bilinear sample is a convex combination
    of its four neighbouring cells' probabilities, so where a member's argmax (with ``mean_softmax``: the mean's
    argmax) is one class at all four, it is that class at every point between them, and so is the vote. The
    rest of a large photo (inside parts, the background) is filled from the grid's own vote; the result is
    the per-pixel computation's (a 1024 px photo costs a fraction of it)."""
    members, grid, _, classes = scores.shape
    if where.is_identity and grid == where.side:  # the model's pixels: its own vote, not a re-computed one
        return vote(scores.reshape(members, -1, classes), vote_mode).reshape(grid, grid).cpu().numpy().astype(np.uint8)
    (width, height), (left, top, right, bottom) = where.size, where.box
    cols, x0, x1, wx = _axis(width, left, right, where.side, grid)
    rows, y0, y1, wy = _axis(height, top, bottom, where.side, grid)
    mask = np.full((height, width), ignore_index, np.uint8)
    probs = scores.float().softmax(-1).cpu()
    # each member's class at each grid cell (one "member", the mean, for mean_softmax) and the cells' vote
    corner = probs.argmax(-1) if vote_mode == "majority" else probs.mean(0).argmax(-1)[None]
    at_cells = vote(scores.float().cpu().reshape(members, -1, classes), vote_mode).reshape(grid, grid)
    after = torch.clamp(torch.arange(grid) + 1, max=grid - 1)      # the next cell, the last one its own
    same = ((corner == corner[:, after]) & (corner == corner[:, :, after])
            & (corner == corner[:, after][:, :, after])).all(0)     # (L, L): the cell and its 3 next agree
    at_cells, same = at_cells.index_select(1, x0), same.index_select(1, x0)   # the photo's columns
    flat = probs.reshape(members, grid * grid, classes)

    def cell(at: Tensor) -> Tensor:  # (E, n, C): the cells ``at`` of the flat grid
        return flat.index_select(1, at)
    step = max(1, STRIP_VALUES // max(1, members * classes * len(x0)))
    for lo in range(0, len(y0), step):
        sl = slice(lo, lo + step)
        ys, h = y0[sl], len(y0[sl])
        labels = at_cells.index_select(0, ys)                        # (h, W seen): right wherever the cell agrees
        r, c = (~same.index_select(0, ys)).nonzero(as_tuple=True)
        if len(r):
            w, v = wy[sl][r][None, :, None], wx[c][None, :, None]
            top, bottom = ys[r] * grid, y1[sl][r] * grid
            left, right = x0[c], x1[c]
            blend = ((cell(top + left) * (1 - v) + cell(top + right) * v) * (1 - w)
                     + (cell(bottom + left) * (1 - v) + cell(bottom + right) * v) * w)   # (E, n, C)
            # vote() reads scores whose softmax is the probabilities: their log. A majority reads only each
            # member's argmax, the same on the probabilities, so the costly log is skipped there.
            blend = blend if vote_mode == "majority" else blend.clamp_min(1e-30).log()
            labels[r, c] = vote(blend, vote_mode)
        mask[rows.start + lo: rows.start + lo + h, cols] = labels.numpy()
    return mask


def mask_palette(classes: ClassList, ignore_index: int) -> np.ndarray:
    """(256, 3) colours of mask values: the classes', and ``UNSEEN_GREY`` for ``ignore_index`` (where it is
    not a class id)."""
    colours = np.zeros((256, 3), np.uint8)
    if ignore_index >= len(classes.palette):
        colours[ignore_index] = UNSEEN_GREY
    colours[: len(classes.palette)] = classes.palette
    return colours


def _hatch(rgb: np.ndarray, unseen: np.ndarray, period: int, first_row: int = 0) -> np.ndarray:
    """``rgb`` (rows ``first_row``... of a picture) with the ``unseen`` pixels greyed (half contrast, no colour)
    and crossed by dark diagonal lines every ``period`` pixels: visibly 'not predicted', yet the photo can still
    be made out under them."""
    out = rgb.copy()
    if not unseen.any():
        return out
    rows = np.arange(first_row, first_row + unseen.shape[0], dtype=np.int64)[:, None]
    lines = (rows + np.arange(unseen.shape[1], dtype=np.int64)[None, :]) % period < max(1, period // 4)
    grey = 64 + 0.5 * (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    out[unseen] = np.round(grey[unseen]).astype(np.uint8)[:, None]
    out[unseen & lines] = 40
    return out


def _colour_and_overlay(image: np.ndarray | None, mask: np.ndarray, colours: np.ndarray,
                        seen: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour mask and (with ``image``) overlay of a mask, strip by strip (photos can be large); pixels outside
    ``seen`` (rows, columns; None: all seen) hatched. Seen-ness comes from the framing, not from the mask's
    values: ``labels.ignore_index`` may be a class id."""
    colour = np.empty((*mask.shape, 3), np.uint8)
    blend = None if image is None else np.empty_like(colour)
    outside = np.ones(mask.shape, bool)
    outside[seen or (slice(None), slice(None))] = False
    period = max(8, min(mask.shape) // 32)  # lines a few pixels apart however large the photo
    step = max(1, STRIP_PIXELS // max(1, mask.shape[1]))
    for lo in range(0, mask.shape[0], step):
        m = mask[lo:lo + step]
        unseen = outside[lo:lo + step]
        colour[lo:lo + step] = _hatch(colours[m], unseen, period, lo)
        if blend is not None:
            blend[lo:lo + step] = np.where(unseen[..., None], _hatch(image[lo:lo + step], unseen, period, lo),
                                           overlay(image[lo:lo + step], m, colours))
    return colour, blend


def _save_colour_and_overlay(out: Path, name: str, picture: np.ndarray, mask: np.ndarray, colours: np.ndarray,
                             seen: tuple[slice, slice] | None) -> None:
    colour, blend = _colour_and_overlay(picture, mask, colours, seen)
    atomic_save_image(Image.fromarray(colour), out / "colour" / f"{name}.png")
    atomic_save_image(Image.fromarray(blend), out / "overlay" / f"{name}.png")


def _merge_uncertainty(out: Path, rows: list[tuple[str, float]], dist_info: Distributed) -> int | None:
    """Write this rank's (name, score) rows as a shard; on rank 0, after every rank has, merge the shards into
    uncertainty.csv in rank order (one process's file) and return the row count; None on the other ranks."""
    atomic_write_text(out / f"{UNCERTAINTY_FILE}.rank{dist_info.rank}", _csv(rows))
    barrier(dist_info)
    if not dist_info.is_main:
        return None
    shards = [out / f"{UNCERTAINTY_FILE}.rank{r}" for r in range(dist_info.world_size)]
    merged = "".join(p.read_text() for p in shards)
    atomic_write_text(out / UNCERTAINTY_FILE, "name,uncertainty\r\n" + merged)
    for p in shards:
        p.unlink()
    return merged.count("\n")


def _csv(rows: list[tuple[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows((n, f"{s:.6f}") for n, s in rows)
    return buffer.getvalue()


def segment_to_folder(cfg: Config, extractor, readout: Readout, classes: ClassList, names: list[str],
                      images: np.ndarray, gt: np.ndarray | None, out: str | Path, *,
                      photos: Sequence[Photo] | None = None, dist_info: Distributed = Distributed(),
                      progress: bool = True) -> SegmentationReport | None:
    """Segment ``images`` (the model's inputs, (N, S, S, 3) uint8) into ``out`` (see the module docstring);
    with ``photos`` (from ``read_photos``) the outputs come at each photo's own size. Returns the metrics on
    rank 0 when ``gt`` is given, else None."""
    out = Path(out)
    ignore = cfg.labels.ignore_index
    colours = mask_palette(classes, ignore)
    views = configured_views(cfg, classes.names, "test")
    with exclusive_folder(out) if dist_info.is_main else nullcontext():
        if dist_info.is_main:
            save_config(cfg, out / "config.yaml")
        barrier(dist_info)
        # Whole batches per rank (runtime.batched): the folder stays byte-identical to one process's.
        mine = rank_share(batched(range(len(names)), cfg.features.batch_size), dist_info.rank, dist_info.world_size)
        rows = []
        for batch in tqdm(mine, desc="segment", unit="batch", disable=not (progress and dist_info.is_main)):
            scores = image_member_scores(extractor, readout, images[batch], views, batch, cfg.features.batch_size)
            n, s = len(batch), extractor.label_size
            result = classify_scores(scores, n, s, cfg.ensemble.vote, out_size=images.shape[1])
            per_image = scores.reshape(scores.shape[0], n, s, s, -1)
            for k, i in enumerate(batch):
                if photos is None:
                    mask = result.masks[k]
                else:
                    mask = photo_mask(per_image[:, k], photos[i].where, cfg.ensemble.vote, ignore)
                atomic_save_image(palette_image(mask, colours), out / "masks" / f"{names[i]}.png")
                if cfg.segment.save_overlays:
                    # decoded again rather than kept from read_photos: a folder of 12 MP photos held at full
                    # size would need gigabytes; only the model-size inputs are kept
                    picture = images[i] if photos is None else np.asarray(open_rgb(photos[i].path))
                    seen = None if photos is None else seen_region(photos[i].where)
                    _save_colour_and_overlay(out, names[i], picture, mask, colours, seen)
            rows += [(names[i], float(score)) for i, score in zip(batch, result.image_scores)]
        if _merge_uncertainty(out, rows, dist_info) is None:
            return None

        def written(i: int) -> np.ndarray:  # a mask from disk, in the model's frame
            mask = read_index_mask(out / "masks" / f"{names[i]}.png", len(classes.names), ignore)
            if photos is None:
                return mask
            return np.asarray(frame(Image.fromarray(mask), photos[i].where, Image.NEAREST, fill=ignore))
        shown = range(min(16, len(names)))
        masks = np.stack([written(i) for i in (range(len(names)) if gt is not None else shown)])
        columns = [images[:len(shown)]] + ([colours[gt[:len(shown)]]] if gt is not None else [])
        columns.append(colours[masks[:len(shown)]])
        columns.append(overlay(images[:len(shown)], masks[:len(shown)], colours))
        save_grid(np.stack(columns, axis=1).reshape(-1, *images.shape[1:]), out / "grid.png",
                  nrow=len(columns) * 2, scale=3)
        if gt is None:
            return None
        report = evaluate(list(masks), list(gt), classes.names, ignore)
        atomic_write_text(out / METRICS_FILE, report.to_json())
        return report


FACES_FOLDER = "faces"  # <name>.json per photo: each face's box, landmarks, transform and uncertainty


def segment_faces_to_folder(cfg: Config, faces: "FaceSegmenter", classes: ClassList, root: str | Path,
                            out: str | Path, *, dist_info: Distributed = Distributed(), progress: bool = True) -> int:
    """Segment every photo under ``root`` face by face (``photo_faces.FaceSegmenter``, segment.align=auto) into
    ``out``: masks, colour masks and overlays at each photo's size, faces/<name>.json, uncertainty.csv (a
    photo's least certain face) and grid.png (photo | mask | overlay, letterboxed). A photo without a face gets
    one line saying so and an all-background mask; an undecodable one stops the run or, with
    data.on_bad_image=skip, is left out with a warning. Returns the number of photos written (on rank 0)."""
    out, root = Path(out), Path(root)
    colours = mask_palette(classes, cfg.labels.ignore_index)
    files = list_images(root)
    names = [photo_name(p, root) for p in files]
    with exclusive_folder(out) if dist_info.is_main else nullcontext():
        if dist_info.is_main:
            save_config(cfg, out / "config.yaml")
        barrier(dist_info)
        mine = rank_share(batched(range(len(files)), cfg.features.batch_size), dist_info.rank, dist_info.world_size)
        rows = []
        for batch in tqdm(mine, desc="segment faces", unit="batch", disable=not (progress and dist_info.is_main)):
            photos = [(i, open_rgb_or_skip(files[i], cfg.data.on_bad_image)) for i in batch]
            photos = [(i, img) for i, img in photos if img is not None]
            for (i, img), result in zip(photos, faces.segment([img for _, img in photos])):
                if result.message:
                    print(f"{files[i]}: {result.message}")
                atomic_save_image(palette_image(result.mask, colours), out / "masks" / f"{names[i]}.png")
                atomic_write_text(out / FACES_FOLDER / f"{names[i]}.json", result.to_json())
                if cfg.segment.save_overlays:
                    snapped = result.faces and result.faces[0].snapped  # plain framing: its unseen ends hatched
                    seen = seen_region(framing(img.size, faces.side, faces.crop)) if snapped else None
                    _save_colour_and_overlay(out, names[i], np.asarray(img), result.mask, colours, seen)
                rows.append((names[i], result.uncertainty))
        count = _merge_uncertainty(out, rows, dist_info)
        if count is None:
            return 0
        written = [i for i in range(len(files)) if (out / "masks" / f"{names[i]}.png").is_file()][:16]
        if written:  # from the files on disk: the same grid whatever the ranks
            tiles = [_thumbnails(np.asarray(open_rgb(files[i])),
                                 read_index_mask(out / "masks" / f"{names[i]}.png", len(classes.names),
                                                 cfg.labels.ignore_index), colours, cfg.labels.ignore_index)
                     for i in written]
            save_grid(np.concatenate(tiles), out / "grid.png", nrow=6, scale=1)
        return count


def _thumbnails(picture: np.ndarray, mask: np.ndarray, colours: np.ndarray, ignore_index: int,
                side: int = 192) -> np.ndarray:
    """(3, side, side, 3): the photo, its colour mask and the overlay, each scaled to fit a grey square."""
    where = framing((picture.shape[1], picture.shape[0]), side, "pad")
    photo = np.asarray(frame(Image.fromarray(picture), where))
    m = np.asarray(frame(Image.fromarray(mask), where, Image.NEAREST, fill=ignore_index))
    return np.stack([photo, colours[m], overlay(photo, m, colours)])
