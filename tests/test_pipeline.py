"""The main job end to end on the tiny stack: every stage runs, the report's baseline table labels the same
images as the read-out (so its DDPM row is the read-out's own figure), and the downstream check is recorded."""
import json

from conftest import run_script, toy_split_overrides


def test_main_job_reports_the_read_out_beside_baselines_on_the_same_labels(stack, tmp_path):
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
    assert len((out / "synthetic" / "manifest.jsonl").read_text().splitlines()) == 4
    for picture in ("samples.png", "test_predictions.png", "synthetic_pairs.png"):
        assert (out / picture).stat().st_size > 0
    assert (out / "config.yaml").is_file()
