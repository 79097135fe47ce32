"""The baseline study: DDPM features against a random U-Net and raw RGB+xy pixels, same code path,
several labeled-set sizes, several random label draws, one fixed evaluation split; and plain
supervision: the compact U-Net of ``train_segmenter.py`` trained on exactly the same labeled draw;
the two fused: the DDPM read-out's and the U-Net's class probabilities averaged per pixel (two
views of the same few labels: frozen generative features and a network trained end to end on pixels);
and the student: that U-Net trained on the draw plus unlabeled images labeled by a teacher (the DDPM
read-out, or fused; section student, ``self_training.py``).

Tuning (timesteps, blocks, ensemble recipe) runs this on the validation split; the test split is
for reporting only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from diffuseseg.config import Config, config_to_dict, diff_sections
from diffuseseg.datasets import labeled_split, unlabeled_images
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_write_text
from diffuseseg.metrics import evaluate
from diffuseseg.conv_head import FeatureRows
from diffuseseg.feature_store import spilled_view_features
from diffuseseg.runtime import PrivateMemoryPeak, peak_rss_mb
from diffuseseg.views import ViewSet
from diffuseseg.visualize import line_chart
from diffuseseg.segmentation import (FEATURE_KINDS, build_extractor, classify_scores, configured_views, fit_readout,
                                    member_scores, probabilities_of, streamed_probabilities, upsampled_masks)
from diffuseseg.segmenter import predict_masks, predict_probabilities, train_from_config
from diffuseseg.selection import image_descriptors, select_images
from diffuseseg.self_training import UNLABELED_KEYS, fuse, pseudo_masks, teacher_kinds, train_student

KIND_LABELS = {"raw_rgb_xy": "raw RGB + (x, y)", "random_unet": "random-init U-Net features",
               "ddpm": "trained DDPM features", "supervised": "plain supervision: compact U-Net on the images",
               "fused": "DDPM read-out + plain supervision, probabilities averaged",
               "student": "student: compact U-Net on the labels + unlabeled images labeled by the teacher"}
# the same rows in a chart's legend (about 20 characters fit)
LEGEND_LABELS = {"raw_rgb_xy": "raw RGB + (x, y)", "random_unet": "random-init U-Net", "ddpm": "DDPM read-out",
                 "supervised": "supervision", "fused": "read-out + sup.", "student": "student"}
STUDY_KINDS = (*FEATURE_KINDS, "supervised", "fused", "student")
FUSED_FROM = ("ddpm", "supervised")
DERIVED = ("fused", "student")  # kinds built from other kinds' predictions on the same draw: run last


@dataclass
class StudyResult:
    split: str
    num_eval_images: int
    labeled_sizes: list[int]
    draws: int
    readout: str = "pixel_mlp"
    selection: str = "random"  # how each labeled set was drawn from the pool (selection.py)
    miou: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # kind -> n -> one per draw
    per_class_iou: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # kind -> n -> mean over draws
    seconds: float = 0.0
    # the same predictions scored at a larger side (class probabilities upsampled): side -> kind -> n -> ...
    miou_at: dict[int, dict[str, dict[int, list[float]]]] = field(default_factory=dict)
    per_class_iou_at: dict[int, dict[str, dict[int, dict[str, float]]]] = field(default_factory=dict)
    costs: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # kind -> n -> what a cell cost

    def summary(self, kind: str, n: int) -> tuple[float, float]:
        values = self.miou[kind][n]
        return float(np.mean(values)), float(np.std(values))

    def _table(self, miou: dict[str, dict[int, list[float]]]) -> str:
        """One row per kind, one column per labeled size: mean ± std over the draws ("—" where not run)."""
        def cell(values: list[float] | None) -> str:
            if values is None:
                return "—"
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{np.mean(values):.3f}"
        head = "| method | " + " | ".join(f"{n} labeled" for n in self.labeled_sizes) + " |"
        rule = "|---|" + "---|" * len(self.labeled_sizes)
        rows = [f"| {kind_label(k)} | " + " | ".join(cell(row.get(n)) for n in self.labeled_sizes) + " |"
                for k, row in miou.items()]
        return "\n".join([head, rule, *rows])

    def markdown(self) -> str:
        return self._table(self.miou) + (
            f"\n\nmIoU ({f'mean ± std over {self.draws} label draws' if self.draws > 1 else 'one label draw'}, "
            f"drawn by `{self.selection}`) on "
            f"{self.num_eval_images} {self.split} images. "
            f"Feature rows: the configured read-out ({self.readout}) on those features; supervision: "
            f"`train_segmenter.py`'s network on the same labeled images.") + self._per_class_markdown(
            self.per_class_iou) + "".join(self._scored_at_markdown(side) for side in sorted(self.miou_at)) + (
            self._costs_markdown())

    def _scored_at_markdown(self, side: int) -> str:
        return (f"\n\nThe same predictions scored at {side} px (class probabilities upsampled bilinearly, masks "
                f"from the full-size files by the same resizing rule):\n\n" + self._table(self.miou_at[side])
                + self._per_class_markdown(self.per_class_iou_at[side], f" at {side} px"))

    def _costs_markdown(self) -> str:
        cells = [(k, n, c) for k, row in self.costs.items() for n, c in sorted(row.items())]
        if not cells:
            return ""
        lines = ["\n\nWhat each cell cost (one process; over the cell's fits and predictions: peak RSS, which counts "
                 "the pages of memory-mapped features read, and the peak of the process's private memory, which "
                 "does not; pool features: the fp16 feature maps of the images its draws use, in RAM or "
                 "memory-mapped on disk):\n",
                 "| method | labeled | s per fit | peak RSS (MB) | peak private (MB) | pool features (MB) | where | "
                 "feature pass (s) |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {n} | {c.get('fit_s', 0):.0f} | {c.get('peak_rss_mb') or 0:.0f} | "
                  f"{_mb(c.get('peak_private_mb'))} | {c.get('pool_features_mb', 0):.0f} | "
                  f"{'disk' if c.get('on_disk') else 'RAM'} | {c.get('features_s', 0):.0f} |" for k, n, c in cells]
        return "\n".join(lines)

    def _per_class_markdown(self, per_class_iou: dict[str, dict[int, dict[str, float]]], where: str = "") -> str:
        """Per-class IoU (mean over the draws) at the largest labeled size most kinds have."""
        sizes = [n for n in self.labeled_sizes if any(n in d for d in per_class_iou.values())]
        if not sizes:
            return ""
        n = max(sizes, key=lambda m: (sum(m in d for d in per_class_iou.values()), m))
        kinds = [k for k in self.miou if n in per_class_iou.get(k, {})]
        classes = list(per_class_iou[kinds[0]][n])
        lines = [f"\n\nPer-class IoU with {n} labeled images{where} (mean over the draws):\n",
                 "| class | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {c} | " + " | ".join(f"{per_class_iou[k][n][c]:.3f}" for k in kinds) + " |" for c in classes]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, text: str) -> "StudyResult":
        d = json.loads(text)

        def by_size(table: dict) -> dict:  # kind -> "n" -> value, with int sizes
            return {k: {int(n): v for n, v in m.items()} for k, m in table.items()}
        return cls(d["split"], d["num_eval_images"], d["labeled_sizes"], d["draws"], d.get("readout", "pixel_mlp"),
                   d.get("selection", "random"), by_size(d["miou"]), by_size(d["per_class_iou"]),
                   d.get("seconds", 0.0), {int(side): by_size(t) for side, t in d.get("miou_at", {}).items()},
                   {int(side): by_size(t) for side, t in d.get("per_class_iou_at", {}).items()},
                   by_size(d.get("costs", {})))

    def to_json(self) -> str:
        def by_size(table: dict) -> dict:
            return {k: {str(n): v for n, v in m.items()} for k, m in table.items()}
        return json.dumps({"split": self.split, "num_eval_images": self.num_eval_images,
                           "labeled_sizes": self.labeled_sizes, "draws": self.draws, "seconds": self.seconds,
                           "readout": self.readout, "selection": self.selection,
                           "miou": by_size(self.miou), "per_class_iou": by_size(self.per_class_iou),
                           "miou_at": {str(side): by_size(t) for side, t in self.miou_at.items()},
                           "per_class_iou_at": {str(side): by_size(t) for side, t in self.per_class_iou_at.items()},
                           "costs": by_size(self.costs)}, indent=1)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"  # "—": measured before the column existed


def kind_label(kind: str, labels: dict[str, str] = KIND_LABELS) -> str:
    """A row's words: the kind's description in ``labels``, with what a merge named it by in brackets
    ("ddpm [pixel MLPs]")."""
    base, sep, tag = kind.partition(" [")
    return labels.get(base, base) + (f" [{tag}" if sep else "")


def merge_studies(studies: Sequence[tuple[str, StudyResult]]) -> StudyResult:
    """One table from studies run apart (other processes, machines, read-outs) on the same evaluation split:
    (tag, study) pairs; a non-empty tag names that study's rows ("ddpm [tag]"). Labeled sizes are the union
    (a row without a size shows "—"); rows of one name join when their sizes differ; seconds add up."""
    first = studies[0][1]
    for _, study in studies:
        if (study.split, study.num_eval_images) != (first.split, first.num_eval_images):
            raise ValueError(f"studies on different evaluation sets: {first.split} ({first.num_eval_images} images) "
                             f"and {study.split} ({study.num_eval_images} images)")
    sizes = sorted({n for _, study in studies for n in study.labeled_sizes})
    readouts = sorted({study.readout for _, study in studies})
    merged = StudyResult(first.split, first.num_eval_images, sizes, max(study.draws for _, study in studies),
                         " / ".join(readouts), first.selection, seconds=sum(study.seconds for _, study in studies))
    for tag, study in studies:
        for kind in study.miou:
            key = f"{kind} [{tag}]" if tag else kind
            row, per_class = merged.miou.setdefault(key, {}), merged.per_class_iou.setdefault(key, {})
            if set(row) & set(study.miou[kind]):
                raise ValueError(f"row {key!r} has {sorted(set(row) & set(study.miou[kind]))} labeled from two "
                                 "studies: name them apart (TAG=DIR)")
            row.update(study.miou[kind])  # the same row's other sizes, run apart (one process per size)
            per_class.update(study.per_class_iou.get(kind, {}))
            merged.costs.setdefault(key, {}).update(study.costs.get(kind, {}))
            for side in study.miou_at:
                merged.miou_at.setdefault(side, {}).setdefault(key, {}).update(study.miou_at[side].get(kind, {}))
                merged.per_class_iou_at.setdefault(side, {}).setdefault(key, {}).update(
                    study.per_class_iou_at[side].get(kind, {}))
    merged.miou = {k: dict(sorted(m.items())) for k, m in merged.miou.items()}
    return merged


def label_curve_chart(result: StudyResult, ceiling: int = 0, side: int = 0,
                      ceiling_row: str = "supervised") -> Image.Image:
    """mIoU against the number of labeled images on a log axis, one line per row (mean over its draws);
    ``ceiling``: ``ceiling_row`` at that many labels as a dashed line (a row of its own, e.g. a longer fit merged
    in as "supervised [12k steps]", is drawn only as that line); ``side``: the scores at that size."""
    table = result.miou_at[side] if side else result.miou
    series = {kind_label(kind, LEGEND_LABELS): [(n, float(np.mean(v))) for n, v in sorted(row.items())]
              for kind, row in table.items() if row and not (ceiling and kind == ceiling_row != "supervised")}
    levels = {}
    if ceiling:
        if ceiling not in table.get(ceiling_row, {}):
            raise UserError(f"--ceiling {ceiling}: the study has no {ceiling_row} row at {ceiling} labels")
        levels[f"ceiling ({ceiling})"] = float(np.mean(table[ceiling_row][ceiling]))
    where = f"{result.num_eval_images} {result.split} images" + (f", scored at {side} px" if side else "")
    return line_chart(series, title=f"mIoU against labeled images ({where})", xlabel="labeled images",
                      ylabel="mIoU", size=(560, 360), log_x=True, levels=levels)


def check_kinds(kinds: Sequence[str], teacher: str = "fused") -> None:
    """ValueError for an unknown kind, for 'fused' without both kinds it averages, or for 'student'
    without the kinds its teacher (``student.teacher``) is made of."""
    unknown = [k for k in kinds if k not in STUDY_KINDS]
    if unknown:
        raise ValueError(f"unknown study kind {unknown[0]!r}; expected one of {STUDY_KINDS}")
    if "fused" in kinds and not set(FUSED_FROM) <= set(kinds):
        raise ValueError(f"kind 'fused' averages {' and '.join(FUSED_FROM)}: list both in kinds")
    if "student" in kinds and not set(teacher_kinds(teacher)) <= set(kinds):
        raise ValueError(f"kind 'student' learns from the teacher {teacher!r} (student.teacher), made of "
                         f"{' and '.join(teacher_kinds(teacher))}: list them in kinds")


def run_study(cfg: Config, kinds: Sequence[str], labeled_sizes: Sequence[int], draws: int, split: str = "test",
              device: torch.device | str = "cpu", progress: bool = True, selection: str = "random",
              done: StudyResult | None = None, on_cell: Callable[[StudyResult], None] | None = None,
              score_size: int = 0, ram_limit_mb: float | None = None) -> StudyResult:
    """Every kind on the same labeled draws: ``draws`` sets per size, drawn from the labeled pool at
    random or by ``selection`` (e.g. ``kcenter`` on the DDPM's features, seeded per draw).

    Feature kinds extract the pool features of only the images some draw uses; above ``ram_limit_mb`` (None:
    ``features.ram_limit_mb``) they, and likewise the evaluation's features, are memory-mapped from disk (under
    ``features.store_dir``, removed after the kind), and fits and predictions read them batch by batch; the
    student's unlabeled faces are read out a chunk at a time, never stored (``streamed_probabilities``).
    ``score_size``: also score every prediction at that side, class probabilities upsampled bilinearly against
    masks read at that side from the files (the paper's 256 px protocol).
    ``done``: an interrupted run of the same study (``check_resumable``); its (kind, size) cells are kept,
    except those a derived kind still needs the predictions of. ``on_cell(result)`` is called after each
    (kind, size) cell, e.g. to save the partial study, so that a stopped run loses at most one cell."""
    check_kinds(kinds, cfg.student.teacher)
    start = time.perf_counter()
    pool = labeled_split(cfg, "labeled")
    evaluation = labeled_split(cfg, split)
    _, pool_images, pool_masks = pool.load()
    _, eval_images, eval_masks = evaluation.load()
    fine_masks = labeled_split(cfg, split, size=score_size).load()[2] if score_size else None
    if max(labeled_sizes) > len(pool):
        raise ValueError(f"labeled size {max(labeled_sizes)} exceeds the labeled pool ({len(pool)} images)")
    result = StudyResult(split, len(eval_images), sorted(labeled_sizes), draws, cfg.ensemble.readout, selection)
    descriptors = None
    if selection == "kcenter":
        descriptors = image_descriptors(build_extractor(cfg, "ddpm", device), pool_images,
                                        batch_size=cfg.features.batch_size, seed=cfg.run.seed)
    kinds = sorted(kinds, key=lambda k: DERIVED.index(k) + 1 if k in DERIVED else 0)  # the others first
    teacher = teacher_kinds(cfg.student.teacher) if "student" in kinds else ()
    # never a labeled-pool or evaluation face: the student sees the draw's labels and is scored on the split
    unlabeled = unlabeled_images(cfg, cfg.student.unlabeled, exclude=pool.names + evaluation.names) if teacher else None
    probabilities = {}  # (kind, n, draw) -> (N, S, S, C) on the evaluation images, kept for the fused kind
    teacher_probabilities = {}  # (kind, n, draw) -> (U, S, S, C) on the unlabeled images, kept for the student
    lab, bs, size = cfg.labels, cfg.features.batch_size, eval_images.shape[1]
    ram_limit_mb = cfg.features.ram_limit_mb if ram_limit_mb is None else ram_limit_mb
    fit_views = configured_views(cfg, pool.classes.names, "train")
    eval_views = configured_views(cfg, pool.classes.names, "test")
    kept = _cells_to_keep(done, kinds, labeled_sizes, teacher)
    if done:  # every cell of the earlier run stays in the result, the ones rerun below are replaced
        result.labeled_sizes = sorted(set(labeled_sizes) | set(done.labeled_sizes))
        result.miou = {k: dict(m) for k, m in done.miou.items()}
        result.per_class_iou = {k: dict(m) for k, m in done.per_class_iou.items()}
        result.costs = {k: dict(m) for k, m in done.costs.items()}
        result.miou_at = {side: {k: dict(m) for k, m in t.items()} for side, t in done.miou_at.items()}
        result.per_class_iou_at = {side: {k: dict(m) for k, m in t.items()}
                                   for side, t in done.per_class_iou_at.items()}
    tables = [result.miou, result.per_class_iou, result.costs]
    if score_size:
        tables += [result.miou_at.setdefault(score_size, {}), result.per_class_iou_at.setdefault(score_size, {})]
    for kind in kinds:  # every asked kind has its row from the start: a partial table shows what is to come
        for table in tables:
            table.setdefault(kind, {})
    for kind in kinds:
        todo = [n for n in labeled_sizes if (kind, n) not in kept]
        if not todo:
            continue
        chosen_sets = {(n, draw): select_images(selection, n, descriptors, len(pool), seed=[cfg.run.seed, n, draw])
                       for n in todo for draw in range(draws)}
        pool_store, eval_store, pool_mb, features_s = None, None, 0.0, 0.0
        teacher_readouts = {}  # (n, draw) -> the read-out that labels the unlabeled faces after this kind's fits
        if kind in FEATURE_KINDS:
            features_start = time.perf_counter()
            extractor = build_extractor(cfg, kind, device)
            used = np.unique(np.concatenate(list(chosen_sets.values())))  # only the images some draw labels
            row_of = np.full(len(pool), -1, dtype=np.int64)
            row_of[used] = np.arange(len(used))
            spill = dict(batch_size=bs, store_dir=cfg.features.store_dir, ram_limit_mb=ram_limit_mb,
                         progress=progress)
            pool_feats, pool_store = spilled_view_features(extractor, pool_images, fit_views, used,
                                                           what="study-pool", **spill)
            pool_mb = sum(f.nbytes for f in pool_feats) / 2 ** 20
            # the evaluation's maps too: 499 faces at 1008 channels in 2 views are 8 GB
            eval_feats, eval_store = spilled_view_features(extractor, eval_images, eval_views,
                                                           np.arange(len(eval_images)), what="study-eval", **spill)
            features_s = time.perf_counter() - features_start
        keep = "fused" in kinds and kind in FUSED_FROM  # its probabilities feed the fused row
        for n in todo:
            scores, per_class, fine_scores, fine_per_class, fit_seconds = [], [], [], [], []
            peak_rss_mb(reset=True)
            private = PrivateMemoryPeak().start()
            for draw in range(draws):
                chosen = chosen_sets[n, draw]
                probs = None  # (N, S, S, C) at the evaluation size, where the kind has them
                fit_start = time.perf_counter()
                if kind == "fused":
                    probs = fuse([probabilities.pop((k, n, draw)) for k in FUSED_FROM])
                    masks = probs.argmax(-1).to(torch.uint8).numpy()
                elif kind == "student":
                    taught = fuse([teacher_probabilities.pop((k, n, draw)) for k in teacher])
                    net = train_student(cfg, pool_images[chosen], pool_masks[chosen], unlabeled,
                                        pseudo_masks(taught, cfg.student.confidence, lab.ignore_index),
                                        pool.classes.names, seed=cfg.segmenter.seed + draw, device=device,
                                        progress=False)
                    fit_seconds.append(time.perf_counter() - fit_start)
                    if score_size:
                        probs = predict_probabilities(net, eval_images, batch_size=cfg.segmenter.batch_size)
                        masks = probs.argmax(-1).to(torch.uint8).numpy()
                    else:
                        masks = predict_masks(net, eval_images, batch_size=cfg.segmenter.batch_size)
                elif kind == "supervised":
                    seg_cfg = replace(cfg.segmenter, seed=cfg.segmenter.seed + draw)
                    net = train_from_config(pool_images[chosen], pool_masks[chosen], pool.classes.names, seg_cfg,
                                            ignore_index=lab.ignore_index, device=device, progress=False,
                                            compile_backend=cfg.run.compile_backend)
                    fit_seconds.append(time.perf_counter() - fit_start)
                    probs = predict_probabilities(net, eval_images, batch_size=cfg.segmenter.batch_size)
                    masks = probs.argmax(-1).to(torch.uint8).numpy()
                    if keep:
                        probabilities[kind, n, draw] = probs
                    if kind in teacher:  # stored in half precision: one per draw until the student runs
                        teacher_probabilities[kind, n, draw] = predict_probabilities(
                            net, unlabeled, batch_size=cfg.segmenter.batch_size).half()
                else:
                    ensemble, _ = fit_readout(cfg, [FeatureRows([f], row_of[chosen]) for f in pool_feats],
                                              pool_masks[chosen], fit_views, pool.classes, extractor.spec, device,
                                              progress=False, seed=cfg.ensemble.seed + draw)
                    fit_seconds.append(time.perf_counter() - fit_start)
                    # one read-out pass for both the vote and the probabilities
                    eval_scores = member_scores(ensemble, eval_feats, eval_views)
                    n_eval, eval_side = eval_feats[0].shape[:2]
                    masks = classify_scores(eval_scores, n_eval, eval_side, cfg.ensemble.vote, out_size=size).masks
                    if keep or score_size:
                        probs = probabilities_of(eval_scores, n_eval, eval_side, out_size=size)
                    del eval_scores
                    if keep:
                        probabilities[kind, n, draw] = probs
                    if kind in teacher:
                        teacher_readouts[n, draw] = ensemble
                report = evaluate(list(masks), list(eval_masks), pool.classes.names, lab.ignore_index)
                scores.append(report.miou)
                per_class.append(report.per_class_iou)
                if score_size:
                    fine = evaluate(list(upsampled_masks(probs, score_size)), list(fine_masks), pool.classes.names,
                                    lab.ignore_index)
                    fine_scores.append(fine.miou)
                    fine_per_class.append(fine.per_class_iou)
                if progress:
                    print(f"{kind:12s} n={n:3d} draw {draw}: mIoU {scores[-1]:.4f}"
                          + (f", at {score_size} px {fine_scores[-1]:.4f}" if score_size else ""))
            result.miou[kind][n] = scores
            result.per_class_iou[kind][n] = _mean_per_class(per_class)
            if score_size:
                result.miou_at[score_size][kind][n] = fine_scores
                result.per_class_iou_at[score_size][kind][n] = _mean_per_class(fine_per_class)
            result.costs[kind][n] = {"fit_s": float(np.mean(fit_seconds)) if fit_seconds else 0.0,
                                     "peak_rss_mb": peak_rss_mb(), "peak_private_mb": private.stop(),
                                     "pool_features_mb": pool_mb,
                                     "on_disk": pool_store is not None, "features_s": features_s}
            result.seconds = (done.seconds if done else 0.0) + time.perf_counter() - start
            if on_cell:
                on_cell(result)
        if teacher_readouts:  # thousands of unlabeled faces: their features are extracted once, a chunk at a time
            streamed = streamed_probabilities(extractor, unlabeled, eval_views, teacher_readouts,
                                              UNLABELED_KEYS + np.arange(len(unlabeled)), batch_size=bs,
                                              progress=progress)
            teacher_probabilities.update({(kind, n, draw): p for (n, draw), p in streamed.items()})
        pool_feats = eval_feats = None  # the memory maps close before their files go
        for store in (pool_store, eval_store):
            if store:
                store.cleanup()
    result.miou = {k: dict(sorted(m.items())) for k, m in result.miou.items()}  # kept cells came first
    result.seconds = (done.seconds if done else 0.0) + time.perf_counter() - start
    return result


def _mean_per_class(per_draw: Sequence[dict[str, float]]) -> dict[str, float]:
    return {c: float(np.mean([d[c] for d in per_draw])) for c in per_draw[0]}


def _cells_to_keep(done: StudyResult | None, kinds: Sequence[str], labeled_sizes: Sequence[int],
                   teacher: Sequence[str]) -> set[tuple[str, int]]:
    """The (kind, size) cells of ``done`` that need no rerun: all of them but a source kind's cell whose
    derived kind (fused, student) at that size is still to run, since it needs the source's predictions."""
    if done is None:
        return set()
    finished = {(k, n) for k in kinds for n in labeled_sizes if len(done.miou.get(k, {}).get(n, [])) == done.draws}
    needed_by = {"fused": FUSED_FROM, "student": tuple(teacher)}
    return {(k, n) for k, n in finished
            if not any(k in needed_by[d] and (d, n) not in finished for d in DERIVED if d in kinds)}


def check_resumable(done: StudyResult, cfg: Config, saved_cfg: Config, split: str, draws: int, selection: str,
                    where: str | Path, score_size: int = 0) -> None:
    """UserError unless ``done`` (with its config) is the same study as the one asked for: the same evaluation
    split, draws, selection, scoring sizes and config, up to the keys that change speed or memory, not results
    (run.threads, run.device, features.ram_limit_mb)."""
    asked = {"split": split, "draws": draws, "selection": selection, "score sizes": [score_size] if score_size else []}
    stored = {"split": done.split, "draws": done.draws, "selection": done.selection,
              "score sizes": sorted(done.miou_at)}
    differences = [f"{k}: {stored[k]!r} there, {asked[k]!r} now" for k in asked if asked[k] != stored[k]]
    a, b = config_to_dict(saved_cfg), config_to_dict(cfg)
    for d in (a, b):
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("threads", "device")}
        d["features"] = {k: v for k, v in d["features"].items() if k != "ram_limit_mb"}
    differences += diff_sections(a, b)
    if differences:
        raise UserError(f"{where}: cannot resume a different study (there != now): " + "; ".join(differences)
                        + ". Choose another --out, or delete it to start again")


def read_study(item: str) -> tuple[str, StudyResult]:
    """(tag, study) of ``[TAG=]DIR``: DIR/study.json as ``save_study`` wrote it."""
    tag, _, folder = ("", "", item) if Path(item).is_dir() or "=" not in item else item.partition("=")
    path = Path(folder) / "study.json"
    try:
        return tag, StudyResult.from_json(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no study here (evaluate_baselines.py writes study.json)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a study.json ({err})") from None


def save_study(result: StudyResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    atomic_write_text(out / "study.json", result.to_json())
    atomic_write_text(out / "study.md", result.markdown() + "\n")
    return out
