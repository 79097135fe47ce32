"""The teacher-student step: a teacher trained on the few labels labels unlabeled images; a plain
segmenter (``segmenter.py``) learns from those pseudo-labels and the real labels together.

The teacher sees each pixel through frozen DDPM features (and, with ``student.teacher=fused``, through a
segmenter trained on the same labels too); the student then learns from hundreds of images instead of a
handful, and needs no DDPM at prediction time. Pixels the teacher is unsure of are left out (ignore), and
the real labeled images are repeated so they keep a fixed share of what the student sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffuseseg.config import Config, SegmenterConfig
from diffuseseg.label_formats import ClassList
from diffuseseg.segmentation import (Readout, build_extractor, configured_views, fit_readout, streamed_probabilities,
                                    view_features)
from diffuseseg.segmenter import predict_probabilities, train_from_config

TEACHERS = ("ddpm", "fused")
UNLABELED_KEYS = 10**7  # feature-noise keys of the unlabeled images, apart from the labeled ones'


def teacher_kinds(teacher: str) -> tuple[str, ...]:
    """The study kinds whose class probabilities a teacher averages."""
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; expected one of {TEACHERS}")
    return ("ddpm",) if teacher == "ddpm" else ("ddpm", "supervised")


def fuse(probabilities: Sequence[Tensor]) -> Tensor:
    """Class probabilities of several predictors on the same pixels, averaged (the 'fused' prediction and
    teacher), in float32 whatever precision they were kept in."""
    return sum(p.float() for p in probabilities) / len(probabilities)


def pseudo_masks(probabilities: Tensor, confidence: float, ignore_index: int) -> np.ndarray:
    """Class-id masks (N, S, S) uint8 from class probabilities (N, S, S, C): the top class, or
    ``ignore_index`` where its probability is below ``confidence``."""
    top, label = probabilities.max(-1)
    return torch.where(top >= confidence, label, torch.full_like(label, ignore_index)).to(torch.uint8).numpy()


def student_training_set(real_images: np.ndarray, real_masks: np.ndarray, pseudo_images: np.ndarray,
                         pseudo_labels: np.ndarray, real_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Real and pseudo-labeled pairs pooled, the real ones repeated until they make up about
    ``real_fraction`` of the pool (at least once each), so a handful of labels is not drowned out."""
    if not 0 <= real_fraction < 1:
        raise ValueError(f"real_fraction must be in [0, 1), not {real_fraction}")
    want = real_fraction * len(pseudo_images) / (1 - real_fraction)
    repeats = max(1, math.ceil(want / len(real_images) - 1e-9))
    return (np.concatenate([np.tile(real_images, (repeats, 1, 1, 1)), pseudo_images]),
            np.concatenate([np.tile(real_masks, (repeats, 1, 1)), pseudo_labels]))


def train_student(cfg: Config, real_images: np.ndarray, real_masks: np.ndarray, unlabeled: np.ndarray,
                  pseudo_labels: np.ndarray, class_names: Sequence[str], *, seed: int | None = None,
                  device: torch.device | str = "cpu", progress: bool = True) -> nn.Module:
    """The student: section segmenter's network trained for ``student.steps`` on the real pairs and the
    unlabeled images with their ``pseudo_masks`` (section student). With ``student.rounds`` > 1, each
    student relabels the unlabeled images (its confident pixels) for a fresh student."""
    st, ignore = cfg.student, cfg.labels.ignore_index
    seg_cfg = student_segmenter_config(cfg, seed)
    for round_ in range(st.rounds):
        if round_:
            probabilities = predict_probabilities(student, unlabeled, batch_size=seg_cfg.batch_size)
            pseudo_labels = pseudo_masks(probabilities, st.confidence, ignore)
        images, masks = student_training_set(real_images, real_masks, unlabeled, pseudo_labels, st.real_fraction)
        student = train_from_config(images, masks, class_names, seg_cfg, ignore_index=ignore, device=device,
                                    progress=progress, compile_backend=cfg.run.compile_backend)
    return student


def student_segmenter_config(cfg: Config, seed: int | None = None) -> SegmenterConfig:
    """Section segmenter with the student's own steps and width (and ``seed`` where given)."""
    return replace(cfg.segmenter, steps=cfg.student.steps, base_channels=cfg.student.base_channels,
                   seed=cfg.segmenter.seed if seed is None else seed)


@dataclass
class Teacher:
    """The DDPM read-out (features of ``extractor``, test-time ``views``), averaged with ``segmenter``'s
    softmax where there is one (``student.teacher=fused``)."""
    extractor: object
    readout: Readout
    views: object
    segmenter: nn.Module | None = None
    batch_size: int = 16

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, keys: Sequence[int]) -> Tensor:
        """Class probabilities (N, S, S, C) for uint8 images (N, S, S, 3), features 64 images at a time."""
        p = [streamed_probabilities(self.extractor, images, self.views, {"readout": self.readout}, keys,
                                    batch_size=self.batch_size, dtype=torch.float32)["readout"]]
        if self.segmenter is not None:
            p.append(predict_probabilities(self.segmenter, images))
        return fuse(p)


def fit_teacher(cfg: Config, images: np.ndarray, masks: np.ndarray, classes: ClassList,
                device: torch.device | str = "cpu", progress: bool = True) -> Teacher:
    """The teacher of ``student.teacher`` trained on the labeled images: the configured read-out on the
    DDPM's features (``ensemble.readout``), and for 'fused' also section segmenter's network."""
    teacher_kinds(cfg.student.teacher)
    extractor = build_extractor(cfg, "ddpm", device)
    fit_views = configured_views(cfg, classes.names, "train")
    features = view_features(extractor, images, fit_views, range(len(images)), cfg.features.batch_size, progress)
    readout, _ = fit_readout(cfg, features, masks, fit_views, classes, extractor.spec, device, progress)
    segmenter = None
    if cfg.student.teacher == "fused":
        segmenter = train_from_config(images, masks, classes.names, cfg.segmenter,
                                      ignore_index=cfg.labels.ignore_index, device=device, progress=progress,
                                      compile_backend=cfg.run.compile_backend)
    return Teacher(extractor, readout, configured_views(cfg, classes.names, "test"), segmenter,
                   cfg.features.batch_size)
