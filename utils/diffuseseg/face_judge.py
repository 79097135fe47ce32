"""The face judge: how face-like generated images are, in the eyes of a face parser trained on real faces.

FID needs Inception's weights, which cannot be had here, and the random-feature distance of
``sample_quality.py`` measures texture statistics: it ranked noise-textured samples far closer to real faces than
smooth, warped ones, which is not how a person sees them. The judge is a face parser (a ``segmenter.SegUNet``
trained by ``train_segmenter.py`` on real labeled faces that no DDPM choice is tuned on); what it has learned is
where skin, eyes, brows, nose and lips are and what they look like. Two figures, each against held-out real faces:

* ``parser_distance``: the Fréchet distance (FID's formula) between Gaussian fits of real and generated images in
  the parser's deepest activations (the bottom of its U-Net: channel means and standard deviations), the most
  semantic ones it has. Lower is better; its floor is the distance between two sets of real faces of the same
  size. (Adding the shallower levels and the class shares was measured too: they weigh blur and noise above a
  face's shape, and triple the floor: docs/sample_quality.md.)
* ``parts_in_place``: the fraction of images in which the parser finds a face's parts where a face has them:
  skin, a nose, two eyes (or glasses), two brows and a lip, each at least ``min_pixels`` pixels, the eyes above
  the nose, the nose above the lips and the image-left eye the person's right one. Real faces fall short of 1
  (hair over a brow, a turned head): their own rate is the target, not 1.

``damage`` makes the validation sets (blur, noise, JPEG and smooth warps of real faces at given strengths): a
judge that people can trust scores every kind of damage worse as it grows (docs/sample_quality.md).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from diffuseseg.datasets import to_model_range
from diffuseseg.errors import UserError
from diffuseseg.sample_quality import frechet_distance, random_feature_distance, two_sample_accuracy
from diffuseseg.segmenter import SegUNet, load_segmenter

# Each part of a face: any one of these class names counts as that part being there.
FACE_PARTS: dict[str, tuple[str, ...]] = {"skin": ("skin",), "nose": ("nose",), "lips": ("u_lip", "l_lip")}
EYES, BROWS, GLASSES = ("r_eye", "l_eye"), ("r_brow", "l_brow"), "eye_g"  # r_ = the person's right: image left
DAMAGE_KINDS = ("blur", "noise", "jpeg", "warp")


@dataclass(frozen=True)
class JudgeScore:
    parser_distance: float
    parts_in_place: float  # of the generated images
    reference_parts_in_place: float  # of the real images they are compared with


class FaceJudge:
    """A trained face parser (a ``save_segmenter`` file of the compact U-Net) as a judge of face images."""

    def __init__(self, path: str | Path, min_pixels: int = 3, batch_size: int = 64) -> None:
        self.model, info = load_segmenter(path)
        if not isinstance(self.model, SegUNet):
            raise UserError(f"{path}: the face judge must be a compact U-Net segmenter (arch unet), "
                            f"not {info['arch']['name']}")
        self.path, self.class_names = Path(path), info["class_names"]
        needed = [*(n for names in FACE_PARTS.values() for n in names), *EYES, *BROWS]
        missing = [n for n in needed if n not in self.class_names]
        if missing:
            raise UserError(f"{path}: a face judge needs the face-part classes {', '.join(missing)}; its classes "
                            f"are {', '.join(self.class_names)}")
        self.min_pixels, self.batch_size = min_pixels, batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pooled parser activations (N, D) float64, parsed masks (N, S, S) uint8) of uint8 (N, S, S, 3) images."""
        feats, masks = [], []
        for lo in range(0, len(images), self.batch_size):
            x = to_model_range(np.asarray(images[lo:lo + self.batch_size]))
            logits, bottom = self.model.forward_with_bottom(x)
            feats.append(torch.cat([bottom.mean(dim=(2, 3)), bottom.std(dim=(2, 3))], dim=1))
            masks.append(logits.argmax(1).to(torch.uint8))
        return torch.cat(feats).double().numpy(), torch.cat(masks).numpy()

    def parts_in_place(self, masks: np.ndarray) -> np.ndarray:
        """Per image: does the parsed mask hold a face's parts where a face has them (module docstring)?"""
        return np.array([_parts_in_place(m, self.class_names, self.min_pixels) for m in masks], dtype=bool)

    def score(self, real: np.ndarray, fake: np.ndarray) -> JudgeScore:
        """``fake`` against ``real`` (uint8 (N, S, S, 3) each, N >= 2)."""
        if real.shape[1:] != fake.shape[1:] or min(len(real), len(fake)) < 2:
            raise ValueError(f"real and fake must be (N>=2, H, W, C) stacks of one image shape, got {real.shape} "
                             f"and {fake.shape}")
        real_feats, real_masks = self.features(real)
        fake_feats, fake_masks = self.features(fake)
        return JudgeScore(frechet_distance(real_feats, fake_feats), float(self.parts_in_place(fake_masks).mean()),
                          float(self.parts_in_place(real_masks).mean()))


def _centroid(mask: np.ndarray, ids: Sequence[int], min_pixels: int) -> tuple[float, float] | None:
    ys, xs = np.nonzero(np.isin(mask, ids))
    return (float(ys.mean()), float(xs.mean())) if len(ys) >= min_pixels else None


def _parts_in_place(mask: np.ndarray, class_names: Sequence[str], min_pixels: int) -> bool:
    ids = {name: i for i, name in enumerate(class_names)}
    part = {name: _centroid(mask, [ids[n] for n in names], min_pixels) for name, names in FACE_PARTS.items()}
    eyes = [_centroid(mask, [ids[n]], min_pixels) for n in EYES]
    brows = [_centroid(mask, [ids[n]], min_pixels) for n in BROWS]
    if any(c is None for c in (*part.values(), *brows)):
        return False
    if None in eyes:  # eyes hidden by glasses: the glasses stand in for both, side by side unchecked
        glasses = _centroid(mask, [ids[GLASSES]], min_pixels) if GLASSES in ids else None
        if glasses is None:
            return False
        eye_y = glasses[0]
    else:
        if not eyes[0][1] < eyes[1][1]:  # the person's right eye on the image's left
            return False
        eye_y = (eyes[0][0] + eyes[1][0]) / 2
    return eye_y < part["nose"][0] < part["lips"][0]


def damage(images: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """Damaged copies of uint8 (N, S, S, 3) images: ``blur`` (Gaussian, radius ``strength`` pixels), ``noise``
    (Gaussian, standard deviation ``strength`` grey levels), ``jpeg`` (quality ``strength``) or ``warp`` (a
    smooth random displacement field, at most ``strength`` pixels: a face's parts moved out of place, the
    failure of an undertrained DDPM)."""
    if kind not in DAMAGE_KINDS:
        raise ValueError(f"unknown damage {kind!r}; known: {', '.join(DAMAGE_KINDS)}")
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return np.clip(images + rng.normal(0.0, strength, images.shape), 0, 255).round().astype(np.uint8)
    if kind == "warp":
        return _warp(images, strength, rng)
    out = []
    for image in images:
        img = Image.fromarray(image)
        if kind == "blur":
            out.append(np.asarray(img.filter(ImageFilter.GaussianBlur(strength))))
        else:
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=int(strength))
            out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def _warp(images: np.ndarray, pixels: float, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """Each image resampled through its own displacement field: random offsets on a ``grid`` x ``grid``
    lattice, up-sampled smoothly, scaled so the largest offset is ``pixels``."""
    n, size = len(images), images.shape[1]
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 2, grid, grid))).float()
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True) * (2 * pixels / size)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    where = torch.stack([xs, ys], -1)[None] + field.permute(0, 2, 3, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    warped = F.grid_sample(x, where, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# The validation's damage: three strengths of each kind, mild to strong (blur radius and warp in pixels at the
# image's size, noise in grey levels, JPEG quality).
VALIDATION_DAMAGE: dict[str, tuple[float, ...]] = {"blur": (0.5, 1.0, 2.0), "noise": (4.0, 8.0, 16.0),
                                                   "jpeg": (50.0, 20.0, 8.0), "warp": (2.0, 4.0, 8.0)}


@dataclass(frozen=True)
class JudgedSet:
    name: str
    parser_distance: float
    parts_in_place: float
    random_feature_distance: float
    two_sample_accuracy: float | None  # None where the critic was not run


def damaged_sets(real: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """``real`` under every ``VALIDATION_DAMAGE``, named like ``blur 1``."""
    return {f"{kind} {strength:g}": damage(real, kind, strength, seed)
            for kind, strengths in VALIDATION_DAMAGE.items() for strength in strengths}


def judge_sets(judge: FaceJudge, reference: np.ndarray, sets: dict[str, np.ndarray], seed: int = 0,
               critic: bool = True, log=print) -> list[JudgedSet]:
    """Every set against the held-out ``reference`` faces, by the judge and by sample_quality's two figures
    (``critic=False``: not the two-sample accuracy, which trains a CNN per set: minutes each on a CPU)."""
    rows = []
    for name, images in sets.items():
        n = min(len(images), len(reference))
        score = judge.score(reference[:n], images[:n])
        rows.append(JudgedSet(name, score.parser_distance, score.parts_in_place,
                              random_feature_distance(reference[:n], images[:n], seed=seed),
                              two_sample_accuracy(reference[:n], images[:n], seed=seed) if critic else None))
        log(f"{name}: parser distance {rows[-1].parser_distance:.2f}, parts in place {rows[-1].parts_in_place:.3f}, "
            f"random-feature distance {rows[-1].random_feature_distance:.2f}"
            + (f", two-sample accuracy {rows[-1].two_sample_accuracy:.3f}" if critic else ""))
    return rows


def judged_table(rows: Sequence[JudgedSet], reference_parts: float) -> str:
    lines = ["| images | parser distance | parts in place | random-feature distance | two-sample accuracy |",
             "|---|---|---|---|---|",
             f"| held-out real faces (the reference) | 0 | {reference_parts:.3f} | 0 | – |"]
    lines += [f"| {r.name} | {r.parser_distance:.2f} | {r.parts_in_place:.3f} | {r.random_feature_distance:.2f} | "
              f"{'–' if r.two_sample_accuracy is None else f'{r.two_sample_accuracy:.3f}'} |" for r in rows]
    return "\n".join(lines)
