"""The main job, stage by stage: toy data -> DDPM -> samples -> features + ensemble -> evaluation
against baselines -> synthetic data set -> downstream check, with a ``report.md`` at the end.

Each stage calls the same library functions as its standalone script; this module only chains
them, times them and writes the report.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffuseseg.config import Config, save_config
from diffuseseg.datasets import LabeledFolder, labeled_split
from diffuseseg.label_formats import ClassList
from diffuseseg.factory import generate_pairs
from diffuseseg.io import atomic_write, atomic_write_text, exclusive_folder
from diffuseseg.metrics import evaluate
from diffuseseg.runtime import resolve_device, thread_scope
from diffuseseg.sampling import generate_images
from diffuseseg.segmentation import (build_extractor, configured_views, describe_readout, fit_readout, save_readout,
                                    segment, view_features)
from diffuseseg.study import run_study
from diffuseseg.training import EMA_WEIGHTS, train_ddpm
from diffuseseg.visualize import colorize, overlay, save_grid


FIRST_RUN_DDPM_MINUTES = 5.0  # only where run.checkpoint is missing: keeps such a run within ~15 min on 2 cores


class Report:
    """Collects markdown sections and stage timings; written atomically after every stage, so an
    interrupted run still leaves a readable report of what finished."""

    def __init__(self, out: Path) -> None:
        self.out, self.sections, self.timings = out, [], {}

    def add(self, text: str) -> None:
        self.sections.append(text.strip() + "\n")
        self.write()

    def timed(self, stage: str, seconds: float) -> None:
        self.timings[stage] = seconds
        print(f"[{stage}] {seconds:.0f} s")

    def write(self) -> None:
        rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in self.timings.items())
        total = sum(self.timings.values())
        timing = f"## Timings\n\n| stage | seconds |\n|---|---|\n{rows}\n| **total** | **{total:.0f}** |\n"
        atomic_write_text(self.out / "report.md", "# DiffuseSeg pipeline report\n\n"
                          + "\n".join(self.sections) + "\n" + timing)


def run_pipeline(cfg: Config, out_dir: str | Path, *, from_scratch_minutes: float = 0.0,
                 labeled_sizes: tuple[int, ...] = (20,), draws: int = 1, downstream: bool = True,
                 progress: bool = True) -> Path:
    """Run every stage into ``out_dir`` (its only writer meanwhile); returns the folder."""
    with exclusive_folder(out_dir), thread_scope(cfg.run.threads):
        return _run_pipeline(cfg, Path(out_dir), from_scratch_minutes, labeled_sizes, draws, downstream, progress)


def _run_pipeline(cfg: Config, out: Path, from_scratch_minutes: float, labeled_sizes: tuple[int, ...], draws: int,
                  downstream: bool, progress: bool) -> Path:
    device = resolve_device(cfg.run.device)
    report = Report(out)

    # 1. data: the toy-face splits render on first use
    t0 = time.perf_counter()
    pool, test = labeled_split(cfg, "labeled"), labeled_split(cfg, "test")
    classes = pool.classes
    report.timed("data", time.perf_counter() - t0)

    # 2. the DDPM: the weights at run.checkpoint (a clone has the reference weights there), or trained here
    # within a time budget. Where the file is missing, a short run trains one and installs it there.
    install_at, weak_warning = None, ""
    if from_scratch_minutes <= 0 and not Path(cfg.run.checkpoint).is_file():
        install_at, from_scratch_minutes = Path(cfg.run.checkpoint), FIRST_RUN_DDPM_MINUTES
        weak_warning = (f"**No DDPM weights at `{install_at}`**: this run trained one for {from_scratch_minutes:g} "
                        "minutes, so every figure below is far below the README's, which come from the reference "
                        "weights tracked in git (restore them with `git checkout -- checkpoints/`; how they were "
                        "trained: `checkpoints/toy_faces_32/train_log_summary.md`).")
        print(f"WARNING: no DDPM at {install_at}: training one for {from_scratch_minutes:g} min first. Its figures "
              "will be far below the README's (those use the reference weights tracked in git: "
              "git checkout -- checkpoints/).")
    if from_scratch_minutes > 0:
        t0 = time.perf_counter()
        ddpm_dir = out / "ddpm"
        shutil.rmtree(ddpm_dir, ignore_errors=True)
        train_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, out_dir=str(ddpm_dir), time_budget_min=from_scratch_minutes, max_steps=10 ** 9,
            sample_every=0))
        result = train_ddpm(train_cfg, progress=progress)
        if install_at is not None:
            atomic_write(install_at, lambda f: f.write((ddpm_dir / EMA_WEIGHTS).read_bytes()))
        else:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint=str(ddpm_dir / EMA_WEIGHTS)))
        report.timed("train DDPM", time.perf_counter() - t0)
        ddpm_note = f"trained here for {from_scratch_minutes:g} min ({result.step} steps)"
    else:
        ddpm_note = "the weights in run.checkpoint"
    save_config(cfg, out / "config.yaml")
    if weak_warning:
        report.add(weak_warning)

    # 3. samples
    t0 = time.perf_counter()
    extractor = build_extractor(cfg, "ddpm", device)
    samples = generate_images(extractor.model, cfg, 64, sampler="ddim", steps=cfg.generate.steps,
                              seed=cfg.sample.seed, batch_size=cfg.generate.batch_size, device=device,
                              progress=progress)
    save_grid(samples, out / "samples.png", nrow=8, scale=2)
    report.timed("sample grid", time.perf_counter() - t0)
    report.add(f"## DDPM samples\n\nDDPM: `{cfg.run.checkpoint}` ({ddpm_note}); 64 samples, "
               f"DDIM {cfg.generate.steps} steps.\n\n![samples](samples.png)")

    # 4. features + ensemble on the first num_labeled labeled images
    t0 = time.perf_counter()
    n_lab = cfg.labels.num_labeled
    _, lab_images, lab_masks = pool.load(range(n_lab))
    fit_views = configured_views(cfg, classes.names, "train")
    lab_features = view_features(extractor, lab_images, fit_views, range(n_lab), cfg.features.batch_size)
    ensemble, meta = fit_readout(cfg, lab_features, lab_masks, fit_views, classes, extractor.spec, device,
                                 progress=progress)
    meta["trained_on"], meta["train_views"] = pool.names[:n_lab], fit_views.name
    save_readout(out / "ensemble.pt", ensemble, meta)
    cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, path=str(out / "ensemble.pt")))
    report.timed("features + ensemble", time.perf_counter() - t0)

    # 5. evaluation on the test split, and the baselines through the same code path
    t0 = time.perf_counter()
    test_names, test_images, test_masks = test.load()
    seg = segment(extractor, ensemble, test_images, vote_mode=cfg.ensemble.vote,
                  views=configured_views(cfg, classes.names, "test"), batch_size=cfg.features.batch_size,
                  progress=progress)
    ens_report = evaluate(list(seg.masks), list(test_masks), classes.names, cfg.labels.ignore_index)
    atomic_write_text(out / "ensemble_metrics.json", ens_report.to_json())
    shown = slice(0, 12)
    rows = np.stack([test_images[shown], colorize(test_masks[shown], classes.palette),
                     colorize(seg.masks[shown], classes.palette),
                     overlay(test_images[shown], seg.masks[shown], classes.palette)], axis=1)
    save_grid(rows.reshape(-1, *test_images.shape[1:]), out / "test_predictions.png", nrow=8, scale=3)
    # By default the baselines label the same first images as the read-out above (selection "first"): the
    # study's DDPM row would refit exactly that read-out (same images, views and seed), so its figure is
    # reused. Other sizes or several draws: random draws, every kind (the main job itself keeps to 10 min).
    reuse = tuple(labeled_sizes) == (n_lab,) and draws == 1
    kinds = ["raw_rgb_xy", "supervised"] if reuse else ["raw_rgb_xy", "ddpm", "supervised"]
    study = run_study(cfg, kinds, labeled_sizes, draws, "test", device, progress,
                      selection="first" if reuse else "random")
    if reuse:
        study.miou = {"raw_rgb_xy": study.miou["raw_rgb_xy"], "ddpm": {n_lab: [ens_report.miou]},
                      "supervised": study.miou["supervised"]}
    atomic_write_text(out / "study.json", study.to_json())
    report.timed("evaluation + baselines", time.perf_counter() - t0)
    readout = describe_readout(cfg)
    report.add(f"## Segmentation with {n_lab} labeled images\n\nTest split: {len(test)} images. "
               f"{readout[0].upper()}{readout[1:]} on DDPM features ({extractor.dim} per pixel: t = "
               f"{list(cfg.features.timesteps)}, blocks {list(cfg.features.blocks)}); views: "
               f"train `{cfg.ensemble.train_views}`, test `{cfg.ensemble.test_views}`.\n\n"
               f"**mIoU {ens_report.miou:.3f}**, pixel accuracy {ens_report.pixel_accuracy:.3f}.\n\n"
               f"```\n{ens_report.table()}\n```\n\nColumns: image | ground truth | prediction | overlay.\n\n"
               f"![test predictions](test_predictions.png)\n\n### Baselines (same code path)\n\n{study.markdown()}")

    # 6. the labeled-data factory
    t0 = time.perf_counter()
    gen_cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, out_dir=str(out / "synthetic")))
    factory = generate_pairs(gen_cfg, extractor.model, extractor, ensemble, classes, device=device, progress=progress)
    syn = LabeledFolder(out / "synthetic", cfg.model.im_size)
    _, syn_images, syn_masks = syn.load(range(min(16, len(syn))))
    pairs = np.stack([syn_images, colorize(syn_masks, classes.palette)], axis=1)
    save_grid(pairs.reshape(-1, *syn_images.shape[1:]), out / "synthetic_pairs.png", nrow=8, scale=3)
    report.timed("synthetic data set", time.perf_counter() - t0)
    report.add(f"## Synthetic data set\n\n{factory.total} (image, mask) pairs in `synthetic/` "
               f"(filtered view, `generate.filter_rule={cfg.generate.filter_rule}` at "
               f"{cfg.generate.filter_fraction:.0%}: `synthetic/filtered/`); "
               f"sampling {factory.sampling_seconds:.0f} s, segmentation {factory.segmentation_seconds:.0f} s, "
               f"{factory.pairs_per_second:.2f} pairs/s.\n\n![synthetic pairs](synthetic_pairs.png)")

    # 7. downstream: does a network trained on factory pairs segment real images?
    if downstream:
        t0 = time.perf_counter()
        # With reuse, the study's supervised row is this check's "real only" segmenter (same images, seed and
        # config), so its figure is reused instead of training it twice (about a minute of the main job).
        real_miou = study.miou["supervised"][n_lab][0] if reuse else None
        table = downstream_check(cfg, out, classes, lab_images, lab_masks, test_images, test_masks,
                                 ens_report.miou, device, progress, real_miou=real_miou)
        report.timed("downstream check", time.perf_counter() - t0)
        report.add("## Downstream check (DatasetDDPM protocol)\n\n" + table)
    print(f"report: {out / 'report.md'}")
    return out


def downstream_check(cfg: Config, out: Path, classes: ClassList, real_images: np.ndarray, real_masks: np.ndarray,
                     test_images: np.ndarray, test_masks: np.ndarray, ensemble_miou: float,
                     device: torch.device, progress: bool, real_miou: float | None = None) -> str:
    """Test mIoU of a segmenter trained on the real labeled images and of one trained on the factory pairs.

    ``real_miou``: the real-only segmenter's figure when already measured with the same images and config.
    """
    from diffuseseg.segmenter import predict_masks, train_from_config
    # The two variants that answer "do factory pairs train a segmenter?"; the filtered view and factory + real
    # are one train_segmenter.py call each (README), left out to keep the main job within 10 minutes.
    _, syn_images, syn_masks = LabeledFolder(out / "synthetic", cfg.model.im_size).load()

    def trained_miou(images: np.ndarray, masks: np.ndarray) -> float:
        model = train_from_config(images, masks, classes.names, cfg.segmenter, ignore_index=cfg.labels.ignore_index,
                                  device=device, progress=progress, compile_backend=cfg.run.compile_backend)
        pred = predict_masks(model, test_images, batch_size=cfg.segmenter.batch_size)
        return evaluate(list(pred), list(test_masks), classes.names, cfg.labels.ignore_index).miou

    results = {
        f"{len(real_images)} real labeled images only":
            real_miou if real_miou is not None else trained_miou(real_images, real_masks),
        f"{len(syn_images)} factory pairs": trained_miou(syn_images, syn_masks),
    }
    for name, miou in results.items():
        print(f"downstream: {name}: mIoU {miou:.4f}")
    rows = [f"| {name} | {miou:.3f} | {miou / ensemble_miou:.0%} |" for name, miou in results.items()]
    atomic_write_text(out / "downstream.json", json.dumps({"ensemble_miou": ensemble_miou, **results}, indent=1))
    return ("| segmenter trained on | test mIoU | vs ensemble |\n|---|---|---|\n" + "\n".join(rows)
            + f"\n| (reference) the read-out that labelled them ({describe_readout(cfg)}) | {ensemble_miou:.3f} | 100% |\n")
