"""Segmenting a set of images into a folder, optionally across ``torchrun`` ranks: masks (index PNGs with
the palette embedded), colour masks and overlays, ``uncertainty.csv`` (the official per-image score),
``grid.png`` and, with ground truth, ``metrics.json``.

Under torchrun each rank segments one contiguous block of the images and writes their files and an
uncertainty shard; rank 0 then merges the shards and computes the grid and the metrics from the masks
on disk, so the folder is byte-identical to one process's.
"""
from __future__ import annotations

import csv
import io
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

from diffuseseg.config import Config, save_config
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.label_formats import ClassList, palette_image, read_index_mask
from diffuseseg.metrics import METRICS_FILE, SegmentationReport, evaluate
from diffuseseg.runtime import Distributed, barrier, batched, rank_share
from diffuseseg.segmentation import Readout, configured_views, segment
from diffuseseg.visualize import colorize, overlay, save_grid

UNCERTAINTY_FILE = "uncertainty.csv"


def _csv(rows: list[tuple[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows((n, f"{s:.6f}") for n, s in rows)
    return buffer.getvalue()


def segment_to_folder(cfg: Config, extractor, readout: Readout, classes: ClassList, names: list[str],
                      images: np.ndarray, gt: np.ndarray | None, out: str | Path, *,
                      dist_info: Distributed = Distributed(), progress: bool = True) -> SegmentationReport | None:
    """Segment ``images`` into ``out`` (see the module docstring); returns the metrics on rank 0 when
    ``gt`` is given, else None."""
    out = Path(out)
    with exclusive_folder(out) if dist_info.is_main else nullcontext():
        if dist_info.is_main:
            save_config(cfg, out / "config.yaml")
        barrier(dist_info)
        # Whole batches per rank (runtime.batched): the folder stays byte-identical to one process's.
        mine = [i for batch in rank_share(batched(range(len(names)), cfg.features.batch_size), dist_info.rank,
                                          dist_info.world_size) for i in batch]
        result = segment(extractor, readout, images[mine], vote_mode=cfg.ensemble.vote,
                         views=configured_views(cfg, classes.names, "test"), keys=mine,
                         batch_size=cfg.features.batch_size, progress=progress and dist_info.is_main)
        for i, mask in zip(mine, result.masks):
            atomic_save_image(palette_image(mask, classes.palette), out / "masks" / f"{names[i]}.png")
            if cfg.segment.save_overlays:
                atomic_save_image(Image.fromarray(colorize(mask, classes.palette)), out / "colour" / f"{names[i]}.png")
                atomic_save_image(Image.fromarray(overlay(images[i], mask, classes.palette)),
                                  out / "overlay" / f"{names[i]}.png")
        shard = out / f"{UNCERTAINTY_FILE}.rank{dist_info.rank}"
        atomic_write_text(shard, _csv([(names[i], float(s)) for i, s in zip(mine, result.image_scores)]))
        barrier(dist_info)
        if not dist_info.is_main:
            return None
        shards = [out / f"{UNCERTAINTY_FILE}.rank{r}" for r in range(dist_info.world_size)]
        atomic_write_text(out / UNCERTAINTY_FILE, "name,uncertainty\r\n" + "".join(p.read_text() for p in shards))
        for p in shards:
            p.unlink()
        masks = np.stack([read_index_mask(out / "masks" / f"{n}.png", len(classes.names)) for n in names])
        shown = slice(0, min(16, len(names)))
        columns = [images[shown]] + ([colorize(gt[shown], classes.palette)] if gt is not None else [])
        columns.append(colorize(masks[shown], classes.palette))
        save_grid(np.stack(columns, axis=1).reshape(-1, *images.shape[1:]), out / "grid.png",
                  nrow=len(columns) * 2, scale=3)
        if gt is None:
            return None
        report = evaluate(list(masks), list(gt), classes.names, cfg.labels.ignore_index)
        atomic_write_text(out / METRICS_FILE, report.to_json())
        return report
