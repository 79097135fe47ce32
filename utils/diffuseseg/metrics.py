"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy, per-image mIoU.

Conventions (those of Baranchuk et al.'s ``compute_iou``, so numbers are comparable with the paper):
* IoU of class c = I / (1e-8 + U), pooled over the whole test set: a class absent from both the
  predictions and the targets gets IoU 0 and still counts in the mean over the class list.
* Pixels whose *target* is ``ignore_index`` are dropped before counting. (The official code instead
  leaves the ignore label out of the class list; with an ignore value outside 0..C-1, as here, a
  prediction on an ignored pixel would enlarge that class's union there. Dropping the pixel is the
  usual convention and what a "don't care" label means.)
* When ``ignore_index`` is a real class id (0..C-1), that class is left out of every mean IoU, as the
  official ``compute_iou`` skips it (its pixels are dropped as above, so its IoU would be a
  meaningless 0). Its per-class IoU is still reported, marked as excluded.
* Per-image mIoU averages only over the classes present in that image's target or prediction,
  otherwise every image would be penalised for the classes it simply does not show.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from diffuseseg.errors import UserError

ArrayLike = np.ndarray | Tensor

METRICS_FILE = "metrics.json"  # what segment.py and train_segmenter.py write into their output folder


def _as_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = target class, columns = predicted class, over pixels of any shape.

    Pixels whose target equals ``ignore_index`` are left out; any other value outside 0..C-1 raises.
    """
    pred, target = _as_numpy(pred).reshape(-1), _as_numpy(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in size: {pred.size} != {target.size} pixels")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    pred, target = pred.astype(np.int64, copy=False), target.astype(np.int64, copy=False)
    for name, values in (("target", target), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = np.unique(values[(values < 0) | (values >= num_classes)])[:8].tolist()
            raise ValueError(f"{name} has labels {bad} outside 0..{num_classes - 1}"
                             + (f" (ignore_index is {ignore_index})" if name == "target" else ""))
    # One bincount over the flattened (target, pred) pair index: O(pixels), no Python loop.
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """Intersection / (1e-8 + union) per class; 0 for a class absent from target and prediction. A stack of
    matrices (..., C, C) gives one row per matrix (..., C)."""
    conf = np.asarray(conf, dtype=np.float64)
    intersection = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-2) + conf.sum(-1) - intersection
    return intersection / (1e-8 + union)


def _counted(num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Which classes enter the mean: all but ``ignore_index`` when that is a class id (official)."""
    counted = np.ones(num_classes, dtype=bool)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        counted[ignore_index] = False
    return counted


def mean_iou(conf: np.ndarray, ignore_index: int | None = None) -> float:
    """Mean IoU over the whole class list (the dataset-level mIoU when ``conf`` is pooled), leaving out
    class ``ignore_index`` when it is one of the class ids (0..C-1), as the official code does."""
    conf = np.asarray(conf)
    return float(iou_per_class(conf)[_counted(len(conf), ignore_index)].mean())


def pixel_accuracy(conf: np.ndarray) -> float:
    """Fraction of counted pixels predicted correctly (NaN when no pixel is counted)."""
    conf = np.asarray(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else math.nan


def _present_miou(conf: np.ndarray, ignore_index: int | None = None) -> float:
    """mIoU over the classes that occur in this confusion matrix's target or prediction (less a class
    ``ignore_index``, as in ``mean_iou``)."""
    present = ((conf.sum(0) + conf.sum(1)) > 0) & _counted(len(conf), ignore_index)
    return float(iou_per_class(conf)[present].mean()) if present.any() else math.nan


def per_image_miou(preds: Sequence[ArrayLike], targets: Sequence[ArrayLike], num_classes: int,
                   ignore_index: int | None = 255) -> np.ndarray:
    """One mIoU per image, over the classes present in that image (NaN for an all-ignored image)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    return np.array([_present_miou(confusion_matrix(p, t, num_classes, ignore_index), ignore_index)
                     for p, t in zip(preds, targets)], dtype=np.float64)


def paired_miou_difference(confs_a: ArrayLike, confs_b: ArrayLike, ignore_index: int | None = None,
                           draws: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Dataset-level mIoU of predictions a minus b on the same images, from their per-image confusion matrices
    (N, C, C) each, and a paired bootstrap interval at ``level``: the images drawn with replacement ``draws``
    times, both pooled over the same draw, so that what the images themselves vary cancels. (difference,
    low, high)."""
    confs_a, confs_b = np.asarray(confs_a, np.float64), np.asarray(confs_b, np.float64)
    if confs_a.shape != confs_b.shape or confs_a.ndim != 3 or confs_a.shape[1] != confs_a.shape[2]:
        raise ValueError(f"expected two (N, C, C) stacks of the same shape, got {confs_a.shape} and {confs_b.shape}")
    n, c, _ = confs_a.shape
    counted = _counted(c, ignore_index)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)

    def mious(pooled: np.ndarray) -> np.ndarray:  # (D, C, C) -> (D,)
        return iou_per_class(pooled)[:, counted].mean(1)
    diffs = (mious((weights @ confs_a.reshape(n, -1)).reshape(draws, c, c))
             - mious((weights @ confs_b.reshape(n, -1)).reshape(draws, c, c)))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return mean_iou(confs_a.sum(0), ignore_index) - mean_iou(confs_b.sum(0), ignore_index), float(low), float(high)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their mean rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def rank_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation of two equally long series (pairs with a NaN left out; NaN when fewer
    than 2 remain or either series is constant)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{a.size} values against {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        return math.nan
    ra, rb = _average_ranks(a) - (a.size + 1) / 2, _average_ranks(b) - (a.size + 1) / 2
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x  # NaN is not valid JSON


def _from_json_number(x: float | None) -> float:
    return math.nan if x is None else x


@dataclass
class SegmentationReport:
    """What ``evaluate`` measured; ``confusion`` rows = target, columns = prediction; ``excluded``: classes
    listed in ``per_class_iou`` but left out of the mIoUs (a class id used as ignore_index)."""
    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float]
    per_image_miou: list[float]
    confusion: list[list[int]]
    excluded: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["pixel_accuracy"] = _json_number(d["pixel_accuracy"])
        d["per_image_miou"] = [_json_number(x) for x in d["per_image_miou"]]
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SegmentationReport:
        """The inverse of ``to_json`` (null back to NaN)."""
        d = json.loads(text)
        return cls(miou=d["miou"], pixel_accuracy=_from_json_number(d["pixel_accuracy"]),
                   per_class_iou=d["per_class_iou"], per_image_miou=[_from_json_number(x) for x in d["per_image_miou"]],
                   confusion=d["confusion"], excluded=d.get("excluded", []))  # older files have no "excluded"

    def table(self) -> str:
        """Per-class IoU with each class's target / predicted pixel counts, then the summary lines."""
        conf = np.asarray(self.confusion, dtype=np.int64)
        gt_px, pred_px = conf.sum(1), conf.sum(0)
        width = max([len("class")] + [len(n) for n in self.per_class_iou])
        lines = [f"{'class':<{width}}  {'IoU %':>7}  {'target px':>10}  {'pred px':>10}"]
        for i, (name, iou) in enumerate(self.per_class_iou.items()):
            # Absent classes count as 0 in the mean (official convention): say so, or the mean looks wrong.
            note = "  (absent: counts as 0)" if gt_px[i] == 0 and pred_px[i] == 0 else ""
            if name in self.excluded:
                note = "  (ignore_index: not in the mIoU)"
            lines.append(f"{name:<{width}}  {100 * iou:7.2f}  {gt_px[i]:>10d}  {pred_px[i]:>10d}{note}")
        images = np.array(self.per_image_miou, dtype=np.float64)
        lines += [f"{'mIoU':<{width}}  {100 * self.miou:7.2f}",
                  f"{'pixel acc':<{width}}  {100 * self.pixel_accuracy:7.2f}"]
        if images.size and not np.isnan(images).all():
            lines.append(f"{'image mIoU':<{width}}  {100 * np.nanmean(images):7.2f}"
                         f"  (mean over {int((~np.isnan(images)).sum())} images, present classes only)")
        return "\n".join(lines)


def image_confusions(preds: Sequence[ArrayLike], targets: Sequence[ArrayLike], num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """Per-image confusion matrices (N, C, C) of label maps per image (``confusion_matrix`` of each)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    out = np.zeros((len(preds), num_classes, num_classes), dtype=np.int64)
    for i, (p, t) in enumerate(zip(preds, targets)):
        if tuple(np.shape(p)) != tuple(np.shape(t)):
            raise ValueError(f"image {i}: prediction shape {tuple(np.shape(p))} != target shape {tuple(np.shape(t))}")
        out[i] = confusion_matrix(p, t, num_classes, ignore_index)
    return out


def report_of_confusions(confs: np.ndarray, class_names: Sequence[str],
                         ignore_index: int | None = 255) -> SegmentationReport:
    """``evaluate``'s report from per-image confusion matrices (N, C, C) (``image_confusions``), for callers
    that also need the matrices themselves (``paired_miou_difference``)."""
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names repeat: {list(class_names)}")
    pooled = np.asarray(confs, dtype=np.int64).reshape(-1, len(class_names), len(class_names)).sum(0)
    ious = iou_per_class(pooled)
    counted = _counted(len(class_names), ignore_index)
    return SegmentationReport(
        miou=mean_iou(pooled, ignore_index), pixel_accuracy=pixel_accuracy(pooled),
        per_class_iou={str(name): float(v) for name, v in zip(class_names, ious)},
        per_image_miou=[_present_miou(conf, ignore_index) for conf in confs], confusion=pooled.tolist(),
        excluded=[str(name) for name, c in zip(class_names, counted) if not c])


def evaluate(preds: Sequence[ArrayLike], targets: Sequence[ArrayLike], class_names: Sequence[str],
             ignore_index: int | None = 255) -> SegmentationReport:
    """Dataset-level metrics (pooled confusion matrix) plus per-image mIoU, for label maps per image.
    An ``ignore_index`` that is a class id leaves that class out of the mIoUs (see the module notes)."""
    return report_of_confusions(image_confusions(preds, targets, len(class_names), ignore_index), class_names,
                                ignore_index)


def load_report(path: str | Path) -> SegmentationReport:
    """A report written by ``SegmentationReport.to_json``: a metrics file or the run folder holding
    ``METRICS_FILE``."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        return SegmentationReport.from_json(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such metrics file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a metrics.json written by this project ({err})") from None


def compare_reports(groups: dict[str, Sequence[SegmentationReport]]) -> str:
    """Markdown table of per-class IoU, mIoU and pixel accuracy, one column per group of runs (e.g. the
    seeds of one training set), each cell the mean ± std over the group's runs (population std)."""
    names = None
    for label, reports in groups.items():
        if not reports:
            raise ValueError(f"group {label!r} has no runs")
        for r in reports:
            if names is None:
                names = list(r.per_class_iou)
            elif list(r.per_class_iou) != names:
                raise ValueError(f"group {label!r}: class list {list(r.per_class_iou)} != {names}")

    def row(title: str, value_of, bold: str = "") -> str:
        cells = [[value_of(r) for r in reports] for reports in groups.values()]
        return f"| {title} | " + " | ".join(f"{bold}{np.mean(v):.3f} ± {np.std(v):.3f}{bold}" for v in cells) + " |"

    head = "| class | " + " | ".join(f"{label} ({len(r)} run{'s' * (len(r) != 1)})"
                                    for label, r in groups.items()) + " |"
    rows = [head, "|---|" + "---|" * len(groups)]
    rows += [row(name, lambda r, name=name: r.per_class_iou[name]) for name in names]
    rows += [row("**mIoU**", lambda r: r.miou, bold="**"), row("pixel accuracy", lambda r: r.pixel_accuracy)]
    return "\n".join(rows)
