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

from diffuseseg.checkpoint import load_unet, read_checkpoint
from diffuseseg.config import Config, config_to_dict, load_config, save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.errors import UserError
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
    "celebahq64": Study(base=[], recipes={
        "lean": [],
        "narrow": _NARROW,
        "wide": ["model.down_channels=[48,96,144,192]", "model.mid_channels=[192,192,144]"],
        "celeba_10k": [_WITH_CELEBA_10K],
        "narrow_celeba_10k": [*_NARROW, _WITH_CELEBA_10K],
        "narrow_lr_1e-3": [*_NARROW, "train.lr=0.001"],
        "narrow_v_prediction": [*_NARROW, "diffusion.prediction_type=v_prediction"],
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
                   device: torch.device | str) -> tuple[list[float], float, float]:
    """(val mIoU per draw, random-feature distance, two-sample accuracy) of one set of DDPM weights, its
    samples compared with the real images ``real`` (as many). The val mIoU and the samples (the slow
    parts) are kept beside the weights and reused by a rerun."""
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
    return (scores[key], random_feature_distance(real, fake, seed=cfg.run.seed),
            two_sample_accuracy(real, fake, seed=cfg.run.seed))


def score_snapshots(cfg: Config, run_dir: str | Path, real: np.ndarray, *, labeled: int, draws: int,
                    sample_steps: int, device: torch.device | str, log=print) -> list[SnapshotScore]:
    """Every EMA snapshot of the training run in ``run_dir`` (``snapshots/``), in training order, scored by
    ``score_snapshot``: the run's quality against its training minutes."""
    snapshots = sorted((Path(run_dir) / SNAPSHOTS).glob(SNAPSHOT_GLOB), key=lambda p: snapshot_minute(p.name))
    scores = []
    for weights in snapshots:
        start = time.perf_counter()
        miou, distance, c2st = score_snapshot(cfg, weights, real, labeled=labeled, draws=draws,
                                              sample_steps=sample_steps, device=device)
        step = int(read_checkpoint(weights).get("step", 0))
        scores.append(SnapshotScore(snapshot_minute(weights.name), step, miou, distance, c2st))
        log(f"minute {scores[-1].minute:g} (step {step}): val mIoU {np.mean(miou):.3f} ± {np.std(miou):.3f}, "
            f"random-feature distance {distance:.2f}, two-sample accuracy {c2st:.3f} "
            f"({time.perf_counter() - start:.0f} s)")
    return scores


def snapshot_table(scores: Sequence[SnapshotScore], *, labeled: int, draws: int) -> str:
    """One run's snapshot scores as a markdown table, one row per snapshot."""
    lines = [f"| training minutes | step | val mIoU ({labeled} labels, {draws} draws) | random-feature distance | "
             "two-sample accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {s.minute:g} | {s.step} | {np.mean(s.val_miou):.3f} | {s.feature_distance:.2f} | "
              f"{s.two_sample_accuracy:.3f} |" for s in scores]
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
                     study: str = "toy", log=print) -> list[RecipeResult]:
    """Train and score every recipe of ``study``."""
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
        cfg = load_config(config_path, [*STUDIES[study].base, *overrides, *known[name], f"train.out_dir={run_dir}",
                                        f"train.time_budget_min={budget_min}",
                                        f"train.snapshot_every_min={snapshot_min}", "train.sample_every=0"])
        if real is None:  # the same real images for every snapshot (recipes share image size and data)
            real, _ = reference_images(cfg, num_samples)
        log(f"[{name}] {' '.join(known[name]) or '(the config as it is)'}: training {budget_min:g} min")
        start = time.perf_counter()
        peak_path = run_dir / "gemm_peak.json"
        if not peak_path.is_file():  # measured when this recipe trains, not when it is rescored
            atomic_write_text(peak_path, json.dumps({"fp32_matmul_gflops": matmul_peak_gflops(device)}))
        peak = json.loads(peak_path.read_text())["fp32_matmul_gflops"]
        train_ddpm(cfg, resume=(run_dir / LAST_CHECKPOINT).is_file(), progress=False)
        state = read_checkpoint(run_dir / LAST_CHECKPOINT)
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
        save_recipe_study(results, out, budget_min=budget_min, labeled=labeled, draws=draws,
                          num_samples=num_samples, sample_steps=sample_steps)
    return results


def recipe_table(results: Sequence[RecipeResult], *, labeled: int, draws: int, num_samples: int,
                 sample_steps: int) -> str:
    lines = ["| recipe | change | steps | img/s | share of GEMM peak | val mIoU (" + f"{labeled} labels) | "
             "random-feature distance | two-sample accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.snapshots:
            continue
        last = r.snapshots[-1]
        lines.append(f"| {r.name} | {'<br>'.join(f'`{o}`' for o in r.overrides) or '–'} | {last.step} | "
                     f"{r.images_per_s:.1f} | {100 * r.peak_share():.0f}% of {r.peak_gflops:.0f} | "
                     f"{np.mean(last.val_miou):.3f} ± {np.std(last.val_miou):.3f} | {last.feature_distance:.2f} | "
                     f"{last.two_sample_accuracy:.3f} |")
    return "\n".join(lines) + (
        f"\n\nAt the end of each budget. val mIoU: mean ± std over {draws} label draws, the configured read-out. "
        f"Samples: {num_samples} DDIM-{sample_steps} samples against {num_samples} real images (fresh toy faces, or a "
        f"folder dataset's first test images); random-feature "
        f"distance: Fréchet distance in a random CNN's pooled features (lower is better; two sets of real faces: "
        f"~0.4); two-sample accuracy: a small CNN telling them apart on held-out halves (0.5 = "
        f"indistinguishable). Share of GEMM peak: training FLOPs/s against an fp32 2048³ matmul measured "
        f"just before that recipe trained (GFLOP/s).")


def save_recipe_study(results: Sequence[RecipeResult], out: Path, *, budget_min: float, labeled: int,
                      draws: int, num_samples: int, sample_steps: int) -> None:
    """recipes.json (every figure), recipes.md (the table) and quality_vs_minutes.png (the curves)."""
    atomic_write_text(out / "recipes.json", json.dumps(
        {"budget_min": budget_min, "labeled": labeled, "draws": draws,
         "num_samples": num_samples, "sample_steps": sample_steps,
         "recipes": [asdict(r) for r in results]}, indent=1))
    atomic_write_text(out / "recipes.md", recipe_table(results, labeled=labeled, draws=draws,
                                                      num_samples=num_samples, sample_steps=sample_steps) + "\n")
    scored = {r.name: r.snapshots for r in results if r.snapshots}
    if scored:
        atomic_save_image(quality_chart(scored, labeled), out / "quality_vs_minutes.png")
