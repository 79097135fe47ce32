"""The training-efficiency study: DDPM recipes given the same wall-clock budget on the same machine,
compared by what the project needs from them.

A study is a named set of recipes (``STUDIES``): ``toy`` compares training recipes on the 32 px toy faces,
``celebahq64`` compares U-Net widths and training data for the real-face preset. Each recipe is a set of
config overrides on top of the study's base overrides and the user's config. Every recipe trains from scratch
for ``budget_min`` training minutes (``train.time_budget_min``, so a by-the-clock learning-rate schedule
spans the whole budget) and keeps its EMA weights every ``snapshot_min`` minutes. Each snapshot is scored by
  - segmentation: val mIoU of the configured read-out on its features, ``labeled`` labels, ``draws`` draws
    (study.run_study, the same code as evaluate_baselines.py);
  - samples: DDIM samples against as many real images (``reference_images``: fresh toy faces, or the first
    test images of a folder dataset; sample_quality.py): the Fréchet distance in a random
    CNN's features (lower is better) and a classifier two-sample test (0.5 = indistinguishable);
and each recipe's training throughput is reported as a share of the fp32 GEMM peak measured just before its
training (kept in ``gemm_peak.json``: the peak of one machine drifts by 20 % between runs).
``samples_last_snapshot.png`` shows the first samples of each recipe's last snapshot, one row per recipe.
A recipe's finished training is kept, and so are each snapshot's val mIoU and samples (beside the
snapshot), so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from diffuseseg.checkpoint import export_weights, load_unet, read_checkpoint
from diffuseseg.config import Config, config_to_dict, load_config, save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.errors import UserError
from diffuseseg.face_judge import FaceJudge
from diffuseseg.flops import matmul_peak_gflops, training_flops_per_image
from diffuseseg.io import atomic_save_image, atomic_write, atomic_write_text
from diffuseseg.sample_quality import random_feature_distance, two_sample_accuracy
from diffuseseg.sampling import generate_images
from diffuseseg.study import run_study
from diffuseseg.toy_faces import render_faces
from diffuseseg.training import LAST_CHECKPOINT, SNAPSHOT_GLOB, SNAPSHOTS, snapshot_minute, snapshot_name, train_ddpm
from diffuseseg.visualize import image_grid, line_chart, side_by_side


@dataclass(frozen=True)
class Study:
    base: list[str]  # overrides under every recipe, before the user's --set and the recipe's own
    recipes: dict[str, list[str]]  # name -> the recipe's overrides


# The preset's DDPM training images, and the same plus the CelebA aligned faces (another crop of CelebA photos,
# from which CelebA-HQ was made: for training only, never evaluation, and not yet checked against the test faces:
# shared/data/README.md).
_POOL_VAL_IMAGES = "../shared/data/celebamask_hq_ce/labeled/images[0:300]"
_CELEBA_10K = "../shared/data/celeba_aligned_10k"
_WITH_CELEBA_10K = f"data.extra_roots=['{_POOL_VAL_IMAGES}','{_CELEBA_10K}']"
_REFERENCE_13K = "checkpoints/celebahq_64_eps13k/ema_fp16.pt"  # the bundled DDPM when the celebahq64_4k study ran
# the preset's parameterisation and feature blocks until issue 42's long run ended (v-prediction, middle blocks)
_EPSILON = "diffusion.prediction_type=epsilon"
_DECODER = "features.blocks=[ups.0,ups.1,ups.2]"
_NARROW = ["model.down_channels=[16,32,48,64]", "model.mid_channels=[64,64,48]"]  # half the preset's widths
STUDIES: dict[str, Study] = {
    # The toy defaults when the study was run, pinned so that it reproduces after a winner became the default
    # (train.lr_schedule was cosine then). "today": those defaults; the others: one change each
    # (docs/training_recipes.md).
    "toy": Study(base=["train.lr_schedule=cosine"], recipes={
        "today": [],
        "min_snr": ["diffusion.loss_weighting=min_snr"],
        "v_prediction": ["diffusion.prediction_type=v_prediction"],
        "constant_lr": ["train.lr_schedule=constant"],
        "attention_8px": ["model.attention=[false,false,true]"],
        "lr_1e-3": ["train.lr=0.001"],
    }),
    # configs/celebamask_hq64.yaml as it is ("lean", 3.5 M parameters), half and 1.5 times its widths, its
    # training images plus CelebA's 10k, and the narrow U-Net (the cheapest, so the recipe study's base) with the
    # toy study's two runners-up: a 3.3x learning rate and v-prediction (docs/real_faces.md, *Width and data at
    # 64 px* and *Recipe at 64 px*).
    # The preset's training data when it ran (1557 faces: before celebamask_hq_extra), pinned so it reproduces.
    "celebahq64": Study(base=[f"data.extra_roots=['{_POOL_VAL_IMAGES}']", _EPSILON, _DECODER], recipes={
        "lean": [],
        "narrow": _NARROW,
        "wide": ["model.down_channels=[48,96,144,192]", "model.mid_channels=[192,192,144]"],
        "celeba_10k": [_WITH_CELEBA_10K],
        "narrow_celeba_10k": [*_NARROW, _WITH_CELEBA_10K],
        "narrow_lr_1e-3": [*_NARROW, "train.lr=0.001"],
        "narrow_v_prediction": [*_NARROW, "diffusion.prediction_type=v_prediction"],
    }),
    # Issue 42: the preset (lean U-Net, 4468 training faces) continued from the step-13 153 reference weights
    # (sha256 c205dd97..., tracked in checkpoints/celebahq_64_eps13k/) as it is and with one change
    # each (v-prediction, a 3.3x learning rate, Min-SNR-5 loss weights), and from scratch: run with
    # --budget-steps, so equal steps are equal minutes whatever else shares the CPU (docs/real_faces.md).
    "celebahq64_4k": Study(base=[f"train.init_weights={_REFERENCE_13K}", _EPSILON, _DECODER], recipes={
        "continue": [],
        "continue_v_prediction": ["diffusion.prediction_type=v_prediction"],
        "continue_lr_1e-3": ["train.lr=0.001"],
        "continue_min_snr": ["diffusion.loss_weighting=min_snr"],
        "scratch": ["train.init_weights="],
    }),
}
REAL_FACES_FIRST_INDEX = 3_000_000  # toy faces outside every split: fresh real images for the two-sample test


@dataclass
class SnapshotScore:
    minute: float
    step: int
    val_miou: list[float]  # one per label draw
    feature_distance: float
    two_sample_accuracy: float
    parser_distance: float | None = None  # the face judge's figures (face_judge.py), where sample.judge is set
    parts_in_place: float | None = None


@dataclass
class RecipeResult:
    name: str
    overrides: list[str]
    gflop_per_image: float
    images_per_s: float = 0.0
    peak_gflops: float = 0.0  # fp32 GEMM peak measured just before this recipe trained
    snapshots: list[SnapshotScore] = field(default_factory=list)

    def gflops(self) -> float:
        return self.gflop_per_image * self.images_per_s

    def peak_share(self) -> float:
        return self.gflops() / self.peak_gflops


def _samples_path(weights: Path, num_samples: int, sample_steps: int) -> Path:
    return weights.with_name(f"{weights.stem}.samples_{num_samples}_ddim{sample_steps}.npy")


def reference_images(cfg: Config, count: int) -> tuple[np.ndarray, str]:
    """The real images samples are compared with, uint8 NHWC, and what they are in words: ``count`` fresh toy
    faces outside every split, or the first ``count`` test images of a folder dataset (held out from DDPM
    training)."""
    if cfg.data.source == "toy_faces":
        first = REAL_FACES_FIRST_INDEX
        images = render_faces(range(first, first + count), cfg.model.im_size, seed=cfg.data.toy_seed)[0]
        return images, f"{count} fresh toy faces"
    test = labeled_split(cfg, "test")
    if len(test) < count:
        raise UserError(f"{count} samples: the test split ({test.root}) has only {len(test)} images to compare with")
    return test.load(range(count))[1], f"the first {count} test images of {test.root}"


def score_snapshot(cfg: Config, weights: Path, real: np.ndarray, *, labeled: int, draws: int, sample_steps: int,
                   device: torch.device | str, minute: float = 0.0, judge: FaceJudge | None = None) -> SnapshotScore:
    """One set of DDPM weights scored: val mIoU per draw, and its samples against the real images ``real`` (as
    many) by the random-feature distance, the two-sample accuracy and, with a face ``judge`` (``sample.judge``),
    its parser distance and parts-in-place rate. The val mIoU and the samples (the slow parts) are kept
    beside the weights and reused by a rerun."""
    num_samples = len(real)
    scores_path = weights.with_name(f"{weights.stem}.scores.json")
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    # Keyed by everything that decides the figure besides the weights: a changed read-out is rescored, a
    # changed output path (ensemble.path, features.store_dir) is not.
    sections = {s: config_to_dict(getattr(cfg, s)) for s in ("features", "ensemble", "conv_head", "labels")}
    sections["ensemble"].pop("path")
    sections["features"].pop("store_dir")
    decides = json.dumps([labeled, draws, *sections.values()], sort_keys=True)
    key = f"val_miou_{hashlib.sha256(decides.encode()).hexdigest()[:16]}"
    if key not in scores:
        eval_cfg = replace(cfg, run=replace(cfg.run, checkpoint=str(weights)))
        scores[key] = run_study(eval_cfg, ["ddpm"], [labeled], draws, "val", device, progress=False).miou["ddpm"][labeled]
        atomic_write_text(scores_path, json.dumps(scores, indent=1))
    samples_path = _samples_path(weights, num_samples, sample_steps)
    if samples_path.is_file():
        fake = np.load(samples_path)
    else:
        model = load_unet(weights, cfg, device=device)
        fake = generate_images(model, cfg, num_samples, steps=sample_steps, seed=cfg.run.seed, device=device,
                               progress=False)
        atomic_write(samples_path, lambda f: np.save(f, fake))
    judged = judge.score(real, fake) if judge else None
    return SnapshotScore(minute, int(read_checkpoint(weights).get("step", 0)), scores[key],
                         random_feature_distance(real, fake, seed=cfg.run.seed),
                         two_sample_accuracy(real, fake, seed=cfg.run.seed),
                         judged.parser_distance if judged else None, judged.parts_in_place if judged else None)


def score_snapshots(cfg: Config, run_dir: str | Path, real: np.ndarray, *, labeled: int, draws: int,
                    sample_steps: int, device: torch.device | str, log=print) -> list[SnapshotScore]:
    """Every EMA snapshot of the training run in ``run_dir`` (``snapshots/``), in training order, scored by
    ``score_snapshot``: the run's quality against its training minutes."""
    snapshots = sorted((Path(run_dir) / SNAPSHOTS).glob(SNAPSHOT_GLOB), key=lambda p: snapshot_minute(p.name))
    scores, judge = [], FaceJudge(cfg.sample.judge) if cfg.sample.judge else None  # loaded once, not per snapshot
    for weights in snapshots:
        start = time.perf_counter()
        score = score_snapshot(cfg, weights, real, labeled=labeled, draws=draws, sample_steps=sample_steps,
                               device=device, minute=snapshot_minute(weights.name), judge=judge)
        scores.append(score)
        judged = (f", parser distance {score.parser_distance:.2f}, parts in place {score.parts_in_place:.3f}"
                  if score.parser_distance is not None else "")
        log(f"minute {score.minute:g} (step {score.step}): val mIoU {np.mean(score.val_miou):.3f} ± "
            f"{np.std(score.val_miou):.3f}, random-feature distance {score.feature_distance:.2f}, two-sample "
            f"accuracy {score.two_sample_accuracy:.3f}{judged} ({time.perf_counter() - start:.0f} s)")
    return scores


def _judge_header(scores: Sequence[SnapshotScore]) -> tuple[str, str]:
    """The face judge's columns (header, separator), where any score has its figures."""
    judged = any(s.parser_distance is not None for s in scores)
    return (" parser distance | parts in place |", "---|---|") if judged else ("", "")


def _judge_cells(score: SnapshotScore, header: str) -> str:
    if not header:
        return ""
    if score.parser_distance is None:
        return " – | – |"
    return f" {score.parser_distance:.2f} | {score.parts_in_place:.3f} |"


def snapshot_table(scores: Sequence[SnapshotScore], *, labeled: int, draws: int) -> str:
    """One run's snapshot scores as a markdown table, one row per snapshot."""
    header, rule = _judge_header(scores)
    lines = [f"| training minutes | step | val mIoU ({labeled} labels, {draws} draws) | random-feature distance | "
             f"two-sample accuracy |{header}", f"|---|---|---|---|---|{rule}"]
    lines += [f"| {s.minute:g} | {s.step} | {np.mean(s.val_miou):.3f} | {s.feature_distance:.2f} | "
              f"{s.two_sample_accuracy:.3f} |{_judge_cells(s, header)}" for s in scores]
    return "\n".join(lines)


def quality_chart(curves: dict[str, Sequence[SnapshotScore]], labeled: int) -> Image.Image:
    """Val mIoU and sample distance against training minutes, one line per run, side by side."""
    miou = line_chart({name: [(s.minute, float(np.mean(s.val_miou))) for s in c] for name, c in curves.items()},
                      title=f"val mIoU, {labeled} labels (higher is better)", xlabel="training minutes",
                      ylabel="mIoU")
    distance = line_chart({name: [(s.minute, s.feature_distance) for s in c] for name, c in curves.items()},
                          title="sample distance to real faces (lower is better)", xlabel="training minutes",
                          ylabel="random-feature FD")
    return side_by_side([miou, distance])


def run_recipe_study(config_path: str | None, overrides: Sequence[str], recipes: Sequence[str], out_dir: str | Path,
                     *, budget_min: float, snapshot_min: float, labeled: int = 20, draws: int = 2,
                     num_samples: int = 256, sample_steps: int = 50, device: torch.device | str = "cpu",
                     study: str = "toy", budget_steps: int = 0, log=print) -> list[RecipeResult]:
    """Train and score every recipe of ``study``: for ``budget_min`` training minutes each (snapshots every
    ``snapshot_min``), or with ``budget_steps`` for that many steps each, the end of the budget its one
    snapshot (equal steps stay equal budgets when other work shares the CPU)."""
    if study not in STUDIES:
        raise UserError(f"unknown study {study!r}; known: {', '.join(STUDIES)}")
    known = STUDIES[study].recipes
    unknown = [name for name in recipes if name not in known]
    if unknown:
        raise UserError(f"unknown recipe {unknown[0]!r} of study {study!r}; known: {', '.join(known)}")
    out = Path(out_dir)
    results, sample_rows, real = [], [], None
    for name in recipes:
        run_dir = out / name
        budget = ([f"train.max_steps={budget_steps}", "train.time_budget_min=0", "train.snapshot_every_min=0"]
                  if budget_steps else [f"train.time_budget_min={budget_min}", f"train.snapshot_every_min={snapshot_min}"])
        cfg = load_config(config_path, [*STUDIES[study].base, *overrides, *known[name], f"train.out_dir={run_dir}",
                                        *budget, "train.sample_every=0"])
        if real is None:  # the same real images for every snapshot (recipes share image size and data)
            real, _ = reference_images(cfg, num_samples)
        log(f"[{name}] {' '.join(known[name]) or '(the config as it is)'}: training "
            f"{f'{budget_steps} steps' if budget_steps else f'{budget_min:g} min'}")
        start = time.perf_counter()
        peak_path = run_dir / "gemm_peak.json"
        if not peak_path.is_file():  # measured when this recipe trains, not when it is rescored
            atomic_write_text(peak_path, json.dumps({"fp32_matmul_gflops": matmul_peak_gflops(device)}))
        peak = json.loads(peak_path.read_text())["fp32_matmul_gflops"]
        train_ddpm(cfg, resume=(run_dir / LAST_CHECKPOINT).is_file(), progress=False)
        state = read_checkpoint(run_dir / LAST_CHECKPOINT)
        if budget_steps and not list((run_dir / SNAPSHOTS).glob(SNAPSHOT_GLOB)):  # the end of the budget
            export_weights(run_dir / SNAPSHOTS / snapshot_name(round(state["train_seconds"] / 60, 1)),
                           state["ema"], cfg, extra={"step": state["step"], "train_seconds": state["train_seconds"]})
        result = RecipeResult(name, known[name], training_flops_per_image(cfg) / 1e9,
                              state["step"] * cfg.train.batch_size / state["train_seconds"], peak)
        log(f"[{name}] {state['step']} steps, {result.images_per_s:.1f} img/s, "
            f"{result.gflops():.1f} GFLOP/s = {100 * result.peak_share():.0f}% of a {peak:.0f} GFLOP/s peak "
            f"({time.perf_counter() - start:.0f} s)")
        result.snapshots = score_snapshots(cfg, run_dir, real, labeled=labeled, draws=draws,
                                           sample_steps=sample_steps, device=device,
                                           log=lambda line: log(f"[{name}] {line}"))
        save_config(cfg, run_dir / "config.yaml")
        results.append(result)
        if result.snapshots:  # the first samples of the last snapshot, one row per recipe
            last = run_dir / SNAPSHOTS / snapshot_name(result.snapshots[-1].minute)
            sample_rows.append(np.load(_samples_path(last, num_samples, sample_steps))[:10])
            atomic_save_image(image_grid(np.concatenate(sample_rows), nrow=len(sample_rows[0]), scale=2),
                              out / "samples_last_snapshot.png")
        save_recipe_study(results, out, budget_min=budget_min, budget_steps=budget_steps, labeled=labeled, draws=draws,
                          num_samples=num_samples, sample_steps=sample_steps)
    return results


def recipe_table(results: Sequence[RecipeResult], *, labeled: int, draws: int, num_samples: int,
                 sample_steps: int) -> str:
    header, rule = _judge_header([r.snapshots[-1] for r in results if r.snapshots])
    lines = ["| recipe | change | steps | img/s | share of GEMM peak | val mIoU (" + f"{labeled} labels) | "
             f"random-feature distance | two-sample accuracy |{header}", f"|---|---|---|---|---|---|---|---|{rule}"]
    for r in results:
        if not r.snapshots:
            continue
        last = r.snapshots[-1]
        lines.append(f"| {r.name} | {'<br>'.join(f'`{o}`' for o in r.overrides) or '–'} | {last.step} | "
                     f"{r.images_per_s:.1f} | {100 * r.peak_share():.0f}% of {r.peak_gflops:.0f} | "
                     f"{np.mean(last.val_miou):.3f} ± {np.std(last.val_miou):.3f} | {last.feature_distance:.2f} | "
                     f"{last.two_sample_accuracy:.3f} |{_judge_cells(last, header)}")
    return "\n".join(lines) + (
        f"\n\nAt the end of each budget. val mIoU: mean ± std over {draws} label draws, the configured read-out. "
        f"Samples: {num_samples} DDIM-{sample_steps} samples against {num_samples} real images (fresh toy faces, or a "
        f"folder dataset's first test images); random-feature "
        f"distance: Fréchet distance in a random CNN's pooled features (lower is better; two sets of real faces: "
        f"~0.4); two-sample accuracy: a small CNN telling them apart on held-out halves (0.5 = "
        f"indistinguishable); parser distance and parts in place: the face judge's (docs/sample_quality.md), "
        f"where sample.judge is set. Share of GEMM peak: training FLOPs/s against an fp32 2048³ matmul measured "
        f"just before that recipe trained (GFLOP/s).")


def save_recipe_study(results: Sequence[RecipeResult], out: Path, *, budget_min: float, budget_steps: int, labeled: int,
                      draws: int, num_samples: int, sample_steps: int) -> None:
    """recipes.json (every figure), recipes.md (the table) and quality_vs_minutes.png (the curves)."""
    atomic_write_text(out / "recipes.json", json.dumps(
        {"budget_min": None if budget_steps else budget_min, "budget_steps": budget_steps or None, "labeled": labeled, "draws": draws,
         "num_samples": num_samples, "sample_steps": sample_steps,
         "recipes": [asdict(r) for r in results]}, indent=1))
    atomic_write_text(out / "recipes.md", recipe_table(results, labeled=labeled, draws=draws,
                                                      num_samples=num_samples, sample_steps=sample_steps) + "\n")
    scored = {r.name: r.snapshots for r in results if r.snapshots}
    if scored:
        atomic_save_image(quality_chart(scored, labeled), out / "quality_vs_minutes.png")
