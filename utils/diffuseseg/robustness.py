"""How a trained read-out holds up on faces framed unlike its training faces, and whether its per-image
uncertainty says so.

The labeled test faces are segmented as they are and after three changes of framing a user's photos
commonly have, each made from the full-resolution file (not from the model-size image, which would blur it):

- ``shift``: the face moved right and down by ``shift`` of the side (the uncovered strip is ``PAD_FILL``
  grey, as ``segment.crop=pad`` fills);
- ``zoom_out``: the face scaled by ``1 - zoom_out`` about the centre, on grey;
- ``mirror``: flipped left to right; the ground truth's left/right parts (``l_eye`` / ``r_eye`` ...,
  ``views.mirror_pairs``) swap too, so that a read-out which learned "the left eye is on the image's right" is
  scored as the labels would be drawn on the mirrored photo.

Grey pixels have no ground truth (``ignore_index``) and are not scored. For each variant: mIoU, per-image mIoU,
the mean per-image uncertainty (``uncertainty.csv``'s official score) and its Spearman rank correlation with
per-image mIoU (negative = the uncertain images are the badly segmented ones, as it should be); and the same
correlation over all variants pooled.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffuseseg.datasets import LabeledFolder
from diffuseseg.errors import DataError
from diffuseseg.face_align import (AlignedFace, Similarity, align_faces, fit_to_canonical,
                                   landmarks_from_mask)
from diffuseseg.image_io import PAD_FILL, Framing, frame, framing, open_rgb
from diffuseseg.io import atomic_write_text
from diffuseseg.metrics import (evaluate, image_confusions, paired_miou_difference, rank_correlation,
                                report_of_confusions)
from diffuseseg.segment_outputs import mask_palette
from diffuseseg.segmentation import Readout, segment
from diffuseseg.views import NO_VIEWS, ViewSet, flip_lookup, mirror_pairs
from diffuseseg.visualize import colorize, save_grid

VARIANTS = ("as_is", "shift", "zoom_out", "mirror")


def variant_framing(size: tuple[int, int], side: int, variant: str, shift: float = 0.1,
                    zoom_out: float = 0.2) -> Framing:
    """Where a file of ``size`` lands in the model's square for ``variant``: the loader's centre framing,
    moved (``shift``) or scaled about the centre (``zoom_out``)."""
    where = framing(size, side, "center")
    if variant in ("as_is", "mirror"):
        return where
    (x, y), (w, h) = where.offset, where.resized
    if variant == "shift":
        d = round(shift * side)
        return replace(where, offset=(x + d, y + d))
    if variant == "zoom_out":
        rw, rh = max(1, round(w * (1 - zoom_out))), max(1, round(h * (1 - zoom_out)))
        # keep the centre of the (possibly cut-off) photo at the centre of the square
        cx, cy = x + w / 2, y + h / 2
        return replace(where, resized=(rw, rh), offset=(round(cx - rw / 2), round(cy - rh / 2)))
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def load_variant(split: LabeledFolder, variant: str, ignore_index: int, shift: float = 0.1,
                 zoom_out: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) uint8 and masks (N, S, S) of every face of ``split`` as ``variant`` frames it,
    made from the files at full resolution; pixels without ground truth are ``ignore_index``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    side, images, masks = split.size, [], []
    pairs = mirror_pairs(split.classes.names)
    if variant == "mirror" and pairs is None:
        raise DataError(f"{split.root}: a sided class name without its partner; the mirrored ground truth is unknown")
    swap = flip_lookup(pairs or [])
    for pair in split.pairs:
        image, mask = open_rgb(pair.image_path), Image.fromarray(pair.read_mask())
        where = variant_framing(image.size, side, variant, shift, zoom_out)  # as_is, mirror: the loader's
        image, mask = np.asarray(frame(image, where)), np.asarray(frame(mask, where, Image.NEAREST, ignore_index))
        if variant == "mirror":
            image, mask = image[:, ::-1], swap[mask[:, ::-1]]
        images.append(np.ascontiguousarray(image))
        masks.append(np.ascontiguousarray(mask))
    return np.stack(images), np.stack(masks)


@dataclass
class VariantResult:
    miou: float
    mean_image_miou: float
    mean_uncertainty: float
    rank_correlation: float  # Spearman, per-image uncertainty vs per-image mIoU
    per_class_iou: dict[str, float]
    per_image_miou: list[float]
    uncertainty: list[float]


@dataclass
class RobustnessResult:
    names: list[str]
    variants: dict[str, VariantResult]
    pooled_rank_correlation: float  # over every (image, variant)
    shift: float
    zoom_out: float

    def markdown(self) -> str:
        lines = ["| framing | mIoU | mean image mIoU | mean uncertainty | rank corr. (uncertainty, image mIoU) |",
                 "|---|---|---|---|---|"]
        for name, r in self.variants.items():
            label = {"shift": f"shift {self.shift:.0%}", "zoom_out": f"zoom-out {self.zoom_out:.0%}"}.get(name, name)
            lines.append(f"| {label} | {r.miou:.3f} | {r.mean_image_miou:.3f} | {r.mean_uncertainty:.4f} "
                         f"| {r.rank_correlation:+.2f} |")
        lines.append(f"\nRank correlation over all {len(self.names)} x {len(self.variants)} (image, framing) pairs: "
                     f"{self.pooled_rank_correlation:+.2f} (Spearman; negative = uncertain images are the badly "
                     f"segmented ones).")
        return "\n".join(lines)


def run_robustness(extractor, readout: Readout, split: LabeledFolder, ignore_index: int, *,
                   variants: Sequence[str] = VARIANTS, shift: float = 0.1, zoom_out: float = 0.2,
                   vote_mode: str = "majority", views: ViewSet = NO_VIEWS, batch_size: int = 16,
                   progress: bool = True, picture: str | Path | None = None,
                   picture_faces: int = 4) -> RobustnessResult:
    """Segment ``split`` in each framing of ``variants`` and measure it (module docstring). With ``picture``,
    also a PNG: one row per face, per framing the image, its ground truth and the prediction."""
    classes = split.classes
    results, tiles = {}, []
    all_unc, all_iou = [], []
    colours = mask_palette(classes, ignore_index)
    for variant in variants:
        images, gt = load_variant(split, variant, ignore_index, shift, zoom_out)
        seg = segment(extractor, readout, images, vote_mode=vote_mode, views=views, batch_size=batch_size,
                      progress=progress)
        report = evaluate(list(seg.masks), list(gt), classes.names, ignore_index)
        image_miou = np.asarray(report.per_image_miou)
        unc = seg.image_scores.astype(np.float64)
        results[variant] = VariantResult(
            miou=report.miou, mean_image_miou=float(np.nanmean(image_miou)), mean_uncertainty=float(unc.mean()),
            rank_correlation=rank_correlation(unc, image_miou), per_class_iou=report.per_class_iou,
            per_image_miou=[round(float(v), 6) for v in image_miou], uncertainty=[round(float(u), 6) for u in unc])
        all_unc.append(unc)
        all_iou.append(image_miou)
        k = min(picture_faces, len(images))
        tiles.append(np.stack([images[:k], colorize(gt[:k], colours), colorize(seg.masks[:k], colours)], axis=1))
    result = RobustnessResult(split.names, results, rank_correlation(np.concatenate(all_unc), np.concatenate(all_iou)),
                              shift, zoom_out)
    if picture is not None:
        grid = np.concatenate(tiles, axis=1)  # (faces, 3 * variants, S, S, 3)
        save_grid(grid.reshape(-1, *grid.shape[2:]), picture, nrow=grid.shape[1], scale=2)
    return result


def save_robustness(result: RobustnessResult, out_dir: str | Path) -> Path:
    """``robustness.json`` (every figure, per image too) and ``robustness.md`` (the table) in ``out_dir``."""
    out = Path(out_dir)
    atomic_write_text(out / "robustness.json", json.dumps(
        {"names": result.names, "shift": result.shift, "zoom_out": result.zoom_out,
         "pooled_rank_correlation": result.pooled_rank_correlation,
         "variants": {k: asdict(v) for k, v in result.variants.items()}}, indent=1))
    atomic_write_text(out / "robustness.md", result.markdown() + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# photos: test faces framed as people photograph them, scored at the photo's own size (issue 43)

PHOTO_SIDE = 256  # a test face's side in its photo (its 512 px file, halved): CelebAMask-HQ's 256 px protocol
PHOTO_VARIANTS = ("as_is", "shift_10", "shift_25", "zoom_out_20", "zoom_out_50", "rotate_15", "rotate_30",
                  "two_faces", "portrait")


def _on_canvas(image: Image.Image, mask: Image.Image, canvas: tuple[int, int], box: tuple[int, int, int, int],
               ignore_index: int) -> tuple[Image.Image, Image.Image]:
    """The face (image, mask) resized into ``box`` (left, top, right, bottom) of a grey canvas; the truth of
    the grey is ``ignore_index`` (no one labeled it)."""
    size = (box[2] - box[0], box[3] - box[1])
    photo = Image.new("RGB", canvas, PAD_FILL)
    truth = Image.new("L", canvas, ignore_index)
    photo.paste(image.resize(size, Image.BICUBIC), box[:2])
    truth.paste(mask.resize(size, Image.NEAREST), box[:2])
    return photo, truth


def _variant_boxes(variant: str, side: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """A photo variant's canvas (width, height) and where each face's square lies on it (left, top, right,
    bottom; for ``two_faces`` the face, then its partner). A turned face (``rotate_*``) is turned within its box."""
    full = (0, 0, side, side)
    if variant == "two_faces":
        return (2 * side, side), [full, (side, 0, 2 * side, side)]
    if variant == "as_is" or variant.startswith("rotate_"):
        return (side, side), [full]
    if variant.startswith("shift_"):
        d = round(int(variant.split("_")[1]) / 100 * side)
        return (side, side), [(d, d, side + d, side + d)]
    if variant.startswith("zoom_out_"):
        s = round(side * (1 - int(variant.split("_")[2]) / 100))
        lo = (side - s) // 2
        return (side, side), [(lo, lo, lo + s, lo + s)]
    if variant == "portrait":  # 3:4, the face smaller and up and to the right, as a snapshot frames it
        w, h, s = 3 * side // 4, side, 5 * side // 8
        x, y = w - s - side // 32, side // 10
        return (w, h), [(x, y, x + s, y + s)]
    raise ValueError(f"unknown photo variant {variant!r}; expected one of {PHOTO_VARIANTS}")


def _turn(variant: str) -> float:
    """The degrees a ``rotate_*`` variant turns its face counter-clockwise as shown (0 for the others)."""
    return float(variant.split("_")[1]) if variant.startswith("rotate_") else 0.0


def photo_variant(image: Image.Image, mask: Image.Image, variant: str, ignore_index: int,
                  partner: tuple[Image.Image, Image.Image] | None = None,
                  side: int = PHOTO_SIDE) -> tuple[Image.Image, np.ndarray]:
    """A test face (its full-resolution image and mask) framed as ``variant`` says, as a photo: (photo, truth
    (H, W) uint8 at the photo's size). ``two_faces`` puts ``partner`` (another face) on its right."""
    canvas, boxes = _variant_boxes(variant, side)
    if variant == "two_faces" and partner is None:
        raise ValueError("two_faces needs a partner face")
    turn = _turn(variant)
    if turn:
        image = image.rotate(turn, Image.BICUBIC, fillcolor=PAD_FILL)
        mask = mask.rotate(turn, Image.NEAREST, fillcolor=ignore_index)
    photo, truth = _on_canvas(image, mask, canvas, boxes[0], ignore_index)
    if variant == "two_faces":
        second, second_truth = _on_canvas(*partner, (side, side), (0, 0, side, side), ignore_index)
        photo.paste(second, boxes[1][:2])
        truth.paste(second_truth, boxes[1][:2])
    return photo, np.asarray(truth)


def true_placements(variant: str, crop: int, side: int = PHOTO_SIDE) -> list[Similarity]:
    """Where ``photo_variant`` put each face (crop -> photo, ``face_align.Similarity``, for a ``crop``-pixel
    aligned crop): the as-is photo's own framing carried along the variant's transform (for ``two_faces``, the
    face and then its partner). What a perfect finder would place, as far as the as-is framing is the training
    faces' own."""
    _, boxes = _variant_boxes(variant, side)
    angle = -math.radians(_turn(variant))  # PIL's counter-clockwise as shown is clockwise in y-down coordinates
    out = []
    turned = complex(math.cos(angle), math.sin(angle))
    for left, top, right, bottom in boxes:
        centre = complex(left + right, top + bottom) / 2             # a turned face turns about its box's centre
        t = complex(left, top) * turned + centre - centre * turned   # where the crop's corner (0, 0) lands
        out.append(Similarity((right - left) / crop, angle, t.real, t.imag))
    return out


def split_photo(split: LabeledFolder, i: int, variant: str, ignore_index: int) -> tuple[Image.Image, np.ndarray]:
    """``photo_variant`` of the split's face ``i`` from its full-resolution files; ``two_faces`` pairs it with
    the next face (the first after the last)."""
    pair = split.pairs[i]
    partner = None
    if variant == "two_faces":
        other = split.pairs[(i + 1) % len(split.pairs)]
        partner = (open_rgb(other.image_path), Image.fromarray(other.read_mask()))
    return photo_variant(open_rgb(pair.image_path), Image.fromarray(pair.read_mask()), variant, ignore_index,
                         partner)


def write_photo_variants(split: LabeledFolder, out: str | Path, variants: Sequence[str], ignore_index: int,
                         limit: int | None = None) -> int:
    """The photo variants of the split's first ``limit`` faces as files: out/images/<face>_<variant>.png
    and out/masks/<face>_<variant>.png (the truth, ignore_index where no one labeled)."""
    from diffuseseg.io import atomic_save_image
    out = Path(out)
    n = len(split.pairs) if limit is None else min(limit, len(split.pairs))
    for i, name in enumerate(split.names[:n]):
        for variant in variants:
            photo, truth = split_photo(split, i, variant, ignore_index)
            atomic_save_image(photo, out / "images" / f"{name}_{variant}.png")
            atomic_save_image(Image.fromarray(truth), out / "masks" / f"{name}_{variant}.png")
    return n * len(variants)


@dataclass
class PhotoVariantResult:
    miou: float
    per_class_iou: dict[str, float]
    per_image_miou: list[float]
    faces_found: list[int]
    # mIoU minus the baseline segmenter's on the same photos, and its 95 % paired bootstrap interval
    # (metrics.paired_miou_difference); None for the baseline itself and without one
    vs_baseline: list[float] | None = None
    # per photo: faces cut out along their own transform (not kept in the plain framing), and of those, the ones
    # whose transform was fit without every landmark of canonical.fit (an eye or the mouth not found); None for
    # a segmenter that does not align
    aligned: list[int] | None = None
    fit_incomplete: list[int] | None = None


def run_photo_robustness(segmenters: dict, split: LabeledFolder, ignore_index: int, *,
                         variants: Sequence[str] = PHOTO_VARIANTS, limit: int | None = None, chunk: int = 16,
                         progress: bool = True, picture: str | Path | None = None, picture_faces: int = 3,
                         carry: str | None = None, baseline: str | None = None, placed: str | None = None
                         ) -> dict[str, dict[str, PhotoVariantResult]]:
    """mIoU of each ``segmenters`` entry (name -> ``photo_faces.FaceSegmenter``) on every photo variant of the
    split's faces (the first ``limit``), scored at the photo's size. With ``picture``: per variant, a few
    photos with each segmenter's mask beside their truth. ``carry``: a segmenter whose masks of the as-is
    photos are also scored carried along each variant's own transform (``CARRIED``): what perfect alignment
    would score, so that a row's loss to the metric (parts cut by the frame, faces scored at a fifth of the
    size) is told apart from the loss to finding and aligning. ``baseline``: a segmenter every other one is
    compared with, photo by photo (``PhotoVariantResult.vs_baseline``): whether a row's difference stands out
    of what the choice of faces alone would give. ``placed``: a segmenter whose read-out is also scored on crops
    placed where the truth says each face is (``true_placements``; ``PLACED``): between it and ``carry`` lies
    what the read-out loses to seeing only what the photo shows, between it and the segmenter itself what
    finding and aligning lose."""
    from tqdm import tqdm
    classes = split.classes
    colours = mask_palette(classes, ignore_index)
    n = len(split.pairs) if limit is None else min(limit, len(split.pairs))
    if baseline is not None and baseline not in segmenters:
        raise ValueError(f"baseline={baseline!r} is not one of the segmenters {list(segmenters)}")
    if placed is not None and placed not in segmenters:
        raise ValueError(f"placed={placed!r} is not one of the segmenters {list(segmenters)}")
    if carry is not None:
        if carry not in segmenters or "as_is" not in variants:
            raise ValueError(f"carry={carry!r} needs that segmenter and the as_is variant")
        variants = ["as_is", *(v for v in variants if v != "as_is")]  # its masks are what the others carry
    results: dict[str, dict[str, PhotoVariantResult]] = {name: {} for name in segmenters}
    as_is_masks: dict[int, np.ndarray] = {}  # face -> carry's mask of its as-is photo
    rows = []
    for variant in variants:
        preds = {name: [] for name in segmenters}
        found = {name: [] for name in segmenters}
        cut = {name: [] for name in segmenters}
        truths, by_truth = [], []
        shown = {name: [] for name in segmenters}
        photos_shown = []
        for lo in tqdm(range(0, n, chunk), desc=variant, unit="chunk", disable=not progress):
            photos = []
            for i in range(lo, min(lo + chunk, n)):
                photo, truth = split_photo(split, i, variant, ignore_index)
                photos.append(photo)
                truths.append(truth)
            for name, segmenter in segmenters.items():
                out = segmenter.segment(photos)
                preds[name] += [_scored_mask(r.mask, ignore_index, segmenter.background) for r in out]
                found[name] += [len(r.faces) for r in out]
                if getattr(segmenter, "align_faces", False):
                    cut[name] += [_cut_faces(r.faces, segmenter) for r in out]
            if placed is not None:
                segmenter = segmenters[placed]
                out = segmenter.segment(photos, [_placed_faces(p, variant, segmenter) for p in photos])
                by_truth += [_scored_mask(r.mask, ignore_index, segmenter.background) for r in out]
            if lo == 0:
                photos_shown = [np.asarray(p) for p in photos[:picture_faces]]
                for name in segmenters:
                    shown[name] = preds[name][:picture_faces]

        def confusions(masks: list[np.ndarray]) -> np.ndarray:  # per photo, against this variant's truths
            return image_confusions(masks, truths, len(classes.names), ignore_index)
        confs = {name: confusions(preds[name]) for name in segmenters}
        for name in segmenters:
            results[name][variant] = _variant_result(confs[name], classes.names, ignore_index, found[name])
            if cut[name]:
                results[name][variant].aligned, results[name][variant].fit_incomplete = map(list, zip(*cut[name]))
            if baseline is not None and name != baseline:
                difference = paired_miou_difference(confs[name], confs[baseline], ignore_index)
                results[name][variant].vs_baseline = [round(v, 6) for v in difference]
        if placed is not None:
            results.setdefault(PLACED, {})[variant] = _variant_result(
                confusions(by_truth), classes.names, ignore_index, results[placed][variant].faces_found)
        if carry is not None:
            if variant == "as_is":
                as_is_masks.update(enumerate(preds[carry]))
            carried = [_carried_mask(split, as_is_masks, segmenters[carry], i, variant, ignore_index)
                       for i in range(n)]
            results.setdefault(CARRIED, {})[variant] = _variant_result(
                confusions(carried), classes.names, ignore_index, results[carry]["as_is"].faces_found)
        if picture is not None:
            for k, photo in enumerate(photos_shown):
                tiles = [photo, colours[truths[k]]] + [colours[shown[name][k]] for name in segmenters]
                rows.append(_letterbox(tiles))
    if picture is not None and rows:
        save_grid(np.stack(rows).reshape(-1, *rows[0].shape[1:]), picture, nrow=rows[0].shape[0], scale=1)
    return results


# The column of a segmenter's as-is masks carried along each variant's transform (run_photo_robustness's carry)
CARRIED = "as-is masks carried"
# The column of a segmenter's read-out of crops placed where the truth says each face is (its placed)
PLACED = "placed by the truth"


def _placed_faces(photo: Image.Image, variant: str, segmenter) -> list:
    """The faces of a variant's photo where ``photo_variant`` put them; the as-is photo keeps its plain framing
    (as the snap rule keeps an aligned face's), every other face cut out along its placement."""
    if variant == "as_is":
        return [AlignedFace.plain(photo, framing(photo.size, segmenter.side, segmenter.crop))]
    return [AlignedFace.cut(photo, w, segmenter.side) for w in true_placements(variant, segmenter.side)]


def _carried_mask(split: LabeledFolder, as_is_masks: dict[int, np.ndarray], segmenter, i: int, variant: str,
                  ignore_index: int) -> np.ndarray:
    """Face ``i``'s as-is mask framed as ``variant`` frames its photo (``photo_variant`` on the mask, nearest);
    a two-faces partner outside the measured faces is segmented as is here."""
    partner = None
    if variant == "two_faces":
        j = (i + 1) % len(split.pairs)
        if j not in as_is_masks:
            result = segmenter.segment([split_photo(split, j, "as_is", ignore_index)[0]])[0]
            as_is_masks[j] = _scored_mask(result.mask, ignore_index, segmenter.background)
        partner = (Image.new("RGB", (1, 1)), Image.fromarray(as_is_masks[j]))
    _, mask = photo_variant(Image.new("RGB", (1, 1)), Image.fromarray(as_is_masks[i]), variant, ignore_index,
                            partner)
    return _scored_mask(mask, ignore_index, segmenter.background)


def _cut_faces(faces: Sequence[AlignedFace], segmenter) -> tuple[int, int]:
    """(faces cut out along their own transform, those of them fit without every landmark of canonical.fit)."""
    cut = [f for f in faces if not f.snapped]
    fit = segmenter.canonical.fit_mask
    return len(cut), sum(bool(np.isnan(f.landmarks[fit]).any()) for f in cut)


def _scored_mask(mask: np.ndarray, ignore_index: int, background: int) -> np.ndarray:
    """A predicted mask as scored: a pixel the model never saw (segment.crop=center's cut-off ends) is background."""
    return np.where(mask == ignore_index, background, mask).astype(np.uint8)


def _variant_result(confs: np.ndarray, class_names: Sequence[str], ignore_index: int,
                    found: list[int]) -> PhotoVariantResult:
    report = report_of_confusions(confs, class_names, ignore_index)
    return PhotoVariantResult(report.miou, report.per_class_iou,
                              [round(float(v), 6) for v in report.per_image_miou], found)


def _letterbox(tiles: Sequence[np.ndarray], side: int = 2 * PHOTO_SIDE) -> np.ndarray:
    """Pictures of any size, each scaled to fit a ``side`` x ``side / 2``... square tile on grey: (K, T, T, 3)."""
    t = side // 2
    out = np.full((len(tiles), t, t, 3), PAD_FILL, np.uint8)
    for k, tile in enumerate(tiles):
        img = Image.fromarray(tile)
        scale = t / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.NEAREST)
        out[k, :img.size[1], :img.size[0]] = np.asarray(img)
    return out


def photo_table(results: dict[str, dict[str, PhotoVariantResult]], faces: int, baseline: str = "baseline") -> str:
    """Markdown: one row per photo variant, one mIoU column per segmenter (and faces found per photo; none for
    the carried as-is masks and the crops placed by the truth, which found nothing), and each segmenter's
    difference to the baseline with its 95 % paired bootstrap interval where there is one."""
    names = list(results)
    variants = list(next(iter(results.values())))
    compared = [n for n in names if any(r.vs_baseline is not None for r in results[n].values())]
    head = [f"{n}: mIoU | {n}: faces/photo" for n in names] + [f"{n} − {baseline} [95 %]" for n in compared]
    lines = [f"| photo ({faces} faces) | " + " | ".join(head) + " |",
             "|---|" + "---|---|" * len(names) + "---|" * len(compared)]
    for v in variants:
        found = {n: "—" if n in (CARRIED, PLACED) else f"{np.mean(results[n][v].faces_found):.2f}" for n in names}
        cells = [f"{results[n][v].miou:.3f} | {found[n]}" for n in names]
        for n in compared:
            d = results[n][v].vs_baseline
            cells.append("—" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aligned_photo_losses(results: dict[str, dict[str, PhotoVariantResult]], baseline: str,
                         variant: str = "as_is") -> str:
    """Markdown: where each aligning segmenter's difference to ``baseline`` on ``variant`` lies, photo by photo:
    the photos whose face was cut out along its own transform rather than kept as framed (the only ones that
    can differ on an as-is photo, with those where no face was found), split by whether its transform was fit to
    every landmark of the framing's fit; per group the photos, their mean per-photo mIoU difference and its sum.
    '' without those columns."""
    if baseline not in results or variant not in results[baseline]:
        return ""
    base = np.asarray(results[baseline][variant].per_image_miou)
    lines = []
    for name, rows in results.items():
        r = rows.get(variant)
        if r is None or r.aligned is None:
            continue
        diff = np.asarray(r.per_image_miou) - base
        aligned, incomplete = np.asarray(r.aligned) > 0, np.asarray(r.fit_incomplete) > 0
        none = np.asarray(r.faces_found) == 0
        groups = {"fit to every landmark": aligned & ~incomplete, "an eye or the mouth not found": incomplete,
                  "kept as framed": ~aligned & ~none, "no face found": none}
        cells = [f"{label}: {m.sum()} photos, {diff[m].mean() if m.any() else 0:+.3f} each, "
                 f"{diff[m].sum():+.2f} in all" for label, m in groups.items()]
        lines.append(f"- {name} − {baseline}, {variant}, per-photo mIoU: " + "; ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# where the photo path puts each face, against where its truth mask says it is

def landmark_errors(split: LabeledFolder, finder, finder_classes: Sequence[str], refiners: dict, canonical, side: int,
                    ignore_index: int, *, variants: Sequence[str] = PHOTO_VARIANTS, limit: int | None = None,
                    refine: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """Per refiner (name -> ``(parser, class names)``, or None for the finder itself) and one-face photo variant:
    (faces, 4) errors of each face's final transform against the one fit to its truth mask's landmarks, as
    ``Canonical.pose`` of the difference (log scale, angle, centre moved across and down as a share of the side;
    NaN where no face was found). No read-out runs, so this takes seconds: it tells how precisely a finder and a
    refiner place the crop, apart from what the read-out makes of it. A part the frame cuts (shifted 25 %: the
    mouth) moves its truth landmark too."""
    if "two_faces" in variants:
        raise ValueError("landmark errors need one face per photo: leave out two_faces")
    n = len(split.pairs) if limit is None else min(limit, len(split.pairs))
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in refiners}
    middle = canonical.at(side).mean(0, keepdims=True)  # the landmarks' centre in the aligned crop
    for variant in variants:
        photos, truths = zip(*(split_photo(split, i, variant, ignore_index) for i in range(n)))
        truth = [fit_to_canonical(landmarks_from_mask(np.where(t == ignore_index, 0, t), split.classes.names),
                                  canonical, side) for t in truths]
        for name, refiner in refiners.items():
            found = align_faces(list(photos), finder, finder_classes, canonical, side, refine=refine, refiner=refiner)
            errors = np.full((n, 4), np.nan)
            for k, (faces, where) in enumerate(zip(found, truth)):
                centre = where.apply(middle)[0]
                near = min(faces, default=None, key=lambda f: np.linalg.norm(f.where.apply(middle)[0] - centre))
                if near is not None:
                    errors[k] = canonical.pose(near.where.then(where.inverse()), side)
            out[name][variant] = errors
    return out


def landmark_table(errors: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown: per variant and refiner, the median and 90th percentile of each error's size."""
    lines = ["| photo | refiner | scale, % (median / 90th) | tilt, degrees | centre, % of the side | not found |",
             "|---|---|---|---|---|---|"]
    for variant in next(iter(errors.values())):
        for name, rows in errors.items():
            e = rows[variant]
            seen = e[~np.isnan(e).any(1)]
            scale = np.abs(np.expm1(seen[:, 0])) * 100
            tilt = np.degrees(np.abs(seen[:, 1]))
            centre = np.hypot(seen[:, 2], seen[:, 3]) * 100
            cells = [f"{np.median(v):.2f} / {np.percentile(v, 90):.2f}" if len(v) else "—"
                     for v in (scale, tilt, centre)]
            lines.append(f"| {variant} | {name} | " + " | ".join(cells) + f" | {len(e) - len(seen)} |")
    return "\n".join(lines)
