"""The main job end to end on the tiny stack: every stage runs, the report's baseline table labels the same
images as the read-out (so its DDPM row is the read-out's own figure), and the downstream check is recorded (its
real-only row is the baselines' supervised segmenter, reused, and equals one trained afresh)."""
import json

import pytest
import torch
from conftest import run_script, toy_split_overrides

from diffuseseg.config import load_config
from diffuseseg.datasets import labeled_split
from diffuseseg.metrics import evaluate
from diffuseseg.segmenter import predict_masks, train_from_config


def test_main_job_reports_the_read_out_beside_baselines_on_the_same_labels(stack, tmp_path, one_thread):
    toy, out = tmp_path / "toy", tmp_path / "main"
    overrides = stack["overrides"] + toy_split_overrides(toy, 6, 4, "test", 4) + [
        "labels.min_pixels=0", "ensemble.readout=conv_head", "conv_head.members=2", "conv_head.hidden=8",
        "conv_head.steps=3", "segmenter.steps=4", "segmenter.batch_size=2", "generate.num_images=4",
        "generate.batch_size=2", "generate.steps=2"]
    proc = run_script("run_pipeline.py", overrides, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    for section in ("## DDPM samples", "## Segmentation with 4 labeled images", "### Baselines", "## Synthetic data set",
                    "## Downstream check", "## Timings"):
        assert section in report, section
    study = json.loads((out / "study.json").read_text())
    readout_miou = json.loads((out / "ensemble_metrics.json").read_text())["miou"]
    assert study["selection"] == "first" and list(study["miou"]) == ["raw_rgb_xy", "ddpm", "supervised"]
    assert study["miou"]["ddpm"]["4"] == [readout_miou]
    downstream = json.loads((out / "downstream.json").read_text())
    assert set(downstream) == {"ensemble_miou", "4 real labeled images only", "4 factory pairs"}
    # The real-only segmenter is not trained twice: the baselines' supervised figure stands in for it, which is
    # right only if training it afresh on the same 4 faces with the run's config gives the same figure.
    cfg = load_config(out / "config.yaml")
    pool, test = labeled_split(cfg, "labeled"), labeled_split(cfg, "test")
    (_, images, masks), (_, test_images, test_masks) = pool.load(range(4)), test.load()
    net = train_from_config(images, masks, pool.classes.names, cfg.segmenter, ignore_index=cfg.labels.ignore_index,
                            device=torch.device("cpu"), progress=False)
    afresh = evaluate(list(predict_masks(net, test_images, batch_size=cfg.segmenter.batch_size)), list(test_masks),
                      pool.classes.names, cfg.labels.ignore_index).miou
    assert downstream["4 real labeled images only"] == study["miou"]["supervised"]["4"][0]
    assert downstream["4 real labeled images only"] == pytest.approx(afresh, abs=1e-9)
    assert len((out / "synthetic" / "manifest.jsonl").read_text().splitlines()) == 4
    for picture in ("samples.png", "test_predictions.png", "synthetic_pairs.png"):
        assert (out / picture).stat().st_size > 0
    assert (out / "config.yaml").is_file()
