"""Faces as people photograph them: find each face in a photo, frame it as the training faces are framed,
and carry the segmentation back to the photo's own pixels.

The read-out only knows faces framed the way its training faces were (CelebA-HQ's alignment: eyes at fixed
heights, the face filling about half the square). A photo's faces sit anywhere, at any size and tilt. So,
as face-parsing tools do:

1. **Find.** A *finder* (anything that turns square uint8 images into class probabilities over a face-part
   class list: a trained parser, ``face_finder.py``'s locator, or the DDPM read-out itself) parses the whole
   photo, padded to a square. Each connected blob of face-interior classes (skin, eyes, brows, nose, lips) is
   a face; its **landmarks** are the centroids of its eye, nose and mouth pixels (``LANDMARK_PARTS``).
2. **Align.** A similarity transform (scale, rotation, shift; least squares, ``fit_similarity``) maps the
   **canonical landmarks** onto the found ones. The canonical landmarks are not a template from elsewhere:
   they are the mean landmark positions of the training faces' own masks (``canonical_landmarks``). The face
   is cut out of the full-resolution photo along that transform (``warp_face``: an antialiased resize, then a
   rotation at 1:1), parsed again by the finder, and the transform is refit on that sharper view.
3. **Segment and paste back.** The read-out's class probabilities for the aligned face are sampled back onto
   the photo's pixels (``paste_back``: bilinear, in strips, so a large photo needs bounded memory). Pixels no
   face covers are background; where faces overlap, the more confident one wins.

Coordinates are continuous pixel coordinates (x, y): pixel (row i, column j) covers [j, j + 1) x [i, i + 1),
its centre is (j + 0.5, i + 0.5). That is both PIL's ``Image.transform`` convention and ``grid_sample``'s with
``align_corners=False``, so no half-pixel shifts creep in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from diffuseseg.config import SegmentConfig
from diffuseseg.errors import DataError
from diffuseseg.image_io import PAD_FILL, Framing, frame, framing

# The parts whose centroids are the landmarks. The two eyes are told apart by where they sit (the first is
# on the image's left of an upright face), not by their labels: CelebAMask-HQ swaps l_eye and r_eye in
# about 6 % of its masks (12 of the 200 pool faces), which would flip a face's transform.
LANDMARK_PARTS: dict[str, tuple[str, ...]] = {
    "eye_1": ("r_eye",), "eye_2": ("l_eye",), "nose": ("nose",), "mouth": ("mouth", "u_lip", "l_lip")}
LANDMARKS = ("eye_image_left", "eye_image_right", "nose", "mouth")
# a transform's pose, as ``Canonical.pose`` gives it: log scale, angle (radians), the landmarks' centre moved
# across and down (shares of the square's side)
POSE_TERMS = ("log_scale", "angle_rad", "centre_dx_side", "centre_dy_side")
# What a face's blob is made of: its interior (not hair, hat, neck or clothes, which join neighbours).
FACE_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "mouth", "u_lip", "l_lip")

Finder = Callable[[np.ndarray], torch.Tensor]  # uint8 (N, S, S, 3) -> class probabilities (N, S, S, C)


@dataclass(frozen=True)
class Similarity:
    """photo = scale * R(angle) @ crop + (tx, ty): where a point of the aligned crop lies in the photo."""
    scale: float   # photo pixels per crop pixel
    angle: float   # radians, counter-clockwise in image coordinates (y down): a face tilted that way
    tx: float
    ty: float

    @property
    def _c(self) -> complex:
        return self.scale * complex(math.cos(self.angle), math.sin(self.angle))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Crop points (K, 2) -> photo points (K, 2)."""
        z = (points[:, 0] + 1j * points[:, 1]) * self._c + complex(self.tx, self.ty)
        return np.stack([z.real, z.imag], 1)

    def invert(self, points: np.ndarray) -> np.ndarray:
        """Photo points (K, 2) -> crop points (K, 2)."""
        z = (points[:, 0] + 1j * points[:, 1] - complex(self.tx, self.ty)) / self._c
        return np.stack([z.real, z.imag], 1)

    def inverse(self) -> "Similarity":
        """photo -> crop."""
        c = 1 / self._c
        t = -complex(self.tx, self.ty) * c
        return Similarity(abs(c), math.atan2(c.imag, c.real), t.real, t.imag)

    def then(self, outer: "Similarity") -> "Similarity":
        """The transform ``outer(self(p))``."""
        c = self._c * outer._c
        t = complex(self.tx, self.ty) * outer._c + complex(outer.tx, outer.ty)
        return Similarity(abs(c), math.atan2(c.imag, c.real), t.real, t.imag)

    def to_dict(self) -> dict:
        return {"scale": round(self.scale, 6), "angle_deg": round(math.degrees(self.angle), 4),
                "tx": round(self.tx, 4), "ty": round(self.ty, 4)}


def framing_similarity(where: Framing) -> Similarity:
    """The plain framing (``image_io.framing``) as a similarity: model square -> photo."""
    (x, y), (w, h) = where.offset, where.resized
    sx = where.size[0] / w
    return Similarity(sx, 0.0, -x * sx, -y * where.size[1] / h)


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> Similarity:
    """The least-squares similarity (no reflection) taking points ``src`` (K, 2) onto ``dst`` (K, 2), K >= 2:
    in complex numbers, dst ~ c * src + t (Umeyama's solution restricted to the plane)."""
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    ms, md = zs.mean(), zd.mean()
    denom = float(np.sum(np.abs(zs - ms) ** 2))
    if len(src) < 2 or denom <= 1e-12:
        raise ValueError("a similarity needs two distinct points")
    c = np.sum(np.conj(zs - ms) * (zd - md)) / denom
    t = md - c * ms
    return Similarity(float(abs(c)), float(math.atan2(c.imag, c.real)), float(t.real), float(t.imag))


# ----------------------------------------------------------------------------------------------
# landmarks and the canonical framing

def _ids(class_names: Sequence[str], parts: Sequence[str]) -> list[int]:
    return [class_names.index(p) for p in parts if p in class_names]


def check_face_classes(class_names: Sequence[str], what: str) -> None:
    """A finder or a set of masks can give landmarks only if its classes name the parts."""
    missing = [parts[0] for parts in LANDMARK_PARTS.values() if not _ids(class_names, parts)]
    if missing or "skin" not in class_names:
        raise DataError(f"{what}: its classes ({', '.join(class_names)}) lack "
                        f"{', '.join(missing + ([] if 'skin' in class_names else ['skin']))}: "
                        f"faces cannot be found or aligned with it")


def landmarks_from_mask(mask: np.ndarray, class_names: Sequence[str], min_pixels: int = 2,
                        region: np.ndarray | None = None) -> np.ndarray:
    """Landmarks (4, 2) of a class-id mask (H, W), in its pixel coordinates, in ``LANDMARKS`` order: the
    centroid of each part's pixels (within ``region``, a boolean mask, if given); NaN where a part has fewer
    than ``min_pixels``. The eyes are ordered as an upright face shows them: the one that, seen from the
    mouth (else the nose), lies to the left comes first; without either, the one further left."""
    out = np.full((len(LANDMARK_PARTS), 2), np.nan)
    for k, parts in enumerate(LANDMARK_PARTS.values()):
        hit = np.isin(mask, _ids(class_names, parts))
        if region is not None:
            hit &= region
        rows, cols = np.nonzero(hit)
        if len(rows) >= min_pixels:
            out[k] = cols.mean() + 0.5, rows.mean() + 0.5
    return order_eyes(out)


def order_eyes(points: np.ndarray) -> np.ndarray:
    """``points`` (4, 2) with the two eyes (rows 0 and 1) in ``LANDMARKS`` order (see ``landmarks_from_mask``)."""
    a, b = points[0], points[1]
    if np.isnan(a).any() or np.isnan(b).any():
        return points
    below = points[3] if not np.isnan(points[3]).any() else points[2]
    if np.isnan(below).any():
        swap = a[0] > b[0]
    else:  # (b - a) x (below - midpoint) > 0 when a is on the left of an upright face (y points down)
        d, m = b - a, below - (a + b) / 2
        swap = d[0] * m[1] - d[1] * m[0] < 0
    return points[[1, 0, 2, 3]] if swap else points


@dataclass(frozen=True)
class Canonical:
    """Where the training faces' landmarks sit, as a share of the square's side (x, y in [0, 1]), and how far
    the training faces themselves stray from that: the spread of the similarity taking the mean landmarks
    onto each face's (log scale, angle in radians, and how far it moves the landmarks' centre, x and y as a
    share of the side; about the centre, so that a change of scale is not also counted as a shift). ``fit``:
    the landmarks a face's transform is fit to, the training faces' as a photo's (all four, or e.g. the eyes and
    the mouth: the nose's centroid moves with a turned head)."""
    mean: np.ndarray     # (4, 2)
    std: np.ndarray      # (4, 2): the spread between faces
    spread: np.ndarray   # (4,): standard deviations of (log scale, angle, tx, ty) over the faces
    faces: int           # faces with every landmark, that the figures come from
    fit: tuple[str, ...] = LANDMARKS

    @property
    def fit_mask(self) -> np.ndarray:
        return _landmark_mask(self.fit)

    def at(self, side: int) -> np.ndarray:
        return self.mean * side

    def pose(self, where: "Similarity", side: int) -> np.ndarray:
        """(log scale, angle, tx, ty as a share of ``side``) of a face's transform (crop -> square of ``side``;
        identity = framed as the mean training face)."""
        return _pose(where, self.at(side)) / [1, 1, side, side]

    def deviation(self, where: "Similarity", side: int) -> np.ndarray:
        """How far a face's transform lies from the training faces', in their standard deviations: |pose| / spread."""
        return np.abs(self.pose(where, side)) / np.maximum(self.spread, 1e-9)

    def to_dict(self) -> dict:
        return {"landmarks": list(LANDMARKS), "fit_to": list(self.fit), "mean": np.round(self.mean, 5).tolist(),
                "std": np.round(self.std, 5).tolist(), "transform_spread": np.round(self.spread, 6).tolist(),
                "transform_spread_of": list(POSE_TERMS),
                "faces": self.faces}

    @classmethod
    def from_dict(cls, d: dict) -> "Canonical":
        if list(d.get("landmarks", [])) != list(LANDMARKS):
            raise DataError(f"canonical framing for landmarks {d.get('landmarks')}, expected {list(LANDMARKS)}")
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64),
                   np.asarray(d["transform_spread"], np.float64), int(d["faces"]),
                   check_fit_landmarks(d.get("fit_to", LANDMARKS)))  # files written before the key: all four


def _landmark_mask(names: Sequence[str]) -> np.ndarray:
    """(4,) bool: which of ``LANDMARKS`` are in ``names``."""
    return np.isin(LANDMARKS, names)


def check_fit_landmarks(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a fit set in ``LANDMARKS`` order; DataError unless they are two or more of ``LANDMARKS``."""
    unknown = [n for n in names if n not in LANDMARKS]
    if unknown or len(set(names)) < 2:
        raise DataError(f"landmarks to fit to: {list(names)}; give two or more of {list(LANDMARKS)}")
    return tuple(n for n in LANDMARKS if n in names)


def canonical_landmarks(masks: np.ndarray, class_names: Sequence[str], fit: Sequence[str] = LANDMARKS) -> Canonical:
    """The canonical framing measured on aligned training masks (N, S, S): each landmark's mean and spread
    over the faces where all four are visible, and the spread of their transforms from the mean (fit to the
    landmarks ``fit``, as photos' faces will be)."""
    fit = check_fit_landmarks(fit)
    use = _landmark_mask(fit)
    check_face_classes(class_names, "the training masks")
    side = masks.shape[1]
    points = np.stack([landmarks_from_mask(m, class_names) for m in masks]) / side
    whole = points[~np.isnan(points).any(axis=(1, 2))]
    if len(whole) == 0:
        raise DataError("no training mask shows both eyes, the nose and the mouth: no canonical framing")
    mean = whole.mean(0)
    poses = np.stack([_pose(fit_similarity(mean[use], face[use]), mean) for face in whole])
    return Canonical(mean, whole.std(0), poses.std(0), len(whole), fit)


def _pose(where: "Similarity", landmarks: np.ndarray) -> np.ndarray:
    """(log scale, angle, dx, dy) of a transform: dx, dy = how far it moves the centre of ``landmarks``."""
    centre = landmarks.mean(0, keepdims=True)
    moved = where.apply(centre)[0] - centre[0]
    return np.array([math.log(where.scale), where.angle, moved[0], moved[1]])


# ----------------------------------------------------------------------------------------------
# finding faces

@dataclass
class FoundFace:
    landmarks: np.ndarray   # (4, 2) photo coordinates, NaN where not found
    box: tuple[float, float, float, float]  # the blob's (left, top, right, bottom) in photo coordinates
    area: float             # the blob's share of the finder's square

    def usable(self) -> bool:
        return _usable(self.landmarks)


def _usable(landmarks: np.ndarray) -> bool:
    """Two landmarks or more: enough for a similarity."""
    return int((~np.isnan(landmarks).any(1)).sum()) >= 2


def soft_landmarks(probs: np.ndarray, mask: np.ndarray, class_names: Sequence[str], region: np.ndarray,
                   min_pixels: int = 2, reach: int = 2) -> np.ndarray:
    """Landmarks (4, 2) as ``landmarks_from_mask`` finds them in ``mask`` (H, W) within ``region``, each moved
    to the centroid of its part's probability (``probs`` (H, W, C)) over its pixels grown by ``reach``: a part
    a few pixels wide then lands between pixels, where its edge pixels' probabilities put it, not on the mean
    of whole pixels. An eye's weight is either eye's probability: which one is told by position
    (``order_eyes``)."""
    out = np.full((len(LANDMARK_PARTS), 2), np.nan)
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
    eyes = _ids(class_names, ("l_eye", "r_eye"))
    for k, (name, parts) in enumerate(LANDMARK_PARTS.items()):
        hit = np.isin(mask, _ids(class_names, parts)) & region
        if hit.sum() < min_pixels:
            continue
        weight = probs[..., eyes if name.startswith("eye") else _ids(class_names, parts)].sum(-1)
        weight = weight * ndimage.binary_dilation(hit, iterations=reach)
        out[k] = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
    return order_eyes(out)


def faces_in_mask(mask: np.ndarray, class_names: Sequence[str], min_area: float = 0.004,
                  min_pixels: int = 2, probs: np.ndarray | None = None,
                  ) -> list[tuple[np.ndarray, tuple[int, int, int, int], float]]:
    """Faces in a class-id mask (S, S): one per 8-connected blob of ``FACE_PARTS`` covering at least
    ``min_area`` of the square, largest first: (landmarks (4, 2) in mask pixels, box, area share). With the
    class probabilities ``probs`` (S, S, C) the mask came from: ``soft_landmarks``."""
    blobs, n = ndimage.label(np.isin(mask, _ids(class_names, FACE_PARTS)), structure=np.ones((3, 3)))
    faces = []
    for k, sl in enumerate(ndimage.find_objects(blobs), start=1):
        region = blobs == k
        area = float(region.sum()) / mask.size
        if area < min_area:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        marks = (landmarks_from_mask(mask, class_names, min_pixels, region) if probs is None
                 else soft_landmarks(probs, mask, class_names, region, min_pixels))
        faces.append((marks, box, area))
    return sorted(faces, key=lambda f: -f[2])


def _argmax(probs: torch.Tensor) -> np.ndarray:
    return probs.argmax(-1).cpu().numpy().astype(np.uint8)


def find_faces(images: Sequence[Image.Image], finder: Finder, class_names: Sequence[str], side: int,
               min_area: float = 0.004) -> list[list[FoundFace]]:
    """Every face the finder sees in each image, padded to its ``side`` x ``side`` square (nothing cut off);
    one finder call for them all."""
    if not images:
        return []
    wheres = [framing(img.size, side, "pad") for img in images]
    masks = _argmax(finder(np.stack([np.array(frame(img, where)) for img, where in zip(images, wheres)])))
    out = []
    for mask, where in zip(masks, wheres):
        to_photo = framing_similarity(where)
        found = []
        for marks, (x0, y0, x1, y1), area in faces_in_mask(mask, class_names, min_area):
            corners = to_photo.apply(np.array([[x0, y0], [x1, y1]], np.float64))
            found.append(FoundFace(to_photo.apply(marks), (*corners[0], *corners[1]), area))
        out.append(found)
    return out


def fit_to_canonical(landmarks: np.ndarray, canonical: Canonical, side: int) -> Similarity:
    """The similarity taking the aligned crop (``side``) onto the photo, from the landmarks found there of
    ``canonical.fit`` (every one found where fewer than two of those are)."""
    seen = ~np.isnan(landmarks).any(1)
    if (seen & canonical.fit_mask).sum() >= 2:
        seen &= canonical.fit_mask
    return fit_similarity(canonical.at(side)[seen], landmarks[seen])


# ----------------------------------------------------------------------------------------------
# warping both ways

def warp_face(img: Image.Image, where: Similarity, side: int,
              fill: tuple[int, int, int] | str = "edge") -> np.ndarray:
    """The aligned crop (side, side, 3) uint8 of ``img`` along ``where`` (crop -> photo). Made in two steps so
    that shrinking a large photo does not alias: the region under the crop is resized (antialiased) to the
    crop's scale, then rotated and shifted at 1:1 (bicubic). Where the crop leaves the photo (a face cut by the
    frame): ``fill``, an RGB colour, or "edge": the nearest pixel the photo shows, the surroundings continued.
    A flat grey block reads to the read-out as an object over the face: on 48 val faces shifted 25 %, edge
    filling scores 0.349 against grey's 0.265 (10 %: 0.477 against 0.458; as is 0.504 against 0.501)."""
    corners = where.apply(np.array([[0, 0], [side, 0], [0, side], [side, side]], np.float64))
    pad = 2 * where.scale
    x0, y0 = np.maximum(np.floor(corners.min(0) - pad), 0).astype(int)
    x1 = int(min(math.ceil(corners[:, 0].max() + pad), img.size[0]))
    y1 = int(min(math.ceil(corners[:, 1].max() + pad), img.size[1]))
    if x1 <= x0 or y1 <= y0:
        return np.full((side, side, 3), PAD_FILL if fill == "edge" else fill, np.uint8)
    iw, ih = max(1, round((x1 - x0) / where.scale)), max(1, round((y1 - y0) / where.scale))
    region = img.resize((iw, ih), Image.BICUBIC, box=(x0, y0, x1, y1))
    fx, fy = (x1 - x0) / iw, (y1 - y0) / ih
    # crop p -> photo s R p + t -> region ((P - (x0, y0)) / (fx, fy)): PIL wants that map's coefficients
    cos, sin = where.scale * math.cos(where.angle), where.scale * math.sin(where.angle)
    data = (cos / fx, -sin / fx, (where.tx - x0) / fx, sin / fy, cos / fy, (where.ty - y0) / fy)
    crop = np.array(region.transform((side, side), Image.AFFINE, data, resample=Image.BICUBIC,
                                     fillcolor=PAD_FILL if fill == "edge" else fill))
    if fill != "edge":
        return crop
    shown = np.array(Image.new("L", region.size, 255).transform((side, side), Image.AFFINE, data,
                                                                 resample=Image.NEAREST, fillcolor=0)) > 0
    if shown.any() and not shown.all():
        _, (rows, cols) = ndimage.distance_transform_edt(~shown, return_indices=True)
        crop = crop[rows, cols]
    return crop


STRIP_VALUES = 1 << 22  # classes x pixels (float32) sampled at once when pasting back


@torch.no_grad()
def paste_back(probs: torch.Tensor, where: Similarity, side: int, best: np.ndarray, labels: np.ndarray) -> None:
    """Sample the aligned crop's class probabilities (L, L, C) back onto the photo along ``where`` (whose crop
    is ``side`` pixels: L may be coarser, as ``features.label_size`` makes it; the sampling is bilinear as
    ``F.interpolate(align_corners=False)``) and keep, per photo pixel, the more confident face: ``best`` (H, W)
    float32 holds the top probability so far (-1 = no face yet), ``labels`` (H, W) uint8 its class; both are
    updated in place where this face is surer."""
    classes = probs.shape[-1]
    height, width = best.shape
    corners = where.apply(np.array([[0, 0], [side, 0], [0, side], [side, side]], np.float64))
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [width, height])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int), 0, [width, height])
    if x1 <= x0 or y1 <= y0:
        return
    grid_probs = probs.float().permute(2, 0, 1)[None].cpu()           # (1, C, S, S)
    xs = np.arange(x0, x1) + 0.5
    step = max(1, STRIP_VALUES // max(1, classes * len(xs)))
    for lo in range(y0, y1, step):
        ys = np.arange(lo, min(lo + step, y1)) + 0.5
        px = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        crop = where.invert(px)
        inside = ((crop >= 0) & (crop < side)).all(1).reshape(len(ys), len(xs))
        if not inside.any():
            continue
        g = torch.from_numpy((2 * crop / side - 1).astype(np.float32)).reshape(1, len(ys), len(xs), 2)
        sampled = F.grid_sample(grid_probs, g, mode="bilinear", padding_mode="border", align_corners=False)[0]
        top, cls = sampled.max(0)
        top, cls = top.numpy(), cls.numpy().astype(np.uint8)
        rows = slice(lo, lo + len(ys))
        cur = best[rows, x0:x1]
        win = inside & (top > cur)
        cur[win] = top[win]
        labels[rows, x0:x1][win] = cls[win]


# ----------------------------------------------------------------------------------------------
# the whole path for one photo

# A lone face whose pose (scale, tilt, centre) lies within this many of the training faces' standard deviations
# of the plain framing keeps the plain framing: segment.snap_sd's default, chosen on val (docs/real_faces.md,
# *Photos as people take them*): 3 keeps all but a few aligned faces as they are, and lets few 20 %-zoomed faces
# through; wider bands lost on val in session 8 too.
SNAP_SD = SegmentConfig.snap_sd
# A second opinion (segment.snap_plain_sd's default; docs/real_faces.md, *Session 11*): the refiner parses the
# plain framing itself, and a lone face it finds there whole, at the training faces' scale, within this many
# standard deviations of their tilt and centre keeps that framing too. Aligned photos' fits stray mostly in
# tilt and centre (an eye behind glasses, a turned head), a zoomed-out face's only in scale.
SNAP_PLAIN_SD = SegmentConfig.snap_plain_sd

@dataclass
class AlignedFace:
    where: Similarity        # aligned crop -> photo
    landmarks: np.ndarray    # (4, 2) photo coordinates the final transform was fit to (NaN: not found)
    box: tuple[float, float, float, float]
    crop: np.ndarray         # (side, side, 3) uint8: what the read-out sees
    snapped: bool            # the photo's plain framing was kept: the face already sits as training faces do
    # the found transform relative to the plain framing (``Canonical.pose``: log scale, angle, tx, ty); None
    # where no plain framing was given
    pose: np.ndarray | None = None

    @classmethod
    def plain(cls, img: Image.Image, where: Framing, landmarks: np.ndarray | None = None,
              box: tuple[float, float, float, float] | None = None, pose: np.ndarray | None = None) -> "AlignedFace":
        """The photo in its plain framing ``where`` (``segment.crop``'s), as the read-out sees it unaligned; by
        default no landmarks and the whole photo as the box."""
        return cls(framing_similarity(where), np.full((4, 2), np.nan) if landmarks is None else landmarks,
                   (0, 0, *img.size) if box is None else box, np.array(frame(img, where)), True, pose)

    @classmethod
    def cut(cls, img: Image.Image, where: Similarity, side: int, landmarks: np.ndarray | None = None,
            box: tuple[float, float, float, float] | None = None, pose: np.ndarray | None = None) -> "AlignedFace":
        """The face cut out of the photo along ``where`` (``warp_face``); defaults as ``plain``."""
        return cls(where, np.full((4, 2), np.nan) if landmarks is None else landmarks,
                   (0, 0, *img.size) if box is None else box, warp_face(img, where, side), False, pose)

    def to_dict(self) -> dict:
        out = {"box": [round(float(v), 2) for v in self.box],
               "landmarks": {k: (None if np.isnan(p).any() else [round(float(v), 2) for v in p])
                             for k, p in zip(LANDMARKS, self.landmarks)},
               "transform": self.where.to_dict(), "kept_plain_framing": self.snapped}
        if self.pose is not None:
            out["pose_from_plain_framing"] = dict(zip(POSE_TERMS, np.round(self.pose, 5).tolist()))
        return out


def align_faces(images: Sequence[Image.Image], finder: Finder, class_names: Sequence[str], canonical: Canonical,
                side: int, *, refine: int = 1, refiner: tuple[Finder, Sequence[str]] | None = None,
                plain: Sequence[Framing] | None = None, snap_sd: float = SNAP_SD,
                snap_plain_sd: float = SNAP_PLAIN_SD, min_area: float = 0.004) -> list[list[AlignedFace]]:
    """Find every face of each image and align each (module docstring): per image, its ``AlignedFace`` list.
    ``refine``: times each face is parsed again in its aligned crop and the transform refit, by ``refiner`` (a
    parser and its class names; default the finder), its landmarks ``soft_landmarks``. ``plain``: each image's
    ordinary framing; a lone face whose transform from it lies within ``snap_sd`` standard deviations of the
    training faces' own (``Canonical.deviation``: scale, tilt and shift as the read-out saw them in training)
    keeps it, so an aligned photo is segmented exactly as without alignment; so does one the refiner finds whole
    in the plain framing itself within ``snap_plain_sd`` (``_kept_by_plain_parse``; such a face is not refined).
    The finder parses all the images in one call and the refiner all their faces in one call per round: a pass
    per face was a tenth of a photo's time."""
    parse, parse_names = refiner or (finder, class_names)
    faces = [(i, face.box, face.landmarks, fit_to_canonical(face.landmarks, canonical, side))
             for i, found in enumerate(find_faces(images, finder, class_names, side, min_area))
             for face in found if face.usable()]
    kept = {}
    if plain is not None and snap_plain_sd > 0:
        kept = _kept_by_plain_parse(images, faces, (parse, parse_names), canonical, side, plain, snap_sd,
                                    snap_plain_sd, min_area)
        faces = [(i, box, *kept[i]) if i in kept else (i, box, marks, where) for i, box, marks, where in faces]
    todo = [k for k, face in enumerate(faces) if face[0] not in kept]
    for _ in range(refine):
        if not todo:
            break
        probs = parse(np.stack([warp_face(images[faces[k][0]], faces[k][3], side) for k in todo]))
        still = []
        for k, mask, p in zip(todo, _argmax(probs), probs.float().cpu().numpy()):
            seen = _central_landmarks(mask, p, parse_names, min_area)
            if seen is None:
                continue  # the refiner lost the face: its transform stays as it was
            i, box, _, where = faces[k]
            marks = where.apply(seen)
            faces[k] = (i, box, marks, fit_to_canonical(marks, canonical, side))
            still.append(k)
        todo = still
    out = []
    for i, img in enumerate(images):
        own = [(box, marks, where) for j, box, marks, where in faces if j == i]
        out.append(_framed_faces(img, own, canonical, side, None if plain is None else plain[i], snap_sd,
                                 i in kept))
    return out


def _central_landmarks(mask: np.ndarray, probs: np.ndarray, names: Sequence[str], min_area: float) -> np.ndarray | None:
    """The soft landmarks of the usable face nearest the centre of a parsed square (a neighbour may show at its
    edge); None where there is none."""
    local = [f[0] for f in faces_in_mask(mask, names, min_area, probs=probs) if _usable(f[0])]
    centre = np.array(mask.shape[::-1]) / 2
    return min(local, key=lambda m: np.linalg.norm(np.nanmean(m, 0) - centre), default=None)


def _kept_by_plain_parse(images: Sequence[Image.Image], faces: list, parser: tuple[Finder, Sequence[str]],
                         canonical: Canonical, side: int, plain: Sequence[Framing], snap_sd: float, band: float,
                         min_area: float) -> dict[int, tuple[np.ndarray, Similarity]]:
    """The photos whose lone face ``parser`` finds in their plain framing with every landmark, its fit there within
    ``snap_sd`` of the training faces' scale and ``band`` standard deviations of their tilt and centre: photo
    index -> (those landmarks in photo coordinates, the crop -> photo transform fit to them). One parser call."""
    parse, names = parser
    counts = np.bincount([i for i, *_ in faces], minlength=len(images))
    lone = [i for i in range(len(images)) if counts[i] == 1]
    if not lone:
        return {}
    probs = parse(np.stack([np.array(frame(images[i], plain[i])) for i in lone]))
    limits = np.array([snap_sd, band, band, band])
    kept = {}
    for i, mask, p in zip(lone, _argmax(probs), probs.float().cpu().numpy()):
        marks = _central_landmarks(mask, p, names, min_area)
        if marks is None or np.isnan(marks).any():
            continue  # a fit without an eye strays where glasses hide it: only the aligned fit decides
        fit = fit_to_canonical(marks, canonical, side)
        if (canonical.deviation(fit, side) <= limits).all():
            to_photo = framing_similarity(plain[i])
            kept[i] = (to_photo.apply(marks), fit.then(to_photo))
    return kept


def _framed_faces(img: Image.Image, faces: list, canonical: Canonical, side: int, plain: Framing | None,
                  snap_sd: float, kept: bool = False) -> list[AlignedFace]:
    """One image's aligned faces from their (box, landmarks, transform): the plain framing kept for a lone face
    that already sits as the training faces do (or ``kept`` by ``_kept_by_plain_parse``), every other face cut
    out along its transform."""
    # each face's transform relative to the plain framing, as training faces' transforms are measured
    from_plain = None if plain is None else framing_similarity(plain).inverse()
    relative = [None if plain is None else where.then(from_plain) for _, _, where in faces]
    poses = [None if r is None else canonical.pose(r, side) for r in relative]
    if plain is not None and len(faces) == 1 and (kept or (canonical.deviation(relative[0], side) <= snap_sd).all()):
        box, marks, _ = faces[0]
        return [AlignedFace.plain(img, plain, marks, box, poses[0])]
    return [AlignedFace.cut(img, where, side, marks, box, pose) for (box, marks, where), pose in zip(faces, poses)]


# ----------------------------------------------------------------------------------------------
# scenes to train a finder on: labeled faces as photos show them

@dataclass(frozen=True)
class SceneSpec:
    """How ``random_scenes`` frames faces. Sizes are the side of a face's whole (CelebA-HQ) square as a share
    of the scene's side; the face itself fills about half of it."""
    min_size: float = 0.3
    max_size: float = 1.5
    max_angle: float = 45.0     # degrees either way
    two_faces: float = 0.3      # share of scenes with two faces side by side
    no_face: float = 0.05       # share of scenes with none


def _pyramid(images: np.ndarray) -> list[torch.Tensor]:
    """The images (N, S, S, 3) uint8 as float (N, 3, s, s) at S, S/2, S/4 (area-averaged): warping from the
    level nearest the output size keeps small faces from aliasing."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    levels = [x]
    while levels[-1].shape[-1] >= 64:
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def _paste(canvas: torch.Tensor, labels: torch.Tensor, src: torch.Tensor, mask: torch.Tensor,
           centre: tuple[float, float], size: float, angle: float) -> None:
    """Draw a face square ``src`` (3, s, s) / ``mask`` (S, S) onto ``canvas`` (3, C, C) / ``labels`` (C, C)
    with its centre at ``centre`` (pixels), its side ``size`` pixels, rotated by ``angle`` (radians)."""
    side = canvas.shape[-1]
    cos, sin = math.cos(angle), math.sin(angle)
    rt = np.array([[cos, sin], [-sin, cos]])           # R^T: canvas -> face orientation
    theta = np.zeros((1, 2, 3), np.float32)
    theta[0, :, :2] = side / size * rt
    theta[0, :, 2] = 2 / size * rt @ (side / 2 - np.asarray(centre))
    grid = F.affine_grid(torch.from_numpy(theta), [1, 3, side, side], align_corners=False)
    image = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    cls = F.grid_sample(mask[None, None].float() + 1, grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0]
    inside = (grid.abs() <= 1).all(-1)[0]
    canvas[:, inside] = image[:, inside]
    labels[inside] = (cls[inside] - 1).to(labels.dtype)


def random_scenes(images: np.ndarray, masks: np.ndarray, count: int, side: int, seed: int,
                  flip_table: np.ndarray | None = None, spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes (side, side, 3) uint8 with masks (side, side) made of the labeled faces ``images``
    (N, S, S, 3) / ``masks`` (N, S, S): one face (or two side by side, or none) at a random size, place, tilt
    and mirror image, on a plain, noisy or blurred-photo background (background class 0). ``flip_table``:
    the class lookup of a mirror image (l_eye <-> r_eye); None = no mirror images. A function of the seed."""
    rng = np.random.default_rng(seed)
    levels = _pyramid(images)
    mask_t = torch.from_numpy(masks.astype(np.int64))
    flip = None if flip_table is None else torch.from_numpy(flip_table.astype(np.int64))
    out_images = np.empty((count, side, side, 3), np.uint8)
    out_masks = np.zeros((count, side, side), np.uint8)
    for n in range(count):
        kind = rng.integers(3)
        if kind == 0:
            canvas = torch.full((3, side, side), 0.0) + torch.tensor(PAD_FILL, dtype=torch.float32)[:, None, None]
        elif kind == 1:
            canvas = (torch.from_numpy(rng.uniform(0, 255, (3, 1, 1))).float()
                      + torch.from_numpy(rng.normal(0, 12, (3, side, side))).float())
        else:  # another photo, blurred beyond recognition: colours and light of a scene, no parts
            tiny = levels[-1][rng.integers(len(images))][None]
            canvas = F.interpolate(F.adaptive_avg_pool2d(tiny, 3), size=(side, side), mode="bilinear",
                                   align_corners=False)[0]
        labels = torch.zeros((side, side), dtype=torch.int64)
        u = rng.random()
        faces = 0 if u < spec.no_face else (2 if u < spec.no_face + spec.two_faces else 1)
        top = spec.max_size if faces == 1 else min(spec.max_size, 0.9)
        sizes = np.exp(rng.uniform(math.log(spec.min_size), math.log(top), faces)) * side
        if faces == 2:  # side by side, the nearer half-squares just touching or apart
            gap = rng.uniform(0.45, 0.6) * sizes.sum()
            cx = rng.uniform(0.2, 0.8) * side
            cy = rng.uniform(0.3, 0.7, 2) * side
            xs = [cx - gap / 2, cx + gap / 2]
            centres = [(xs[0], cy[0]), (xs[1], cy[1])]
        else:
            centres = [tuple(rng.uniform(0.15, 0.85, 2) * side) for _ in range(faces)]
        for size, centre in zip(sizes, centres):
            k = int(rng.integers(len(images)))
            level = min(len(levels) - 1, int(max(0.0, math.log2(images.shape[1] / max(size, 1.0)))))
            src, mask = levels[level][k], mask_t[k]
            if flip is not None and rng.random() < 0.5:
                src, mask = src.flip(-1), flip[mask.flip(-1)]
            _paste(canvas, labels, src, mask, centre, float(size), math.radians(rng.uniform(-1, 1) * spec.max_angle))
        out_images[n] = canvas.clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8).numpy()
        out_masks[n] = labels.numpy().astype(np.uint8)
    return out_images, out_masks
