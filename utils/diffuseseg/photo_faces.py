"""Segmenting photos face by face: every face found, aligned, read out and pasted back onto the photo
(``face_align`` has the geometry; this module joins it to the read-out).

``FaceSegmenter.segment(photos)`` returns, per photo, one mask at the photo's own size and the faces it
was made from. A photo whose only face already sits as the training faces do keeps its plain framing
(``segment.crop``) and comes out exactly as without alignment; every other face is cut out along its
transform, read out, and its class probabilities sampled back (``face_align.paste_back``). Pixels no
face covers are background; where faces overlap, the more confident one wins. A photo where no face is
found gets an all-background mask and a message (never an exception): a folder goes on past it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from diffuseseg.config import Config
from diffuseseg.datasets import LabeledFolder, labeled_split
from diffuseseg.errors import DataError, UserError
from diffuseseg.face_align import (LANDMARKS, SNAP_PLAIN_SD, SNAP_SD, AlignedFace, Canonical, Finder, align_faces,
                                   canonical_landmarks, check_face_classes, paste_back)
from diffuseseg.image_io import framing
from diffuseseg.label_formats import ClassList
from diffuseseg.segment_outputs import photo_mask
from diffuseseg.pixel_classifier import uncertainty
from diffuseseg.segmentation import Readout, image_member_scores, image_scores_of, probabilities_of
from diffuseseg.views import NO_VIEWS, ViewSet

BACKGROUND_NAMES = ("background", "bg")


@dataclass
class PhotoResult:
    mask: np.ndarray                       # (H, W) uint8 class ids at the photo's size
    faces: list[AlignedFace]
    face_uncertainty: list[float]          # per face: the official top-10 % score of its crop
    message: str = ""                      # why there is no face, where there is none

    @property
    def uncertainty(self) -> float:
        """The photo's score: its least certain face (0 where there is none)."""
        return max(self.face_uncertainty, default=0.0)

    def to_json(self) -> str:
        return json.dumps({"faces": [dict(f.to_dict(), uncertainty=round(u, 6))
                                     for f, u in zip(self.faces, self.face_uncertainty)],
                           "message": self.message}, indent=1)


@dataclass
class FaceSegmenter:
    extractor: object
    readout: Readout
    classes: ClassList
    finder: Finder | None           # None only with align_faces=False
    finder_classes: Sequence[str]
    canonical: Canonical
    side: int
    vote: str = "majority"
    views: ViewSet = NO_VIEWS
    ignore_index: int = 255
    crop: str = "center"           # the plain framing a photo keeps when its face is already aligned
    refine: int = 1
    batch_size: int = 16
    align_faces: bool = True       # False: every photo keeps its plain framing (segment.align=none)
    snap_sd: float = SNAP_SD        # see face_align.SNAP_SD
    snap_plain_sd: float = SNAP_PLAIN_SD  # see face_align.SNAP_PLAIN_SD
    refiner: tuple[Finder, Sequence[str]] | None = None  # parses the aligned crops (refine); None = the finder
    background: int = field(init=False)
    seconds: dict = field(init=False)  # per stage, summed over calls: where a folder's time goes (benchmark.py)

    def __post_init__(self) -> None:
        self.seconds = dict.fromkeys(("find and align", "read-out", "paste back"), 0.0)
        names = list(self.classes.names)
        self.background = next((names.index(n) for n in BACKGROUND_NAMES if n in names), self.ignore_index)

    def align(self, photos: Sequence[Image.Image]) -> list[list[AlignedFace]]:
        """Each photo's faces, found and aligned (or its plain framing, with ``align_faces`` off)."""
        plain = [framing(img.size, self.side, self.crop) for img in photos]
        if not self.align_faces:
            return [[AlignedFace.plain(img, where)] for img, where in zip(photos, plain)]
        return align_faces(photos, self.finder, self.finder_classes, self.canonical, self.side, refine=self.refine,
                           refiner=self.refiner, plain=plain, snap_sd=self.snap_sd,
                           snap_plain_sd=self.snap_plain_sd)

    @torch.no_grad()
    def segment(self, photos: Sequence[Image.Image],
                faces: Sequence[Sequence[AlignedFace]] | None = None) -> list[PhotoResult]:
        """One ``PhotoResult`` per photo (module docstring); the faces of all photos are read out in batches.
        ``faces``: each photo's faces as placed elsewhere (a detector of your own, or where the truth says they
        are) instead of ``align``'s."""
        if faces is not None and len(faces) != len(photos):
            raise ValueError(f"faces for {len(faces)} photos, {len(photos)} photos given")
        clock = time.perf_counter()
        faces = self.align(photos) if faces is None else faces
        clock = self._lap("find and align", clock)
        crops = [(i, k) for i, fs in enumerate(faces) for k in range(len(fs))]
        scores_of, unc_of = {}, {}
        for lo in range(0, len(crops), self.batch_size):
            batch = crops[lo:lo + self.batch_size]
            images = np.stack([faces[i][k].crop for i, k in batch])
            scores = image_member_scores(self.extractor, self.readout, images, self.views, None, self.batch_size)
            n, grid = len(batch), self.extractor.label_size
            unc = image_scores_of(uncertainty(scores).reshape(n, grid, grid))
            per_crop = scores.reshape(scores.shape[0], n, grid, grid, -1)
            for j, key in enumerate(batch):
                scores_of[key], unc_of[key] = per_crop[:, j], float(unc[j])
            clock = self._lap("read-out", clock)
        results = []
        for i, img in enumerate(photos):
            width, height = img.size
            if not faces[i]:
                results.append(PhotoResult(np.full((height, width), self.background, np.uint8), [], [],
                                           "no face found: the mask is all background"))
                continue
            if faces[i][0].snapped:
                mask = photo_mask(scores_of[i, 0], framing(img.size, self.side, self.crop), self.vote,
                                  self.ignore_index)
            else:
                best = np.full((height, width), -1.0, np.float32)
                labels = np.full((height, width), self.background, np.uint8)
                for k, face in enumerate(faces[i]):
                    probs = scores_of[i, k].float().softmax(-1).mean(0)
                    paste_back(probs, face.where, self.side, best, labels)
                mask = labels
            results.append(PhotoResult(mask, faces[i], [unc_of[i, k] for k in range(len(faces[i]))]))
        self._lap("paste back", clock)
        return results

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


# ----------------------------------------------------------------------------------------------
# from the config

def load_canonical(cfg: Config) -> Canonical:
    """``segment.framing``: a JSON written by ``face_finder.py --framing`` (what a fresh clone uses), or ''
    to measure it now (``measure_canonical``)."""
    if not cfg.segment.framing:
        return measure_canonical(cfg)[0]
    path = Path(cfg.segment.framing)
    if not path.is_file():
        raise UserError(f"segment.framing: {path} not found (write it with utils/face_finder.py --framing, "
                        f"or set segment.framing='' to measure it on labels.labeled_dir)")
    try:
        return Canonical.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"segment.framing: {path} is not a framing file ({err})") from None


def measure_canonical(cfg: Config, fit: Sequence[str] = LANDMARKS) -> tuple[Canonical, LabeledFolder]:
    """The canonical framing of the read-out's own training masks (labels.labeled_dir, labels.labeled_range),
    transforms fit to the landmarks ``fit``, and that split."""
    split = labeled_split(cfg, "labeled")
    _, _, masks = split.load()
    return canonical_landmarks(masks, split.classes.names, fit), split


def load_finder(cfg: Config, extractor, readout: Readout, classes: ClassList, views: ViewSet,
                spec: str | None = None, key: str = "segment.finder") -> tuple[Finder, list[str]]:
    """``spec`` (default ``segment.finder``): 'readout' (the read-out's own masks find the faces) or a face
    parser file written by train_segmenter.py; (finder, its class names). Also what loads ``segment.refiner``."""
    spec = cfg.segment.finder if spec is None else spec
    if spec == "readout":
        def finder(images: np.ndarray) -> torch.Tensor:
            scores = image_member_scores(extractor, readout, images, views, None, cfg.features.batch_size)
            return probabilities_of(scores, len(images), extractor.label_size, out_size=images.shape[1])
        return finder, list(classes.names)
    from diffuseseg.segmenter import load_segmenter, predict_probabilities
    if not Path(spec).is_file():
        raise UserError(f"{key}: {spec} not found (a face parser .pt, or 'readout')")
    model, meta = load_segmenter(spec)
    return (lambda images: predict_probabilities(model, images)), list(meta["class_names"])


def face_segmenter(cfg: Config, extractor, readout: Readout, classes: ClassList, views: ViewSet) -> FaceSegmenter | None:
    """The configured ``FaceSegmenter``, or None where faces cannot be found with these classes (a read-out
    of other things than face parts: photos then keep their plain framing, said in one line)."""
    finder, names = load_finder(cfg, extractor, readout, classes, views)
    try:
        check_face_classes(names, f"segment.finder={cfg.segment.finder}")
    except DataError as err:
        print(f"segment.align=auto: {err}; photos keep their plain framing (segment.crop)")
        return None
    return FaceSegmenter(finder=finder, finder_classes=names,
                         **configured_settings(cfg, extractor, readout, classes, views))


def configured_settings(cfg: Config, extractor, readout: Readout, classes: ClassList, views: ViewSet) -> dict:
    """Every ``FaceSegmenter`` field the config sets but the finder: one place to wire a new segment key, for
    ``face_segmenter`` and for studies that swap the finder (robustness.py)."""
    return dict(extractor=extractor, readout=readout, classes=classes, canonical=load_canonical(cfg),
                side=cfg.model.im_size, vote=cfg.ensemble.vote, views=views, ignore_index=cfg.labels.ignore_index,
                crop=cfg.segment.crop, refine=cfg.segment.refine, batch_size=cfg.features.batch_size,
                snap_sd=cfg.segment.snap_sd, snap_plain_sd=cfg.segment.snap_plain_sd,
                refiner=load_refiner(cfg, extractor, readout, classes, views))


def load_refiner(cfg: Config, extractor, readout: Readout, classes: ClassList,
                 views: ViewSet) -> tuple[Finder, list[str]] | None:
    """``segment.refiner`` as (parser, its class names); None where it is '' (the finder refines)."""
    if not cfg.segment.refiner:
        return None
    refiner, names = load_finder(cfg, extractor, readout, classes, views, cfg.segment.refiner,
                                  "segment.refiner")
    check_face_classes(names, f"segment.refiner={cfg.segment.refiner}")
    return refiner, names
