"""The downstream proof: an ordinary segmentation network trained on (image, mask) pairs.

The factory's synthetic pairs are only worth something if a plain network trained on them segments
*real* images. This module is that network and its training loop, with nothing DDPM-specific in it:

* ``SegUNet``: a compact U-Net (3 levels, ``base``/2x/4x channels, conv-BN-ReLU x2 per level, bilinear
  up-sampling + skip concatenation); 119k parameters at ``base_channels=16`` (the default: on a CPU it
  beats base 32 at equal time), 473k at 32. No pretrained weights.
  ``arch="lraspp"`` builds torchvision's LR-ASPP MobileNetV3-Large (random init) instead, for
  comparison; it downsamples 16x before its head, which at 32-64 px leaves a 2x2-4x4 map: slower per
  image on a CPU and much coarser than the U-Net there (see the note in ``build_segmenter``).
* ``train_segmenter``: AdamW + linear warm-up + cosine decay, cross-entropy with ``ignore_index``,
  light augmentation (random scale/shift jitter; horizontal flips that swap mirrored classes such as
  l_eye <-> r_eye via ``flip_pairs``). A pure function of its inputs and ``seed`` on the CPU.
* ``predict_masks``, ``save_segmenter`` / ``load_segmenter`` (``format: diffuseseg-segmenter/1``,
  written atomically, read with ``weights_only=True``) and ``load_training_folders`` (several labeled
  folders that must share one class list). Mirror pairs come from ``views.mirror_pairs``.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from diffuseseg.config import SegmenterConfig, config_to_dict
from diffuseseg.datasets import LabeledFolder, folder_spec, to_model_range
from diffuseseg.errors import DataError
from diffuseseg.label_formats import ClassList
from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteGuard
from diffuseseg.io import atomic_torch_save, load_torch_file
from diffuseseg.runtime import maybe_compile
from diffuseseg.views import flip_lookup, mirror_pairs

SEGMENTER_FORMAT = "diffuseseg-segmenter/1"
ARCHS = ("unet", "lraspp")


# ----------------------------------------------------------------------------------------------
# networks

def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SegUNet(nn.Module):
    """Compact U-Net: ``levels`` resolutions with base * 2**i channels, max-pool down, bilinear up +
    skip concat, 1x1 head. Input (B, 3, H, W) in [-1, 1] with H, W divisible by 2**(levels-1)."""

    def __init__(self, num_classes: int, base_channels: int = 16, levels: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        chans = [base_channels * 2 ** i for i in range(levels)]
        self.levels = levels
        self.downs = nn.ModuleList([_double_conv(in_channels, chans[0])]
                                   + [_double_conv(chans[i - 1], chans[i]) for i in range(1, levels)])
        self.ups = nn.ModuleList([_double_conv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(levels - 1))])
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_bottom(x)[0]

    def forward_with_bottom(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, the activations at the bottom of the U-Net): the face judge's features are the latter."""
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image side must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = bottom = skips.pop()
        for up in self.ups:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], 1))
        return self.head(x), bottom


class _LRASPP(nn.Module):
    """torchvision's LR-ASPP MobileNetV3-Large (random init), returning logits instead of a dict."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)["out"]


def build_segmenter(arch: str, num_classes: int, base_channels: int = 16, levels: int = 3) -> nn.Module:
    """A fresh network (PyTorch's default init; seed the global RNG first, as ``train_segmenter`` does).

    Measured at 32 px on 1 CPU thread (training step, forward + backward, next to a busy DDPM job, so
    +-30%): U-Net base 16 (119k params) ~4-5 ms/img; U-Net base 32 (473k) ~13-22 ms/img; LR-ASPP
    MobileNetV3-Large (3.2M) ~7-11 ms/img, i.e. about 2x slower than the base-16 U-Net, and its
    16x-downsampled head gives blurry 32 px masks: mIoU 0.33 vs 0.70 for U-Net-16 at equal time on
    200 toy faces."""
    if arch == "unet":
        return SegUNet(num_classes, base_channels, levels)
    if arch == "lraspp":
        return _LRASPP(num_classes)
    raise UserError(f"unknown segmenter architecture {arch!r}; choose one of: {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# augmentation

def augment_batch(x: Tensor, y: Tensor, rng: np.random.Generator, *, flip_table: Tensor | None,
                  scale_jitter: float, shift_jitter: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Random flip (``flip_table`` = label mirror lookup, None = no flips) and scale/shift jitter of
    images x (B, 3, S, S) and labels y (B, S, S) int64. Jitter samples with bilinear (images, border
    padding) and nearest (labels) filters; label pixels that come from outside the image become
    ``ignore_index``. All randomness comes from ``rng``."""
    b = x.shape[0]
    if flip_table is not None:
        flip = torch.from_numpy(rng.random(b) < 0.5).to(x.device)
        if flip.any():
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], flip_table[y.flip(-1)], y)
    if scale_jitter > 0 or shift_jitter > 0:
        # zoom z in [1/(1+j), 1+j] (log-uniform), shift in [-s, s] of the half-width
        z = np.exp(rng.uniform(-math.log1p(scale_jitter), math.log1p(scale_jitter), b))
        t = rng.uniform(-shift_jitter, shift_jitter, (b, 2))
        theta = np.zeros((b, 2, 3), np.float32)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / z
        theta[:, :, 2] = t
        grid = F.affine_grid(torch.from_numpy(theta).to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # labels + 1 so that 0 marks "outside the image" after zero padding
        yy = F.grid_sample((y + 1).float()[:, None], grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].long()
        y = torch.where(yy == 0, torch.full_like(yy, ignore_index), yy - 1)
    return x, y


# ----------------------------------------------------------------------------------------------
# training and prediction

def _check_pairs(images: np.ndarray, masks: np.ndarray, num_classes: int, ignore_index: int) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"images must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3]:
        raise UserError(f"masks must be (N, S, S) matching the images {images.shape[:3]}, got {masks.shape}")
    if len(images) == 0:
        raise UserError("no training pairs")
    labels = np.unique(masks)
    bad = labels[(labels >= num_classes) & (labels != ignore_index)]
    if bad.size:
        raise UserError(f"mask labels {bad[:8].tolist()} are outside 0..{num_classes - 1} "
                        f"(and not the ignore value {ignore_index})")


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _EpochSampler:
    """Positions for each step: consecutive slices of per-epoch permutations seeded by (seed, epoch),
    so the batch of step s is a pure function of (n, batch, seed, s)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed, self._perms = n, batch, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        return np.array([self._perm(p // self.n)[p % self.n]
                         for p in range(step * self.batch, (step + 1) * self.batch)], np.int64)


AUTO_COMPILE_MIN_STEPS = 1500  # compiling (30-60 s on CPU) pays back past about 1200 steps: docs/performance.md


def resolve_compile(mode: str, device: str | torch.device, steps: int) -> str:
    """``segmenter.compile`` as a torch.compile mode: ``auto`` is ``default`` where it was measured to win (a
    CPU with a C++ compiler for inductor's kernels, ``AUTO_COMPILE_MIN_STEPS`` steps or more) and ``none``
    elsewhere (short runs, where the compile does not pay back; GPUs, unmeasured); other modes pass through."""
    if mode != "auto":
        return mode
    has_compiler = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    wins = torch.device(device).type == "cpu" and steps >= AUTO_COMPILE_MIN_STEPS and has_compiler
    return "default" if wins else "none"


def train_segmenter(images: np.ndarray, masks: np.ndarray, num_classes: int, *, arch: str = "unet",
                    base_channels: int = 16, levels: int = 3, ignore_index: int = 255, steps: int = 3000,
                    batch_size: int = 8, lr: float = 1e-2, weight_decay: float = 1e-4, warmup: int = 50,
                    augment: bool = True, flip_pairs: Sequence[tuple[int, int]] | None = None,
                    scale_jitter: float = 0.1, shift_jitter: float = 0.1, seed: int = 0,
                    device: str | torch.device = "cpu", progress: bool = True,
                    callback: Callable[[int, float], None] | None = None, max_bad_steps: int = 10,
                    compile: str = "none", compile_backend: str = "inductor") -> nn.Module:
    """Train a fresh segmenter on images (N, S, S, 3) uint8 and masks (N, S, S) uint8 class ids
    (``ignore_index`` pixels don't count); returns it in eval mode on ``device``.

    ``flip_pairs``: None = no horizontal flips; a list (possibly empty) = flip half the images and swap
    those class ids in the flipped masks (see ``mirror_pairs``). ``augment=False`` turns off flips and
    jitter alike. ``callback(step, loss)`` is called after every step. Same inputs and seed -> the
    same weights (on the CPU). A step with a NaN/inf loss or gradient is skipped; more than ``max_bad_steps``
    in a row raise NonFiniteError. ``model.train_info`` holds steps, seconds, images/s and the last loss.
    ``compile``: torch.compile mode of the training forward (``runtime.maybe_compile``; ``auto``: see
    ``resolve_compile``); the returned model is the plain module either way.
    """
    images, masks = np.asarray(images), np.asarray(masks)
    _check_pairs(images, masks, num_classes, ignore_index)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_segmenter(arch, num_classes, base_channels, levels)
    model = model.to(device).train()
    forward = maybe_compile(model, resolve_compile(compile, device, steps), compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    flip_table = None
    if augment and flip_pairs is not None:
        flip_table = torch.from_numpy(flip_lookup(flip_pairs).astype(np.int64)).to(device)
    x_all = to_model_range(images)  # float (N, 3, S, S), kept on the CPU
    y_all = torch.from_numpy(masks.astype(np.int64))
    n, batch = len(images), min(batch_size, len(images))

    sampler = _EpochSampler(n, batch, seed)
    bar = tqdm(total=steps, desc=f"train segmenter ({arch})", unit="step", dynamic_ncols=True, disable=not progress)
    start, loss_value, ema = time.perf_counter(), math.nan, None
    guard = NonFiniteGuard(f"train segmenter ({arch})", max_bad_steps, hint="Lower segmenter.lr.")
    for step in range(steps):
        idx = torch.from_numpy(sampler(step))
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        if augment:
            rng = np.random.default_rng([seed, step, 1])
            x, y = augment_batch(x, y, rng, flip_table=flip_table, scale_jitter=scale_jitter,
                                 shift_jitter=shift_jitter, ignore_index=ignore_index)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        logits = forward(x)
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        if (y != ignore_index).any():  # an all-ignored batch has no loss (NaN): skip it
            loss.backward()
            if guard.ok(step, loss.detach(), model.parameters()):
                optimizer.step()
        loss_value = loss.item()
        if callback is not None:
            callback(step, loss_value)
        if math.isfinite(loss_value):
            ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        bar.update()
        if progress and (step % 10 == 0 or step == steps - 1):
            elapsed = time.perf_counter() - start
            bar.set_postfix({"loss": f"{ema:.4f}" if ema is not None else "nan",
                             "img/s": f"{(step + 1) * batch / max(elapsed, 1e-9):.1f}"})
    bar.close()
    seconds = time.perf_counter() - start
    model.train_info = {"steps": steps, "seconds": seconds, "images_per_second": steps * batch / max(seconds, 1e-9),
                        "final_loss": loss_value, "smoothed_loss": ema, "train_pairs": n}
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> Tensor:
    """Logits (N, C, S, S), float32 on the CPU, for uint8 images (N, S, S, 3); eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [model(to_model_range(np.asarray(images[s:s + batch_size])).to(device)).float().cpu()
               for s in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def predict_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> Tensor:
    """Class probabilities (N, S, S, C), float32 on the CPU, for uint8 images (N, S, S, 3): the softmax
    of ``predict_logits``, laid out as the read-out's ``class_probabilities``."""
    return predict_logits(model, images, batch_size).softmax(1).permute(0, 2, 3, 1)


@torch.no_grad()
def predict_masks(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Label maps (N, S, S) uint8 for uint8 images (N, S, S, 3)."""
    masks = [predict_logits(model, images[s:s + batch_size], batch_size).argmax(1).to(torch.uint8).numpy()
             for s in range(0, len(images), batch_size)]
    return np.concatenate(masks) if masks else np.zeros((0, *np.shape(images)[1:3]), np.uint8)


# ----------------------------------------------------------------------------------------------
# files

def save_segmenter(path: str | Path, model: nn.Module, *, arch: str, num_classes: int, class_names: Sequence[str],
                   base_channels: int = 16, levels: int = 3, palette: np.ndarray | None = None,
                   meta: dict | None = None) -> Path:
    """Write weights, architecture args, class names (and palette) atomically; ``meta`` must hold
    only plain values (str, numbers, bools, None, lists, dicts) so that ``weights_only`` loading works."""
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return atomic_torch_save({
        "format": SEGMENTER_FORMAT,
        "arch": {"name": arch, "num_classes": int(num_classes), "base_channels": int(base_channels),
                 "levels": int(levels)},
        "class_names": [str(c) for c in class_names],
        "palette": None if palette is None else np.asarray(palette, np.uint8).tolist(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }, path)


def save_configured_segmenter(path: str | Path, model: nn.Module, seg_cfg: SegmenterConfig, classes: ClassList,
                              summary: dict) -> Path:
    """``save_segmenter`` for a network trained by ``train_from_config(seg_cfg)``: its architecture, the
    class list, and the run's summary and segmenter config as meta."""
    return save_segmenter(path, model, arch=seg_cfg.arch, num_classes=len(classes.names), class_names=classes.names,
                          base_channels=seg_cfg.base_channels, levels=seg_cfg.levels, palette=classes.palette,
                          meta={"summary": summary, "segmenter_config": config_to_dict(seg_cfg)})


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, info) from a ``save_segmenter`` file; info has arch, class_names, palette, meta."""
    path = Path(path)
    obj = load_torch_file(path, "segmenter file")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != SEGMENTER_FORMAT:
        found = f"format {fmt!r}" if fmt is not None else f"a {type(obj).__name__} without a format tag"
        raise UserError(f"{path} is not a segmenter file (expected format {SEGMENTER_FORMAT!r}, found {found})")
    try:
        a = obj["arch"]
        model = build_segmenter(a["name"], a["num_classes"], a["base_channels"], a["levels"])
        model.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: damaged segmenter file ({str(err).splitlines()[0]})") from None
    info = {"arch": dict(a), "class_names": list(obj["class_names"]), "palette": obj.get("palette"),
            "meta": obj.get("meta", {})}
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------------------------
# data

def load_training_folders(roots: Sequence[str | Path], size: int, max_per_folder: Sequence[int | None] | None = None,
                          default_classes: ClassList | None = None,
                          ) -> tuple[np.ndarray, np.ndarray, ClassList, list[int]]:
    """Images (N, S, S, 3), masks (N, S, S), the shared class list and the count per folder, from one
    or more folders in the native labeled layout (images/, masks/ index PNGs, classes.json), each whole or a
    ``PATH[start:stop]`` slice of its pairs by name (``datasets.folder_spec``).

    ``max_per_folder``: one cap for every folder or one per folder (None = all); the first pairs by
    name are kept. A folder without classes.json takes ``default_classes`` (the config's
    ``labels.classes``, e.g. the shared CelebAMask-HQ faces), else DataError naming the missing file.
    Every folder must have the class names of the first, else DataError naming it."""
    specs = [folder_spec(str(r)) for r in roots]
    roots = [Path(path) for path, _ in specs]
    if not roots:
        raise DataError("no training folders given")
    caps = list(max_per_folder) if max_per_folder is not None else [None]
    if len(caps) == 1:
        caps = caps * len(roots)
    if len(caps) != len(roots):
        raise DataError(f"{len(caps)} caps for {len(roots)} training folders: give one, or one per folder")
    images, masks, counts, classes, first = [], [], [], None, None
    for (root, cap), (_, positions) in zip(zip(roots, caps), specs):
        folder = LabeledFolder(root, size, positions=positions, default_classes=default_classes)
        if classes is None:
            classes, first = folder.classes, root
        elif folder.classes.names != classes.names:
            raise DataError(f"training folder {root} has a different class list than {first}: "
                            f"{folder.classes.names} != {classes.names} (see {root / 'classes.json'})")
        take = len(folder) if cap is None else min(int(cap), len(folder))
        _, im, mk = folder.load(range(take))
        images.append(im)
        masks.append(mk)
        counts.append(take)
    return np.concatenate(images), np.concatenate(masks), classes, counts


def train_from_config(images: np.ndarray, masks: np.ndarray, class_names: Sequence[str], seg,
                      *, ignore_index: int = 255, device: str | torch.device = "cpu",
                      progress: bool = True, compile_backend: str = "inductor") -> nn.Module:
    """``train_segmenter`` with the hyper-parameters of a ``SegmenterConfig`` (flips swap mirrored classes);
    ``compile_backend``: the run's (``run.compile_backend``) for ``seg.compile``."""
    flip_pairs = mirror_pairs(class_names) if seg.hflip else None
    return train_segmenter(images, masks, len(class_names), arch=seg.arch, base_channels=seg.base_channels,
                           levels=seg.levels, ignore_index=ignore_index, steps=seg.steps,
                           batch_size=seg.batch_size, lr=seg.lr, weight_decay=seg.weight_decay,
                           warmup=seg.warmup_steps, augment=True, flip_pairs=flip_pairs,
                           scale_jitter=seg.scale_jitter, shift_jitter=seg.shift_jitter, seed=seg.seed,
                           device=device, progress=progress, compile=seg.compile, compile_backend=compile_backend)
