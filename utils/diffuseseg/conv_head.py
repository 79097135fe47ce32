"""A convolutional read-out on the frozen feature maps: the pixel MLP's neighbour-aware alternative.

A pixel MLP classifies each pixel from its own feature vector alone; a face part is easier to tell
from its surroundings (an eye sits under a brow, beside the nose). ``ConvHeadEnsemble`` is a few small
fully convolutional heads trained together on the same frozen DDPM feature maps:

    per member: 1x1 conv (D -> h), GN, ReLU, [3x3 conv (h -> h), GN, ReLU] x 2, 1x1 conv (h -> C)

All members run as ONE network with grouped convolutions (the first 1x1 conv maps D to E*h channels,
the rest are grouped by member), so E heads cost one pass. The input is standardised per channel with
the training maps' mean and std (stored as buffers), because the features of different blocks and
timesteps differ in scale by orders of magnitude.

It speaks the ensemble's language: ``member_logits`` gives per-member class scores for every pixel,
so the vote, the Jensen-Shannon uncertainty, test-time views and the factory's filter work unchanged.
Training uses the views' mirrored features (``views.py``) plus random shifts of a few pixels.
"""
from __future__ import annotations

import math
import mmap
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from diffuseseg.config import ConvHeadConfig
from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteGuard
from diffuseseg.io import atomic_torch_save
from diffuseseg.runtime import maybe_compile

CONV_HEAD_FORMAT = "diffuseseg-conv-head/1"
_CFG = ConvHeadConfig  # the training defaults live in one place: section conv_head of the config


class ConvHeadEnsemble(nn.Module):
    """E small convolutional heads on (B, D, S, S) feature maps, as one grouped network."""

    def __init__(self, in_dim: int, num_classes: int, members: int = 3, hidden: int = 64,
                 groups_per_member: int = 8) -> None:
        super().__init__()
        if hidden % groups_per_member:
            raise ValueError(f"hidden ({hidden}) must be divisible by groups_per_member ({groups_per_member})")
        self.in_dim, self.num_classes, self.members, self.hidden = in_dim, num_classes, members, hidden
        width, gn = members * hidden, members * groups_per_member  # GroupNorm groups never straddle two members
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, width, 1), nn.GroupNorm(gn, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, groups=members), nn.GroupNorm(gn, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, groups=members), nn.GroupNorm(gn, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, members * num_classes, 1, groups=members),
        )

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "num_classes": self.num_classes, "members": self.members,
                "hidden": self.hidden}

    def forward(self, maps: Tensor) -> Tensor:
        """Logits (E, B, C, S, S) of feature maps (B, D, S, S)."""
        x = (maps - self.mean[:, None, None]) / self.std[:, None, None]
        return self._member_view(self.net(x))

    def _member_view(self, out: Tensor) -> Tensor:
        b, _, h, w = out.shape
        return out.view(b, self.members, self.num_classes, h, w).transpose(0, 1)

    def logits_of_blocks(self, block_maps: Sequence[Tensor], size: int) -> Tensor:
        """``forward`` of the feature maps that ``block_maps`` (``FeatureExtractor.block_maps``: (B, c, s, s) each,
        in channel order) make once upsampled bilinearly to ``size`` and concatenated, without making them. The
        standardisation and the first 1x1 convolution are per-pixel linear maps, and bilinear upsampling is linear
        with weights that sum to one, so they commute: each block is projected to the heads' width at its own
        resolution and only the projection is upsampled (192 channels instead of the 1008 of the real-face
        preset, the 8 px blocks projected at 8 px). The maps of one resolution (every timestep's) are projected
        by one convolution; sums are made in place, in the layout the maps come in."""
        first = self.net[0]
        weight = first.weight[:, :, 0, 0] / self.std                 # standardisation folded into the projection
        bias = first.bias - weight @ self.mean
        layout = _layout_of(block_maps[0])
        by_side: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # side -> (its maps, their weight columns)
        lo = 0
        for m in block_maps:
            maps, columns = by_side.setdefault(m.shape[-1], ([], []))
            maps.append(m.to(weight.dtype))
            columns.append(weight[:, lo:lo + m.shape[1]])
            lo += m.shape[1]
        if lo != self.in_dim:
            raise ValueError(f"the block maps have {lo} channels, the heads take {self.in_dim}")

        def projected(side: int) -> Tensor:  # one convolution per resolution: one output to write, no sums
            maps, columns = by_side[side]
            x = maps[0] if len(maps) == 1 else torch.cat(maps, 1).contiguous(memory_format=layout)
            return F.conv2d(x, torch.cat(columns, 1)[:, :, None, None], bias if side == size else None)
        x = projected(size).contiguous(memory_format=layout) if size in by_side else None
        for side in by_side:
            if side != size:
                up = F.interpolate(projected(side), size=(size, size), mode="bilinear", align_corners=False)
                x = up.contiguous(memory_format=layout) if x is None else x.add_(up)
        if size not in by_side:
            x.add_(bias[:, None, None])
        return self._member_view(self.net[1:](x))

    @torch.no_grad()
    def member_logits(self, features: np.ndarray | Tensor, batch_size: int = 16) -> Tensor:
        """Logits (E, N, S, S, C), float32 on the CPU, for features (N, S, S, D) as the extractor
        writes them (channels last); eval mode."""
        was_training = self.training
        self.eval()
        device = self.mean.device
        out = []
        try:
            for lo in range(0, len(features), batch_size):
                chunk = features[lo:lo + batch_size]
                chunk = chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.asarray(chunk))
                maps = chunk.to(device, torch.float32).permute(0, 3, 1, 2)
                out.append(self(maps).permute(0, 1, 3, 4, 2).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)


def _layout_of(t: Tensor) -> torch.memory_format:
    """Channels-last where ``t`` is (the U-Net's maps on a CPU), so that the heads keep the layout they are given."""
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def _windows(maps: Tensor, labels: Tensor, offsets: np.ndarray, side: int) -> tuple[Tensor, Tensor]:
    """The ``side`` x ``side`` window of each (map, label) pair whose top-left corner is its (dy, dx) offset."""
    xs = torch.stack([maps[i, :, dy:dy + side, dx:dx + side] for i, (dy, dx) in enumerate(offsets)])
    ys = torch.stack([labels[i, dy:dy + side, dx:dx + side] for i, (dy, dx) in enumerate(offsets)])
    return xs, ys


def _random_crops(maps: Tensor, labels: Tensor, shift: int, rng: np.random.Generator,
                  ignore_index: int) -> tuple[Tensor, Tensor]:
    """Shift each (map, label) pair by up to ``shift`` pixels each way: maps edge-padded, labels
    padded with ``ignore_index`` (what comes from outside the image has no label)."""
    if shift <= 0:
        return maps, labels
    s = maps.shape[-1]
    padded = F.pad(maps, (shift,) * 4, mode="replicate")
    padded_labels = F.pad(labels, (shift,) * 4, value=ignore_index)
    return _windows(padded, padded_labels, rng.integers(0, 2 * shift + 1, size=(len(maps), 2)), s)


def _training_batch(features, labels: np.ndarray, idx: np.ndarray, crop: int,
                    rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The maps (B, D, c, c) and labels (B, c, c) of images ``idx``: a random ``crop`` x ``crop`` window of each
    (whole maps where ``crop`` is 0 or not smaller). The heads are fully convolutional with a 5-pixel receptive
    field, so a window teaches them what the whole map does, at a fraction of the cost per step; features in array
    files are read a window's band of rows at a time (``_band_windows``), half of a 64 px map for a 32 px window."""
    s = features.shape[1]
    if crop <= 0 or crop >= s:
        return (torch.from_numpy(np.ascontiguousarray(features[idx])).permute(0, 3, 1, 2),
                torch.from_numpy(labels[idx].astype(np.int64)))
    corners = rng.integers(0, s - crop + 1, size=(len(idx), 2))
    maps = _image_windows(features, idx, corners, crop)
    windows = np.stack([labels[i, dy:dy + crop, dx:dx + crop] for i, (dy, dx) in zip(idx, corners)])
    return torch.from_numpy(maps).permute(0, 3, 1, 2), torch.from_numpy(windows.astype(np.int64))


def _image_windows(features, index: np.ndarray, corners: np.ndarray, side: int) -> np.ndarray:
    """The ``side`` x ``side`` window (B, side, side, D) of each image ``index`` of an (N, S, S, D) array, memory
    map or ``FeatureRows`` (nested ones included: the study joins one per view), top-left corner (dy, dx) in
    ``corners``."""
    if isinstance(features, FeatureRows):
        return features.windows(index, corners, side)
    if _whole_file_map(features):
        return _band_windows(features, index, corners, side)
    return np.stack([features[i, dy:dy + side, dx:dx + side] for i, (dy, dx) in zip(index, corners)])


def _whole_file_map(array) -> bool:
    """A memory map of a whole array file (not a view of one), whose rows can be read from the file directly."""
    return (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
            and bool(array.filename) and hasattr(os, "pread"))


def _band_windows(maps: np.memmap, index: np.ndarray, corners: np.ndarray, side: int) -> np.ndarray:
    """``_image_windows`` of a whole-file memory map, each window's band of whole rows read with one pread. Slicing
    the map instead faults in all of each map (the kernel reads ahead): a cold 32 px window of a 64 px map then
    reads the whole map, a band half of it, about as fast (``benchmark.py --parts windows``)."""
    row = maps.strides[1]
    fd = os.open(maps.filename, os.O_RDONLY)
    try:
        return np.stack([np.frombuffer(os.pread(fd, side * row, maps.offset + i * maps.strides[0] + dy * row),
                                       maps.dtype).reshape(side, *maps.shape[2:])[:, dx:dx + side]
                         for i, (dy, dx) in zip(index, corners)])
    finally:
        os.close(fd)


class FeatureRows:
    """Images of one or more (N, S, S, D) feature arrays, memory maps included, picked by position and read on
    demand: ``rows[idx]`` gathers just those images. A fit over thousands of labeled faces (2.75 MB of fp16
    features each at 64 px) then holds one batch in RAM, not every map."""

    def __init__(self, arrays: Sequence[np.ndarray], rows: Sequence[int] | None = None) -> None:
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.rows = np.arange(self.starts[-1]) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and not 0 <= self.rows.min() <= self.rows.max() < self.starts[-1]:
            raise IndexError(f"rows outside 0..{self.starts[-1] - 1}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.arrays[0].shape[1:])

    @property
    def ndim(self) -> int:
        return self.arrays[0].ndim

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # every row in RAM: for the pixel MLPs' rows
        rows = self[np.arange(len(self))]
        return rows if dtype is None else rows.astype(dtype)

    def __len__(self) -> int:
        return len(self.rows)

    def windows(self, index: Sequence[int], corners: np.ndarray, side: int) -> np.ndarray:
        """The ``side`` x ``side`` window (B, side, side, D) of each picked image whose top-left corner is its
        (dy, dx) in ``corners``, read without the rest of the image."""
        corners = np.asarray(corners)
        out = np.empty((len(index), side, side, self.shape[-1]), self.dtype)
        for array, picked, local in self._per_array(self.rows[np.asarray(index)]):
            out[picked] = _image_windows(array, local, corners[picked], side)
        return out

    def __getitem__(self, index) -> np.ndarray:
        rows = np.atleast_1d(self.rows[index])
        out = np.empty((len(rows), *self.arrays[0].shape[1:]), self.arrays[0].dtype)
        for array, picked, local in self._per_array(rows):
            out[picked] = array[local]
        return out

    def _per_array(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(array, which of ``rows`` lie in it, their positions there) per array holding some: one read each."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for a in np.unique(which):
            picked = which == a
            yield self.arrays[a], picked, rows[picked] - self.starts[a]


def channel_statistics(features, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (unbiased) std of (N, S, S, D) features, ``chunk`` images at a time in float64."""
    n, dim = len(features), features.shape[-1]
    total, squares, count = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for lo in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(features[np.arange(lo, min(n, lo + chunk))])).reshape(-1, dim).double()
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    mean = total / count
    var = (squares - count * mean * mean) / max(1, count - 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


def train_conv_heads(features: np.ndarray | FeatureRows, labels: np.ndarray, num_classes: int, *,
                     members: int = _CFG.members, hidden: int = _CFG.hidden, steps: int = _CFG.steps,
                     batch_size: int = _CFG.batch_size,
                     lr: float = _CFG.lr, weight_decay: float = _CFG.weight_decay, shift: int = _CFG.shift,
                     crop: int = _CFG.crop, ignore_index: int = 255, seed: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True,
                     max_bad_steps: int = 10, compile: str = _CFG.compile,
                     compile_backend: str = "inductor") -> ConvHeadEnsemble:
    """Train the heads on feature maps (N, S, S, D) (any float dtype, channels last, e.g. every view
    of every labeled image; an array, a memory map or ``FeatureRows``: each step reads only its batch) and
    label maps (N, S, S) uint8 (``ignore_index`` does not count).

    AdamW with a short warm-up and a cosine decay; every member sees the same batches (they differ by
    initialisation), each with its own cross-entropy. Same inputs and seed -> the same weights on the CPU.
    A step with a NaN/inf loss or gradient is skipped; more than ``max_bad_steps`` in a row raise NonFiniteError.
    ``compile``: torch.compile mode of the training forward (``runtime.maybe_compile``); the weights are the
    plain module's either way.
    """
    if features.ndim != 4 or labels.shape != features.shape[:3]:
        raise ValueError(f"features (N, S, S, D) and labels (N, S, S) expected, got {features.shape} "
                         f"and {labels.shape}")
    if not ((labels < num_classes) | (labels == ignore_index)).all():
        raise ValueError(f"label maps hold ids outside 0..{num_classes - 1} other than {ignore_index}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ConvHeadEnsemble(features.shape[-1], num_classes, members, hidden)
    mean, std = channel_statistics(features)
    heads.mean.copy_(mean)
    heads.std.copy_(std.clamp_min(1e-6))
    heads = heads.to(device).train()
    forward = maybe_compile(heads, compile, compile_backend)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(50, steps // 10)
    batch = min(batch_size, len(features))
    bar = tqdm(total=steps, desc=f"train conv heads ({members})", unit="step", dynamic_ncols=True,
               disable=not progress)
    start, smoothed = time.perf_counter(), None
    guard = NonFiniteGuard("train conv heads", max_bad_steps, hint="Check the features for NaN/inf values.")
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(features), batch, replace=False)
        x, y = _training_batch(features, labels, idx, crop, rng)  # (B, D, c, c) fp16: windows before the fp32 copy
        x, y = _random_crops(x.float(), y, shift, rng, ignore_index)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                               / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        logits = forward(x.to(device))  # (E, B, C, S, S)
        y = y.to(device).expand(heads.members, *y.shape).reshape(-1, *y.shape[1:])
        loss = F.cross_entropy(logits.reshape(-1, *logits.shape[2:]), y, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        if (y != ignore_index).any():  # a batch with every pixel ignored has no loss: skip it
            loss.backward()
            if guard.ok(step, loss.detach(), heads.parameters()):
                optimizer.step()
                smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        bar.update()
        if progress and step % 20 == 0 and smoothed is not None:
            bar.set_postfix(loss=f"{smoothed:.4f}")
    bar.close()
    heads.train_info = {"steps": steps, "seconds": time.perf_counter() - start, "smoothed_loss": smoothed}
    return heads.eval()


def save_conv_heads(path: str | Path, heads: ConvHeadEnsemble, meta: dict | None = None) -> Path:
    """Weights, architecture and the caller's plain ``meta`` (class names, palette, feature spec ...),
    written atomically in a file ``torch.load(weights_only=True)`` reads."""
    return atomic_torch_save({"format": CONV_HEAD_FORMAT, "config": heads.config(),
                              "state_dict": {k: v.detach().cpu() for k, v in heads.state_dict().items()},
                              "meta": dict(meta or {})}, path)


def conv_heads_from_file(obj: dict, path: str | Path, device: str | torch.device = "cpu") -> tuple[ConvHeadEnsemble, dict]:
    """(heads in eval mode, meta) from the loaded contents ``obj`` of a ``save_conv_heads`` file."""
    try:
        c = obj["config"]
        heads = ConvHeadEnsemble(c["in_dim"], c["num_classes"], c["members"], c["hidden"])
        heads.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: damaged conv-head file ({str(err).splitlines()[0]})") from None
    return heads.to(device).eval(), obj.get("meta", {})
