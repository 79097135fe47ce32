"""Data for the stages: image folders, labeled splits (any ``label_formats`` layout, resized to the model's
size), the embedded toy-face splits rendered on first use, and the DDPM's training streams.

Layering: ``image_io`` (image files) <- ``label_formats`` (class lists, mask layouts) <- this module.

Training streams are pure functions of (seed, step): the batch of step ``s`` is the same whether a
run was resumed or not, and whatever the number of DataLoader workers.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffuseseg.config import Config
from diffuseseg.errors import DataError
from diffuseseg.image_io import list_images, open_rgb, open_rgb_or_skip, resize_center_crop
from diffuseseg.label_formats import ClassList, pair_readers, resolve_classes, write_labeled_set


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ImageFolder(Dataset):
    """Images under a folder (or an explicit file list), resized and centre-cropped to ``size``, as uint8
    arrays. Decoded images are kept in memory: a 512 px JPEG decodes in milliseconds, which a small
    model's training step at 64 px would otherwise wait for every epoch."""

    def __init__(self, root: str | Path | Sequence[Path], size: int, on_bad_image: str = "fail") -> None:
        self.files = list_images(root) if isinstance(root, (str, Path)) else list(root)
        self.size, self.on_bad_image = size, on_bad_image
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = self._decode(index)
        return self._cache[index]

    def _decode(self, index: int) -> np.ndarray:
        # "skip" substitutes the next decodable file, so batch shapes and the step stream stay fixed.
        for offset in range(len(self.files)):
            img = open_rgb_or_skip(self.files[(index + offset) % len(self.files)], self.on_bad_image)
            if img is not None:
                return np.asarray(resize_center_crop(img, self.size))
        raise DataError(f"no decodable image in {self.files[0].parent}")


_RANGED_FOLDER = re.compile(r"^(?P<path>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def folder_spec(spec: str) -> tuple[str, tuple[int, int | None] | None]:
    """``PATH`` -> (PATH, None); ``PATH[start:stop]`` -> (PATH, (start, stop)): positions in the folder's files
    sorted by name, as the labeled splits' ``*_range`` keys count them; an open stop is None."""
    match = _RANGED_FOLDER.match(spec.strip())
    if not match:
        return spec, None
    return match["path"], (int(match["start"] or 0), int(match["stop"]) if match["stop"] else None)


def folder_files(spec: str) -> list[Path]:
    """The image files of one folder spec, ``PATH`` or ``PATH[start:stop]`` (``folder_spec``)."""
    path, positions = folder_spec(spec)
    files = list_images(path)
    if positions is None:
        return files
    start, stop = positions[0], len(files) if positions[1] is None else positions[1]
    if not 0 <= start < stop <= len(files):
        raise DataError(f"{spec}: range [{start}:{stop}] is outside the folder's {len(files)} images")
    return files[start:stop]


def training_image_files(cfg: Config) -> list[Path]:
    """The DDPM's training images when data.source=folder: data.root, then each of data.extra_roots."""
    return [f for spec in [cfg.data.root, *cfg.data.extra_roots] for f in folder_files(str(spec))]


# ----------------------------------------------------------------------------------------------
# labeled sets

@dataclass
class LabeledImage:
    name: str
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray   # (S, S) uint8 class ids


class LabeledFolder:
    """One split of a labeled set, sorted by name and sliced by position: (image, mask) at ``size``.

    Images are resized with a smooth filter and masks with nearest neighbour; an image and its mask
    must have the same size on disk.
    """

    def __init__(self, root: str | Path, size: int, fmt: str = "index", classes: ClassList | None = None,
                 positions: Sequence[int | None] | None = None, default_classes: ClassList | None = None) -> None:
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DataError(f"labeled data folder not found: {self.root}")
        # ``classes`` overrides; ``default_classes`` stands in only where the folder has no classes.json
        self.classes = classes or resolve_classes("", self.root, fmt, default_classes)
        readers = pair_readers()
        if fmt not in readers:
            raise DataError(f"unknown label format {fmt!r}; available: {', '.join(readers)}")
        pairs = readers[fmt](self.root, self.classes)
        start, stop = positions or (0, None)
        stop = len(pairs) if stop is None else stop  # an open range ends with the folder
        if stop > len(pairs):
            raise DataError(f"{self.root}: range [{start}, {stop}) ends past the folder's {len(pairs)} labeled images")
        self.pairs = pairs[start:stop]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> LabeledImage:
        pair = self.pairs[i]
        image = open_rgb(pair.image_path)
        mask = pair.read_mask()
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {pair.mask_source} is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{pair.image_path} is {image.width}x{image.height}")
        image = np.asarray(resize_center_crop(image, self.size))
        mask = np.asarray(resize_center_crop(Image.fromarray(mask), self.size, Image.NEAREST))
        return LabeledImage(pair.name, image, mask)

    def extend(self, other: "LabeledFolder") -> None:
        """Append ``other``'s pairs (same class list, same size): one pool read from several folders."""
        if list(other.classes.names) != list(self.classes.names) or other.size != self.size:
            raise DataError(f"{other.root} cannot join {self.root}: different class lists or sizes")
        self.pairs = self.pairs + other.pairs

    def load(self, indices: Sequence[int] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names, images (N, S, S, 3) and masks (N, S, S) of the given positions (default: all)."""
        items = [self[i] for i in (range(len(self)) if indices is None else indices)]
        return [it.name for it in items], np.stack([it.image for it in items]), np.stack([it.mask for it in items])


# ----------------------------------------------------------------------------------------------
# toy faces on disk

def toy_classes() -> ClassList:
    from diffuseseg.toy_faces import CLASS_NAMES, PALETTE
    return ClassList(list(CLASS_NAMES), np.asarray(PALETTE, np.uint8))


def labeled_split(cfg: Config, split: str, size: int = 0) -> LabeledFolder:
    """The configured labeled / val / test split, read at ``size`` px (0: model.im_size); the labeled pool
    continues into ``labels.labeled_extra``. Toy-face splits in their default place are rendered on first use,
    so the embedded default needs no preparation step."""
    lab = cfg.labels
    folder, positions = getattr(lab, f"{split}_dir"), getattr(lab, f"{split}_range")
    toy_root = Path(cfg.data.root) / split
    if Path(folder) == toy_root and not (toy_root / "classes.json").is_file():
        write_toy_split(cfg, split)
    classes = resolve_classes(lab.classes, Path(folder), lab.format)
    found = LabeledFolder(folder, size or cfg.model.im_size, lab.format, classes, positions)
    if split == "labeled" and lab.labeled_extra:
        for spec in lab.labeled_extra:
            path, extra_positions = folder_spec(str(spec))
            found.extend(LabeledFolder(path, found.size, lab.format, classes, extra_positions))
        held_out = {p.image_path.resolve() for s in ("val", "test") if Path(getattr(lab, f"{s}_dir")).is_dir()
                    for p in labeled_split(cfg, s).pairs}  # a split without its folder holds no image to leak
        leaked = [p.image_path for p in found.pairs if p.image_path.resolve() in held_out]
        if leaked:
            raise DataError(f"labels.labeled_extra: {len(leaked)} pool images are val or test images (first: "
                            f"{leaked[0]}); the labeled pool must never hold an evaluation image")
    return found


def write_toy_split(cfg: Config, split: str, root: str | Path | None = None, chunk: int = 256) -> Path:
    """Render the toy-face split ``split`` (train/labeled/val/test) into the labeled layout."""
    from diffuseseg.toy_faces import render_faces
    start, stop = getattr(cfg.data, f"{split}_indices")
    if split == "train":
        raise DataError("the toy train split is drawn on the fly; write labeled, val or test")
    root = Path(root or Path(cfg.data.root) / split)
    classes = toy_classes()
    for lo in range(start, stop, chunk):
        idx = np.arange(lo, min(lo + chunk, stop))
        images, masks = render_faces(idx, cfg.model.im_size, seed=cfg.data.toy_seed)
        write_labeled_set(root, [f"{i:07d}" for i in idx], images, masks, classes)
    return root


def unlabeled_images(cfg: Config, count: int, exclude: Iterable[str] = ()) -> np.ndarray:
    """The first ``count`` (0: all) of the DDPM's training images (data.source) whose file name (stem) is not
    in ``exclude`` (e.g. the labeled pool and the evaluation split), uint8 (N, S, S, 3): the unlabeled images a
    label-efficient method may use besides its few labels."""
    size = cfg.model.im_size
    if cfg.data.source == "toy_faces":  # the toy train split never holds a labeled or evaluation face
        from diffuseseg.toy_faces import render_faces
        if not count:
            raise DataError("all unlabeled images (a count of 0) needs data.source=folder: the toy-face train split "
                            "is drawn on the fly, a million faces")
        lo, hi = cfg.data.train_indices
        return render_faces(np.arange(lo, min(lo + count, hi)), size, seed=cfg.data.toy_seed)[0]
    folder = ImageFolder(unlabeled_files(cfg, count, exclude), size, cfg.data.on_bad_image)
    return np.stack([folder[i] for i in range(len(folder))])


def unlabeled_files(cfg: Config, count: int, exclude: Iterable[str] = ()) -> list[Path]:
    """The files of ``unlabeled_images`` (data.source=folder): the first ``count`` (0: all) training images
    whose stem is not in ``exclude``."""
    excluded = set(exclude)
    files = [f for f in training_image_files(cfg) if f.stem not in excluded]
    return files[:count] if count else files


# ----------------------------------------------------------------------------------------------
# DDPM training streams

def _step_rng(seed: int, step: int, rank: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, step, rank, stream): streams 0 = indices, 1 = flips."""
    return np.random.default_rng([seed, step, rank, stream])


class _FolderStepSampler:
    """Index lists for steps ``start_step, start_step+1, ...``: epoch-wise permutations seeded by
    (seed, epoch), sliced per rank, so a resumed run sees exactly the batches it would have."""

    def __init__(self, n: int, batch: int, seed: int, start_step: int, rank: int, world: int) -> None:
        self.n, self.batch, self.seed, self.start = n, batch, seed, start_step
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        perm_epoch, perm = -1, None
        step = self.start
        while True:
            first = (step * self.world + self.rank) * self.batch
            out = []
            for p in range(first, first + self.batch):
                epoch = p // self.n
                if epoch != perm_epoch:
                    perm_epoch = epoch
                    perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                out.append(int(perm[p % self.n]))
            yield out
            step += 1


class _ToyFaceBatches(Dataset):
    """Item ``step`` is that step's batch of rendered toy faces, uint8 (B, S, S, 3)."""

    def __init__(self, cfg: Config, rank: int) -> None:
        self.lo, self.hi = cfg.data.train_indices
        self.batch, self.size, self.rank = cfg.train.batch_size, cfg.model.im_size, rank
        self.seed, self.toy_seed = cfg.run.seed, cfg.data.toy_seed

    def __getitem__(self, step: int) -> np.ndarray:
        from diffuseseg.toy_faces import render_faces
        idx = _step_rng(self.seed, step, self.rank, 0).integers(self.lo, self.hi, self.batch)
        return render_faces(idx, self.size, seed=self.toy_seed)[0]


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def training_batches(cfg: Config, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Infinite stream of training batches in [-1, 1], shape (B, 3, S, S), starting at ``start_step``."""
    batch, size, seed = cfg.train.batch_size, cfg.model.im_size, cfg.run.seed
    if cfg.data.source == "toy_faces":
        faces = _ToyFaceBatches(cfg, rank)
        if cfg.data.num_workers > 0:
            # Rendering (~500 faces/s per core) starves a GPU: workers render whole steps' batches, in order.
            source = iter(DataLoader(faces, batch_size=None, sampler=itertools.count(start_step),
                                     num_workers=cfg.data.num_workers, persistent_workers=True,
                                     prefetch_factor=4))
        else:
            source = map(faces.__getitem__, itertools.count(start_step))
    else:
        dataset = ImageFolder(training_image_files(cfg), size, cfg.data.on_bad_image)
        sampler = _FolderStepSampler(len(dataset), batch, seed, start_step, rank, world)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                            collate_fn=_stack, persistent_workers=cfg.data.num_workers > 0)
        source = iter(loader)
    step = start_step
    for images in source:
        x = to_model_range(np.asarray(images))
        if cfg.data.hflip:
            flip = torch.from_numpy(_step_rng(seed, step, rank, 1).random(batch) < 0.5)
            x[flip] = x[flip].flip(-1)
        yield x
        step += 1
