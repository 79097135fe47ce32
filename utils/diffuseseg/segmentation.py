"""The segmentation pipeline: feature extractor -> pixel-MLP ensemble -> masks, uncertainty, metrics.

Scripts and the baseline study all go through these functions, so the DDPM features, a randomly
initialised U-Net and raw RGB+xy pixels are compared on exactly the same code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from diffuseseg.checkpoint import CheckpointError, build_unet, file_sha256, load_unet
from diffuseseg.config import Config, ConfigError
from diffuseseg.conv_head import (CONV_HEAD_FORMAT, ConvHeadEnsemble, FeatureRows, conv_heads_from_file,
                                 save_conv_heads, train_conv_heads)
from diffuseseg.datasets import to_model_range
from diffuseseg.label_formats import ClassList
from diffuseseg.errors import UserError
from diffuseseg.features import FeatureExtractor, FeatureSpec, RawPixelFeatures
from diffuseseg.label_formats import resolve_classes
from diffuseseg.io import load_torch_file
from diffuseseg.pixel_classifier import (PixelEnsemble, image_uncertainty_score, load_diffuseseg_mlps, load_ensemble,
                                         member_files, predict, save_ensemble, train_ensemble, uncertainty, vote)
from diffuseseg.sampling import schedule_from_config
from diffuseseg.views import IDENTITY, NO_VIEWS, ViewSet, resolve_views

FEATURE_KINDS = ("ddpm", "random_unet", "raw_rgb_xy")
Readout = PixelEnsemble | ConvHeadEnsemble  # what turns features into per-member class scores


def build_extractor(cfg: Config, kind: str = "ddpm", device: torch.device | str = "cpu"):
    """The configured feature extractor: the trained DDPM, a randomly initialised U-Net of the same
    architecture (baseline), or raw RGB + (x, y) (baseline)."""
    label_size = cfg.features.label_size or None
    if kind == "raw_rgb_xy":
        return RawPixelFeatures(cfg.model.im_size, label_size)
    if kind == "ddpm":
        model = load_unet(cfg.run.checkpoint, cfg, use_ema=cfg.run.use_ema, device=device)
        sha = file_sha256(cfg.run.checkpoint)
    elif kind == "random_unet":
        torch.manual_seed(cfg.run.seed)
        model, sha = build_unet(cfg, pretrained=False).to(device), f"random-init-seed-{cfg.run.seed}"
    else:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
    f = cfg.features
    # The extractor checks these too, as programming errors; here they are the user's config keys.
    unknown = [b for b in f.blocks if b not in model.block_names]
    if unknown:
        raise ConfigError(f"features.blocks: {unknown} not in this U-Net; its blocks are {model.block_names}")
    late = [t for t in f.timesteps if t >= cfg.diffusion.num_train_timesteps]
    if late:
        raise ConfigError(f"features.timesteps: {late} not below diffusion.num_train_timesteps "
                          f"({cfg.diffusion.num_train_timesteps})")
    return FeatureExtractor(model, schedule_from_config(cfg.diffusion), f.timesteps, f.blocks, noise=f.noise,
                            noise_seed=f.noise_seed, label_size=label_size, checkpoint_sha256=sha,
                            compile=f.compile, compile_backend=cfg.run.compile_backend)


REFERENCE_AREA = 256 * 256  # the official protocol's image size, at which min_pixels is counted


def training_mask(mask: np.ndarray, min_pixels: int, ignore_index: int) -> np.ndarray:
    """Official protocol: in a training image, a class covering fewer than ``min_pixels`` pixels
    becomes ignore (tiny slivers are mostly annotation noise). ``min_pixels`` counts pixels of a
    256x256 image, as in the official data sets, and scales with the area: at 32 px the official 20
    would otherwise erase eyes and brows (~10 px each) from every training mask."""
    threshold = min_pixels * mask.size / REFERENCE_AREA
    counts = np.bincount(mask.reshape(-1), minlength=256)
    rare = (counts > 0) & (counts < threshold)
    rare[ignore_index] = False
    return np.where(rare[mask], ignore_index, mask).astype(np.uint8)


@torch.no_grad()
def extract(extractor, images: np.ndarray, keys: Sequence[int] | None = None, batch_size: int = 16,
            progress: bool = False) -> np.ndarray:
    """Features of uint8 images (N, S, S, 3) as float16 (N, S, S, D), batch by batch."""
    keys = list(range(len(images))) if keys is None else list(keys)
    side = extractor.label_size
    out = np.empty((len(images), side, side, extractor.dim), np.float16)  # filled in place: never twice in RAM
    for lo in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress):
        f = extractor(to_model_range(images[lo:lo + batch_size]), keys=keys[lo:lo + batch_size])
        out[lo:lo + len(f)] = f.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
    return out


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Class-id masks (N, H, W) -> (N, size, size) by nearest neighbour (pixel centres), so a read-out at
    ``features.label_size`` trains on labels of its own size and its masks return to the image size."""
    _, h, w = masks.shape
    if (h, w) == (size, size):
        return masks

    def centres(n: int) -> np.ndarray:  # source index under each target pixel's centre
        return np.minimum(((np.arange(size) + 0.5) * n / size).astype(np.int64), n - 1)
    return masks[:, centres(h)[:, None], centres(w)[None, :]]


def training_pixels(features: np.ndarray, masks: np.ndarray, min_pixels: int,
                    ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (N, S, S, D) features and (N, S, S) masks to labeled rows, dropping ignore pixels."""
    masks = np.stack([training_mask(m, min_pixels, ignore_index) for m in masks]).reshape(-1)
    keep = masks != ignore_index
    return features.reshape(-1, features.shape[-1])[keep], masks[keep]


def view_features(extractor, images: np.ndarray, views: ViewSet, keys: Sequence[int] | None = None,
                  batch_size: int = 16, progress: bool = False) -> list[np.ndarray]:
    """Features (N, S, S, D) of every view of the images, in the order of ``views`` (the same feature
    noise for every view of an image: the keys do not change)."""
    return [extract(extractor, view.images(images), keys, batch_size, progress) for view in views.views]


def view_training_pixels(features: Sequence[np.ndarray], masks: np.ndarray, views: ViewSet, min_pixels: int,
                         ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled rows of every view: ``features`` from ``view_features``, ``masks`` in the original frame."""
    masks = resize_masks(masks, features[0].shape[1])
    rows = [training_pixels(f, view.masks(masks, views.flip_pairs, ignore_index), min_pixels, ignore_index)
            for f, view in zip(features, views.views, strict=True)]
    return np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows])


def configured_views(cfg: Config, class_names: Sequence[str], use: str) -> ViewSet:
    """The views of ``ensemble.train_views`` (``use="train"``: what the MLPs learn from) or of
    ``ensemble.test_views`` (``use="test"``: what each member's prediction is averaged over)."""
    if use not in ("train", "test"):
        raise ValueError(f"use must be 'train' or 'test', not {use!r}")
    key = f"{use}_views"
    return resolve_views(getattr(cfg.ensemble, key), class_names, f"ensemble.{key}")


def fit(cfg: Config, features: np.ndarray, labels: np.ndarray, classes: ClassList, spec: FeatureSpec,
        device: torch.device | str = "cpu", progress: bool = True, seed: int | None = None) -> tuple[PixelEnsemble, dict]:
    """Train the configured ensemble on labeled feature rows; returns it with its metadata (the caller
    adds what the rows came from: images, views)."""
    e = cfg.ensemble
    ensemble = train_ensemble(features, labels, len(classes.names), members=e.members,
                              hidden=tuple(e.hidden) or None,  # [] -> official sizes for the class count
                              layer_order=e.layer_order,
                              init=e.init, lr=e.lr, batch_size=e.batch_size, max_epochs=e.max_epochs,
                              patience=e.patience, min_steps=e.min_steps, drop_last=e.drop_last,
                              class_balanced=e.class_balanced, seed=e.seed if seed is None else seed,
                              device=device, progress=progress)
    meta = {"class_names": list(classes.names), "palette": classes.palette.tolist(), "feature_spec": spec.to_dict(),
            "vote": e.vote, "ignore_index": cfg.labels.ignore_index}
    return ensemble, meta


def fit_readout(cfg: Config, features: Sequence[np.ndarray], masks: np.ndarray, views: ViewSet, classes: ClassList,
                spec: FeatureSpec, device: torch.device | str = "cpu", progress: bool = True,
                seed: int | None = None) -> tuple[Readout, dict]:
    """Train the configured read-out (``ensemble.readout``) on the features of every view of the labeled
    images (``view_features``) and their masks in the original frame; returns it with its metadata."""
    lab = cfg.labels
    if cfg.ensemble.readout == "pixel_mlp":
        x, y = view_training_pixels([np.asarray(f) for f in features], masks, views, lab.min_pixels, lab.ignore_index)
        readout, meta = fit(cfg, x, y, classes, spec, device, progress, seed)
    else:
        h = cfg.conv_head
        if h.hidden % 8:
            raise ConfigError(f"conv_head.hidden: {h.hidden} is not a multiple of 8 (GroupNorm groups of 8 channels)")
        masks = resize_masks(masks, features[0].shape[1])
        view_masks = [np.stack([training_mask(m, lab.min_pixels, lab.ignore_index)
                                for m in view.masks(masks, views.flip_pairs, lab.ignore_index)])
                      for view in views.views]
        maps = features[0] if len(features) == 1 else FeatureRows(features)  # never a concatenated copy
        readout = train_conv_heads(maps, np.concatenate(view_masks), len(classes.names),
                                   members=h.members, hidden=h.hidden, steps=h.steps, batch_size=h.batch_size,
                                   lr=h.lr, weight_decay=h.weight_decay, shift=h.shift, crop=h.crop,
                                   ignore_index=lab.ignore_index,
                                   seed=cfg.ensemble.seed if seed is None else seed, device=device, progress=progress,
                                   compile=h.compile, compile_backend=cfg.run.compile_backend)
        meta = {"class_names": list(classes.names), "palette": classes.palette.tolist(),
                "feature_spec": spec.to_dict(), "vote": cfg.ensemble.vote, "ignore_index": lab.ignore_index}
    meta["readout"] = cfg.ensemble.readout
    return readout, meta


def describe_readout(cfg: Config) -> str:
    """The configured read-out in words, for reports."""
    if cfg.ensemble.readout == "conv_head":
        return f"{cfg.conv_head.members} convolutional heads"
    return f"ensemble of {cfg.ensemble.members} pixel MLPs"


def save_readout(path: str | Path, readout: Readout, meta: dict) -> Path:
    """Write either read-out to its file format (``load_readout`` tells them apart)."""
    if isinstance(readout, ConvHeadEnsemble):
        return save_conv_heads(path, readout, meta)
    return save_ensemble(path, readout, meta)


def load_readout(path: str | Path, device: torch.device | str = "cpu") -> tuple[Readout, dict]:
    """(read-out in eval mode, meta) from a pixel-ensemble or a conv-head file."""
    obj = load_torch_file(Path(path), "ensemble file")
    if isinstance(obj, dict) and obj.get("format") == CONV_HEAD_FORMAT:
        return conv_heads_from_file(obj, path, device)
    return load_ensemble(path, device)


def check_ensemble_matches(meta: dict, extractor, path: str | Path) -> None:
    """An ensemble only makes sense on the features it was trained on: say what differs."""
    stored = FeatureSpec.from_dict(meta["feature_spec"])
    differences = stored.differences(extractor.spec)
    if differences:
        raise CheckpointError(f"ensemble {path} was trained on other features (ensemble != extractor): "
                              + "; ".join(differences))


@dataclass
class Segmentation:
    masks: np.ndarray          # (N, S, S) uint8 class ids
    uncertainty: np.ndarray    # (N, S, S) float32 per-pixel Jensen-Shannon divergence
    image_scores: np.ndarray   # (N,) mean of each image's top-10% pixel uncertainties


def _member_logits(readout: Readout, features: np.ndarray) -> Tensor:
    """Logits (E, N, S, S, C) of every member for features (N, S, S, D)."""
    if isinstance(readout, ConvHeadEnsemble):
        return readout.member_logits(features)
    n, s, d = features.shape[0], features.shape[1], features.shape[-1]
    return predict(readout, features.reshape(-1, d)).reshape(readout.members, n, s, s, -1)


@torch.no_grad()
def member_scores(ensemble: Readout, features: Sequence[np.ndarray], views: ViewSet = NO_VIEWS) -> Tensor:
    """Per-member scores (E, N*S*S, C) for the features (N, S, S, D) of each view: the logits for the
    identity view alone, else the log of each member's softmax averaged over the views, each mapped
    back to the original frame. Votes and uncertainty read either the same way."""
    if len(features) != len(views):
        raise ValueError(f"{len(features)} feature arrays for {len(views)} views")
    return _scores_over_views((_member_logits(ensemble, f) for f in features), views)


def _scores_over_views(view_logits: Iterable[Tensor], views: ViewSet) -> Tensor:
    """``member_scores`` from each view's logits (E, N, S, S, C), given one view at a time."""
    if views.views == IDENTITY:
        logits = next(iter(view_logits))
        return logits.reshape(logits.shape[0], -1, logits.shape[-1])
    mean = 0
    for logits, view in zip(view_logits, views.views, strict=True):
        mean = mean + view.back(logits.softmax(-1), views.class_order)
    return (mean / len(views)).reshape(mean.shape[0], -1, mean.shape[-1]).clamp_min(1e-30).log()


def image_member_scores(extractor, readout: Readout, images: np.ndarray, views: ViewSet = NO_VIEWS,
                        keys: Sequence[int] | None = None, batch_size: int = 16) -> Tensor:
    """``member_scores`` of uint8 images (N, S, S, 3) themselves, features noised by ``keys``: see
    ``shared_image_member_scores``."""
    return shared_image_member_scores(extractor, [readout], images, views, keys, batch_size)[0]


@torch.no_grad()
def shared_image_member_scores(extractor, readouts: Sequence[Readout], images: np.ndarray, views: ViewSet = NO_VIEWS,
                               keys: Sequence[int] | None = None, batch_size: int = 16) -> list[Tensor]:
    """``member_scores`` of each read-out on uint8 images (N, S, S, 3), the U-Net run once for all of them. Conv
    heads on the DDPM's features read the blocks' own maps (``ConvHeadEnsemble.logits_of_blocks``: the upsampled
    1008-channel maps are never made, nor rounded to float16 as stored features are); other read-outs read
    ``view_features``."""
    if not (all(isinstance(r, ConvHeadEnsemble) for r in readouts) and hasattr(extractor, "block_maps")):
        features = view_features(extractor, images, views, keys, batch_size)
        return [member_scores(r, features, views) for r in readouts]
    keys = list(range(len(images))) if keys is None else list(keys)

    def logits(view) -> list[Tensor]:  # per read-out (E, N, S, S, C) on the CPU
        shown, parts = view.images(images), [[] for _ in readouts]
        for lo in range(0, len(shown), batch_size):
            blocks = extractor.block_maps(to_model_range(shown[lo:lo + batch_size]), keys=keys[lo:lo + batch_size])
            for part, readout in zip(parts, readouts):
                out = readout.logits_of_blocks([m.to(readout.mean.device) for m in blocks], extractor.label_size)
                part.append(out.permute(0, 1, 3, 4, 2).float().cpu())
        return [torch.cat(part, dim=1) for part in parts]
    modes = [r.training for r in readouts]
    try:
        for r in readouts:
            r.eval()
        per_view = [logits(view) for view in views.views]
    finally:
        for r, mode in zip(readouts, modes):
            r.train(mode)
    return [_scores_over_views([v[j] for v in per_view], views) for j in range(len(readouts))]


@torch.no_grad()
def class_probabilities(ensemble: Readout, features: Sequence[np.ndarray], views: ViewSet = NO_VIEWS,
                        out_size: int | None = None, chunk: int = 0) -> Tensor:
    """Class probabilities (N, S, S, C), float32: every member's softmax (over the views too) averaged.
    ``out_size``: resize bilinearly to the image side where the features are coarser. ``chunk``: that many
    images at a time (features memory-mapped from disk are then read a chunk at a time)."""
    n, s = features[0].shape[0], features[0].shape[1]
    if chunk and n > chunk:
        return torch.cat([class_probabilities(ensemble, [np.asarray(f[lo:lo + chunk]) for f in features], views,
                                              out_size) for lo in range(0, n, chunk)])
    return probabilities_of(member_scores(ensemble, features, views), n, s, out_size)


@torch.no_grad()
def streamed_probabilities(extractor, images: np.ndarray, views: ViewSet, readouts: dict, keys: Sequence[int], *,
                           batch_size: int = 16, chunk: int = 64, dtype: torch.dtype = torch.float16,
                           progress: bool = False) -> dict:
    """``class_probabilities`` (N, S, S, C) at the image side, in ``dtype``, of every read-out in ``readouts`` (a dict
    of them, any keys) on ``images`` (feature noise keyed by ``keys``): ``chunk`` images at a time, the U-Net run
    once for all the read-outs (``shared_image_member_scores``) and nothing kept but the probabilities, so that
    thousands of images (a student's 4000 unlabeled faces: 69 GB of features in two views) never hold their
    features in RAM or on disk."""
    keys, parts = np.asarray(keys, dtype=np.int64), {key: [] for key in readouts}
    for lo in tqdm(range(0, len(images), chunk), desc="read-out on unlabeled", unit="chunk", disable=not progress):
        shown = images[lo:lo + chunk]
        scores = shared_image_member_scores(extractor, list(readouts.values()), shown, views, keys[lo:lo + chunk],
                                            batch_size)
        for key, score in zip(readouts, scores):
            parts[key].append(probabilities_of(score, len(shown), extractor.label_size, images.shape[1]).to(dtype))
    return {key: torch.cat(p) for key, p in parts.items()}


def probabilities_of(scores: Tensor, n: int, s: int, out_size: int | None = None) -> Tensor:
    """``class_probabilities`` from the member scores (E, n*s*s, C) of ``member_scores``, for callers that
    also vote with them (``classify_scores``): one pass of the read-out for both."""
    probs = scores.softmax(-1).mean(0).reshape(n, s, s, -1)
    if out_size and out_size != s:
        probs = F.interpolate(probs.permute(0, 3, 1, 2), size=(out_size, out_size), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
    return probs


@torch.no_grad()
def upsampled_masks(probabilities: Tensor, size: int, chunk: int = 32) -> np.ndarray:
    """Masks (N, size, size) uint8 from class probabilities (N, S, S, C): resized bilinearly, then argmax,
    ``chunk`` images at a time (499 faces at 256 px would be 2.5 GB of float32 at once)."""
    if probabilities.shape[1] == size:
        return probabilities.argmax(-1).to(torch.uint8).numpy()
    return np.concatenate([
        F.interpolate(probabilities[lo:lo + chunk].float().permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                      align_corners=False).argmax(1).to(torch.uint8).numpy()
        for lo in range(0, len(probabilities), chunk)])


@torch.no_grad()
def classify(ensemble: Readout, features: Sequence[np.ndarray], vote_mode: str = "majority",
             views: ViewSet = NO_VIEWS, out_size: int | None = None) -> Segmentation:
    """Masks and uncertainty from precomputed features (N, S, S, D), one array per view of ``views``
    (see ``view_features``); all members in one pass per view. ``out_size``: the image side, where the
    features are coarser (``features.label_size``): masks and uncertainty maps are resized to it (nearest);
    the image scores stay those of the read-out's own pixels."""
    n, s = features[0].shape[0], features[0].shape[1]
    return classify_scores(member_scores(ensemble, features, views), n, s, vote_mode, out_size)


def image_scores_of(pixel_uncertainty: Tensor) -> np.ndarray:
    """Each image's official score (mean of its top 10 % pixel uncertainties), for per-pixel uncertainty
    (n, s, s) as ``uncertainty`` gives it."""
    return np.array([image_uncertainty_score(u.reshape(-1)) for u in pixel_uncertainty], np.float32)


@torch.no_grad()
def classify_scores(scores: Tensor, n: int, s: int, vote_mode: str = "majority",
                    out_size: int | None = None) -> Segmentation:
    """``classify`` from the member scores (E, n*s*s, C) of ``member_scores``, for callers that also map
    those scores elsewhere (segment_outputs: onto each photo's own pixels)."""
    masks = vote(scores, vote_mode).reshape(n, s, s).cpu().numpy().astype(np.uint8)
    unc = uncertainty(scores).reshape(n, s, s).float().cpu()
    image_scores = image_scores_of(unc)
    unc = unc.numpy()
    if out_size:
        masks, unc = resize_masks(masks, out_size), resize_masks(unc, out_size)
    return Segmentation(masks, unc, image_scores)


def segment(extractor, ensemble: Readout, images: np.ndarray, *, vote_mode: str = "majority",
            views: ViewSet = NO_VIEWS, keys: Sequence[int] | None = None, batch_size: int = 16,
            progress: bool = False) -> Segmentation:
    """Masks and uncertainty for uint8 images (N, S, S, 3), batch by batch (features never pile up);
    with ``views``, each member's softmax is averaged over them (test-time augmentation)."""
    keys = list(range(len(images))) if keys is None else list(keys)
    parts = []
    for lo in tqdm(range(0, len(images), batch_size), desc="segment", unit="batch", disable=not progress):
        batch = images[lo:lo + batch_size]
        scores = image_member_scores(extractor, ensemble, batch, views, keys[lo:lo + batch_size], batch_size)
        parts.append(classify_scores(scores, len(batch), extractor.label_size, vote_mode, out_size=images.shape[1]))
    return Segmentation(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("masks", "uncertainty", "image_scores")))


def load_trained_stack(cfg: Config, device: torch.device | str = "cpu") -> tuple[FeatureExtractor, Readout, ClassList]:
    """The configured DDPM feature extractor, the ensemble at ``ensemble.path`` (checked against it)
    and the ensemble's class list: what segment.py and generate_dataset.py both start from."""
    extractor = build_extractor(cfg, "ddpm", device)
    if Path(cfg.ensemble.path).is_dir():
        return (extractor, *load_member_folder(cfg.ensemble.path, extractor, cfg))
    ensemble, meta = load_matching_ensemble(cfg.ensemble.path, extractor)
    return extractor, ensemble, ClassList(meta["class_names"], np.asarray(meta["palette"], np.uint8))


def load_member_folder(folder: str | Path, extractor, cfg: Config) -> tuple[PixelEnsemble, ClassList]:
    """DiffuseSeg's ``mlp_<k>_best.pt`` files (or the official ``model_<k>.pth``) as one ensemble.

    Those files hold bare weights: the classes come from ``labels.classes`` and the features from the
    config, so only the sizes can be checked."""
    ensemble = load_diffuseseg_mlps(member_files(folder))
    classes = resolve_classes(cfg.labels.classes, cfg.labels.labeled_dir, cfg.labels.format)
    if ensemble.in_dim != extractor.dim:
        raise CheckpointError(f"{folder}: the MLPs take {ensemble.in_dim} features but the configured extractor "
                              f"gives {extractor.dim} (features.timesteps x channels of features.blocks)")
    if ensemble.num_classes != len(classes.names):
        raise CheckpointError(f"{folder}: the MLPs predict {ensemble.num_classes} classes but labels.classes has "
                              f"{len(classes.names)} ({', '.join(classes.names)})")
    return ensemble, classes


def load_matching_ensemble(path: str | Path, extractor) -> tuple[Readout, dict]:
    if not Path(path).is_file():
        raise UserError(f"ensemble file not found: {path} (train one with utils/train_mlps.py)")
    ensemble, meta = load_readout(path)
    check_ensemble_matches(meta, extractor, path)
    return ensemble, meta

