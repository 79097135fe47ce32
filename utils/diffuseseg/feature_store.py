"""Pixel features of a labeled set on disk: fp16 rows in one memory-mapped ``.npy`` with their labels.

The official implementation holds every training pixel as one float32 tensor in RAM (~210 GB for
50 images at 256 px). Here features are streamed batch by batch to disk, so peak RAM is one batch,
whatever the number of images, and the ensemble trainer reads rows on demand from a memory map.

Layout of a store folder: ``features.npy`` (N, D) float16, ``labels.npy`` (N,) uint8, ``meta.json``
(row count, feature spec, class names, source images, views). With several views (``views.py``), each
image contributes the rows of each of its views. The folder is built under a temporary name
and renamed into place when complete, so a crash never leaves a half-written store behind; under
torchrun the ranks extract parts that rank 0 concatenates.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from diffuseseg.datasets import LabeledFolder
from diffuseseg.errors import DataError
from diffuseseg.io import exclusive_folder
from diffuseseg.runtime import Distributed, barrier, batched, rank_share
from diffuseseg.segmentation import view_features, view_training_pixels
from diffuseseg.views import NO_VIEWS, ViewSet


@dataclass
class FeatureStore:
    features: np.ndarray  # (N, D) float16 memory map
    labels: np.ndarray    # (N,) uint8
    meta: dict

    @classmethod
    def open(cls, folder: str | Path) -> "FeatureStore":
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no feature store at {folder} (run utils/extract_features.py first)")
        meta = json.loads(meta_path.read_text())
        n = meta["rows"]
        features = np.load(folder / "features.npy", mmap_mode="r")[:n]
        labels = np.load(folder / "labels.npy", mmap_mode="r")[:n]
        return cls(features, labels, meta)


class _NpyAppender:
    """A ``.npy`` file of shape (capacity, *row_shape) written by appending rows with plain writes.

    Plain writes, unlike a writable memory map, do not count the written pages in the process's
    resident memory, so peak RSS stays one batch whatever the store's size. The unwritten tail is a
    sparse hole; readers use the first ``meta["rows"]`` rows."""

    def __init__(self, path: Path, dtype, capacity: int, *row_shape: int) -> None:
        self.dtype = np.dtype(dtype)
        self.file = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (capacity, *row_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)
        self.end = self.file.tell() + capacity * self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.file.truncate(self.end)  # full declared size; the unwritten rows stay a hole
        self.file.close()


def write_feature_store(folder: str | Path, extractor, split: LabeledFolder, indices: Sequence[int], *,
                        batch_size: int, min_pixels: int, ignore_index: int, views: ViewSet | None = None,
                        progress: bool = True, dist_info: Distributed = Distributed()) -> Path:
    """Extract features of ``split[indices]`` (in every view of ``views``; None = the images as they
    are) and stream the labeled pixels into ``folder``.

    Under torchrun each rank extracts a contiguous block of ``indices`` into its own part; rank 0 then
    concatenates the parts in order, so the store is byte-identical to one process's."""
    folder = Path(folder)
    with exclusive_folder(folder.parent, f".{folder.name}.lock") if dist_info.is_main else nullcontext():
        return _write_feature_store(folder, extractor, split, indices, batch_size=batch_size, min_pixels=min_pixels,
                                    ignore_index=ignore_index, views=views or NO_VIEWS, progress=progress,
                                    dist_info=dist_info)


def _write_feature_store(folder: Path, extractor, split: LabeledFolder, indices: Sequence[int], *, batch_size: int,
                         min_pixels: int, ignore_index: int, views: ViewSet, progress: bool,
                         dist_info: Distributed) -> Path:
    tmp = folder.with_name(folder.name + ".partial")
    capacity = len(indices) * len(views) * extractor.label_size ** 2  # upper bound; the unused tail stays sparse
    single = dist_info.world_size == 1
    part = tmp if single else folder.with_name(f"{folder.name}.partial.rank{dist_info.rank}")
    # Whole batches per rank: rows are laid out batch by batch (views within a batch), so the same
    # batches give the same store.
    mine = [i for batch in rank_share(batched(indices, batch_size), dist_info.rank, dist_info.world_size)
            for i in batch]
    rows, names = _extract_into(part, extractor, split, mine, capacity if single else len(mine) * len(views)
                                * extractor.label_size ** 2, batch_size=batch_size, min_pixels=min_pixels,
                                ignore_index=ignore_index, views=views, progress=progress and dist_info.is_main)
    (part / "part.json").write_text(json.dumps({"rows": rows, "images": names}))
    barrier(dist_info)
    if dist_info.is_main:
        parts = [tmp] if single else [folder.with_name(f"{folder.name}.partial.rank{r}")
                                      for r in range(dist_info.world_size)]
        if not single:
            _concatenate(parts, tmp, capacity, extractor.dim)
        done = [json.loads((p / "part.json").read_text()) for p in parts]
        (tmp / "part.json").unlink(missing_ok=True)
        for p in parts if not single else []:
            shutil.rmtree(p)
        meta = {"rows": sum(d["rows"] for d in done), "dim": extractor.dim, "spec": extractor.spec.to_dict(),
                "images": [n for d in done for n in d["images"]], "class_names": split.classes.names,
                "palette": split.classes.palette.tolist(), "ignore_index": ignore_index, "min_pixels": min_pixels,
                "views": views.name}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _install(tmp, folder)
    barrier(dist_info)
    return folder


def _extract_into(tmp: Path, extractor, split: LabeledFolder, indices: Sequence[int], capacity: int, *,
                  batch_size: int, min_pixels: int, ignore_index: int, views: ViewSet,
                  progress: bool) -> tuple[int, list[str]]:
    """Stream the labeled pixel rows of ``split[indices]`` into ``tmp``/{features,labels}.npy."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = _NpyAppender(tmp / "features.npy", np.float16, capacity, extractor.dim)
    labels = _NpyAppender(tmp / "labels.npy", np.uint8, capacity)
    rows, names = 0, []
    num_classes = len(split.classes.names)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
        items = [split[i] for i in batch]
        images, masks = np.stack([it.image for it in items]), np.stack([it.mask for it in items])
        bad = (masks >= num_classes) & (masks != ignore_index)
        if bad.any():
            raise DataError(f"class ids >= {num_classes} in masks of {[it.name for it in items]}")
        x, y = view_training_pixels(view_features(extractor, images, views, batch, len(batch)), masks, views,
                                    min_pixels, ignore_index)
        features.append(x)
        labels.append(y)
        rows += len(y)
        names += [it.name for it in items]
    features.close()
    labels.close()
    return rows, names


def _concatenate(parts: Sequence[Path], tmp: Path, capacity: int, dim: int, chunk: int = 1 << 16) -> None:
    """The rows of every part, in order, streamed into one store at ``tmp`` (memory: one chunk)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = _NpyAppender(tmp / "features.npy", np.float16, capacity, dim)
    labels = _NpyAppender(tmp / "labels.npy", np.uint8, capacity)
    for part in parts:
        rows = json.loads((part / "part.json").read_text())["rows"]
        x, y = np.load(part / "features.npy", mmap_mode="r"), np.load(part / "labels.npy", mmap_mode="r")
        for lo in range(0, rows, chunk):
            features.append(x[lo:min(lo + chunk, rows)])
            labels.append(y[lo:min(lo + chunk, rows)])
    features.close()
    labels.close()


def _install(tmp: Path, folder: Path) -> None:
    """Rename the finished store into place (the previous one, if any, is removed only afterwards)."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def spilled_view_features(extractor, images: np.ndarray, views: ViewSet, indices: Sequence[int], *,
                          batch_size: int, store_dir: str | Path, ram_limit_mb: float, what: str,
                          keys: Sequence[int] | None = None,
                          progress: bool = False) -> tuple[list[np.ndarray], tempfile.TemporaryDirectory | None]:
    """``view_features_of`` in RAM while the maps take at most ``ram_limit_mb`` megabytes, else memory-mapped in a
    scratch folder under ``store_dir`` (named after ``what``), returned beside them: the caller drops the maps,
    then calls its ``cleanup``. None: in RAM."""
    side = extractor.label_size
    megabytes = len(indices) * len(views.views) * side * side * extractor.dim * 2 / 2 ** 20  # fp16
    scratch = None
    if megabytes > ram_limit_mb:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=f".{what}-", dir=store_dir)
    features = view_features_of(extractor, images, views, indices, batch_size=batch_size, keys=keys,
                                folder=scratch.name if scratch else None, progress=progress)
    return features, scratch


def view_features_of(extractor, images: np.ndarray, views: ViewSet, indices: Sequence[int], *, batch_size: int,
                     folder: str | Path | None = None, progress: bool = False,
                     keys: Sequence[int] | None = None) -> list[np.ndarray]:
    """``view_features`` of ``images[indices]`` (feature noise keyed by ``keys``, default those positions), one
    (len(indices), S, S, D) float16 array per view: in RAM, or with ``folder`` written batch by batch into
    memory-mapped ``view<i>.npy`` files there, so that thousands of images never need their features in RAM."""
    indices = np.asarray(indices, dtype=np.int64)
    keys = indices if keys is None else np.asarray(keys, dtype=np.int64)
    if folder is None:
        return view_features(extractor, images[indices], views, keys, batch_size, progress)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    side = extractor.label_size
    maps = [np.lib.format.open_memmap(folder / f"view{i}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(indices), side, side, extractor.dim)) for i in range(len(views.views))]
    for lo in tqdm(range(0, len(indices), batch_size), desc="features to disk", unit="batch", disable=not progress):
        part = indices[lo:lo + batch_size]
        for m, f in zip(maps, view_features(extractor, images[part], views, keys[lo:lo + batch_size], batch_size),
                        strict=True):
            m[lo:lo + len(part)] = f
    for m in maps:
        m.flush()
    return maps
