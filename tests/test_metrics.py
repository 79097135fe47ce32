"""Segmentation metrics agree with scikit-learn and with hand-computed values."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, jaccard_score

from conftest import REPO
from diffuseseg.errors import UserError
from diffuseseg.metrics import (compare_reports, confusion_matrix, evaluate, iou_per_class, load_report, mean_iou,
                                paired_miou_difference, per_image_miou, pixel_accuracy)


def _random_maps(seed: int, num_classes: int, shape=(3, 17, 23), used: int | None = None):
    """Random (pred, target); only the first ``used`` classes occur, so the rest are absent from both."""
    rng = np.random.default_rng(seed)
    used = used or num_classes
    target = rng.integers(0, used, shape)
    # Predictions correlated with the target, so IoUs are neither ~0 nor ~1.
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, used, shape))
    return pred, target


@pytest.mark.parametrize("seed,num_classes,used", [(0, 5, None), (1, 7, None), (2, 6, 4), (3, 20, 13)])
def test_iou_agrees_with_sklearn(seed, num_classes, used):
    pred, target = _random_maps(seed, num_classes, used=used)
    conf = confusion_matrix(pred, target, num_classes, ignore_index=None)
    labels = list(range(num_classes))
    # zero_division=0: sklearn then scores a class absent from both as 0, which is the official 0.
    ref = jaccard_score(target.ravel(), pred.ravel(), labels=labels, average=None, zero_division=0)
    np.testing.assert_allclose(iou_per_class(conf), ref, rtol=1e-6, atol=1e-9)
    ref_mean = jaccard_score(target.ravel(), pred.ravel(), labels=labels, average="macro", zero_division=0)
    assert mean_iou(conf) == pytest.approx(ref_mean, rel=1e-6)
    assert pixel_accuracy(conf) == pytest.approx(accuracy_score(target.ravel(), pred.ravel()))
    if used is not None:
        assert (iou_per_class(conf)[used:] == 0).all()


def test_confusion_orientation_and_shapes():
    target = np.array([[0, 0, 1], [2, 2, 2]])
    pred = np.array([[0, 1, 1], [2, 0, 2]])
    conf = confusion_matrix(pred, target, 3, ignore_index=None)
    # rows = target, columns = prediction
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert conf.dtype == np.int64
    # torch tensors and any shape give the same counts
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(pred).reshape(-1),
                                                   torch.from_numpy(target).reshape(3, 2), 3, None), conf)


def test_hand_computed_example():
    target = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 2]])
    conf = confusion_matrix(pred, target, 3)
    # class 0: I=2 (two of its three target pixels), U=3; class 1: I=3, U=5 (4 target + 1 extra pred);
    # class 2: I=0, U=1; the ignored pixel (predicted 2) is not counted anywhere.
    np.testing.assert_allclose(iou_per_class(conf), [2 / 3, 3 / 5, 0.0], atol=1e-7)
    assert mean_iou(conf) == pytest.approx((2 / 3 + 3 / 5) / 3, abs=1e-7)
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)
    assert conf.sum() == 7


def test_ignore_pixels_are_excluded():
    pred, target = _random_maps(4, 5)
    ignored = np.random.default_rng(5).random(target.shape) < 0.3
    target_ign = np.where(ignored, 255, target)
    conf = confusion_matrix(pred, target_ign, 5)
    np.testing.assert_array_equal(conf, confusion_matrix(pred[~ignored], target[~ignored], 5, None))
    ref = jaccard_score(target[~ignored], pred[~ignored], labels=range(5), average=None, zero_division=0)
    np.testing.assert_allclose(iou_per_class(conf), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, target_ign, 5, ignore_index=None)  # 255 is then just a bad label
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.full_like(pred, 7), target, 5)


def test_ignore_index_that_is_a_class_id_is_left_out_of_the_mean():
    """Official compute_iou skips the ignore label when it is one of the class ids: ignore_index=2 of 3."""
    target = np.array([[0, 0, 1, 1], [2, 2, 1, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 2]])
    conf = confusion_matrix(pred, target, 3, ignore_index=2)
    # Target-2 pixels are dropped (as for 255); a predicted 2 elsewhere still counts against the true class.
    # Left: t = 0 0 1 1 1 0, p = 0 1 1 1 1 2 -> class 0: I=1, U=3; class 1: I=3, U=4; class 2: I=0, U=1.
    np.testing.assert_allclose(iou_per_class(conf), [1 / 3, 3 / 4, 0.0], atol=1e-7)
    assert mean_iou(conf, ignore_index=2) == pytest.approx((1 / 3 + 3 / 4) / 2, abs=1e-7)
    assert mean_iou(conf) == pytest.approx((1 / 3 + 3 / 4) / 3, abs=1e-7)  # no class id ignored: all three
    assert mean_iou(conf, ignore_index=255) == mean_iou(conf)

    report = evaluate([pred], [target], ["a", "b", "c"], ignore_index=2)
    assert report.miou == pytest.approx((1 / 3 + 3 / 4) / 2, abs=1e-7)
    assert report.per_image_miou == [pytest.approx((1 / 3 + 3 / 4) / 2, abs=1e-7)]
    np.testing.assert_allclose(per_image_miou([pred], [target], 3, ignore_index=2), [(1 / 3 + 3 / 4) / 2])
    assert report.per_class_iou["c"] == 0.0 and report.excluded == ["c"]
    assert "not in the mIoU" in report.table()
    assert type(report).from_json(report.to_json()) == report
    assert evaluate([pred], [target], ["a", "b", "c"]).excluded == []  # 255: not a class id


def test_pooled_and_per_image_differ_as_expected():
    # Image A has classes 0/1 and is perfect; image B has only class 2 and half of it is predicted 0.
    tgt_a, pred_a = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    tgt_b, pred_b = np.array([2, 2, 2, 2]), np.array([2, 2, 0, 0])
    per_image = per_image_miou([pred_a, pred_b], [tgt_a, tgt_b], 4)
    # Per image, only present classes count: A = 1; B has classes {0 (pred only), 2}: (0 + 0.5) / 2.
    np.testing.assert_allclose(per_image, [1.0, 0.25], atol=1e-7)
    report = evaluate([pred_a, pred_b], [tgt_a, tgt_b], ["a", "b", "c", "d"])
    # Pooled: class 0 I=2 U=4, class 1 = 1, class 2 I=2 U=4, class 3 absent -> 0, mean over all 4.
    assert report.miou == pytest.approx((0.5 + 1 + 0.5 + 0) / 4, abs=1e-7)
    assert report.miou != pytest.approx(float(np.mean(per_image)))
    assert report.per_class_iou["d"] == 0.0
    assert report.pixel_accuracy == pytest.approx(6 / 8)


def test_report_json_and_table():
    pred, target = _random_maps(6, 4, shape=(2, 8, 8))
    target[1] = 255  # an all-ignored image: its per-image mIoU is NaN, written as null
    report = evaluate(list(pred), list(target), ["skin", "hair", "bg", "hat"])
    d = json.loads(report.to_json())
    assert d["miou"] == pytest.approx(report.miou) and d["per_image_miou"][1] is None
    assert math.isnan(report.per_image_miou[1])
    assert np.array(d["confusion"]).sum() == 64
    table = report.table()
    assert "skin" in table and "mIoU" in table and f"{100 * report.miou:.2f}" in table
    with pytest.raises(ValueError, match="shape"):
        evaluate([pred[0]], [target[0, :4]], ["a", "b", "c", "d"])


def _saved_reports(tmp_path, seeds, names=("bg", "a", "b")):
    """Reports of correlated random maps, each saved as run_<seed>/metrics.json like a script's output."""
    reports = []
    for seed in seeds:
        pred, target = _random_maps(seed, len(names))
        report = evaluate(list(pred), list(target), list(names), ignore_index=None)
        (tmp_path / f"run_{seed}").mkdir()
        (tmp_path / f"run_{seed}" / "metrics.json").write_text(report.to_json())
        reports.append(report)
    return reports


def test_load_report_round_trip_and_compare(tmp_path):
    reports = _saved_reports(tmp_path, [10, 11, 12])
    loaded = [load_report(tmp_path / f"run_{s}") for s in (10, 11, 12)]
    assert loaded == reports
    assert load_report(tmp_path / "run_10" / "metrics.json") == reports[0]
    table = compare_reports({"three": loaded, "one": loaded[:1]})
    lines = table.splitlines()
    assert lines[0] == "| class | three (3 runs) | one (1 run) |"
    a = [r.per_class_iou["a"] for r in reports]
    assert f"| a | {np.mean(a):.3f} ± {np.std(a):.3f} | {a[0]:.3f} ± 0.000 |" in lines
    mious = [r.miou for r in reports]
    assert f"| **mIoU** | **{np.mean(mious):.3f} ± {np.std(mious):.3f}** |" in table
    with pytest.raises(ValueError, match="class list"):
        other = evaluate([np.zeros((4, 4), int)], [np.zeros((4, 4), int)], ["bg", "x", "y"], None)
        compare_reports({"three": loaded, "other": [other]})


def test_load_report_names_a_bad_file(tmp_path):
    (tmp_path / "metrics.json").write_text('{"miou": 0.5}')
    with pytest.raises(UserError, match="metrics.json: not a metrics.json"):
        load_report(tmp_path)
    with pytest.raises(UserError, match="no such metrics file"):
        load_report(tmp_path / "missing")


def test_compare_runs_script(tmp_path):
    reports = _saved_reports(tmp_path, [20, 21])
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "utils/compare_runs.py", f"both={tmp_path}/run_*",
                           f"first={tmp_path}/run_20", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    mious = [r.miou for r in reports]
    expected = f"| **mIoU** | **{np.mean(mious):.3f} ± {np.std(mious):.3f}** | **{mious[0]:.3f} ± 0.000** |"
    assert expected in proc.stdout
    assert out.read_text() == proc.stdout
    bad = subprocess.run([sys.executable, "utils/compare_runs.py", f"x={tmp_path}/nothing_*"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "matches nothing" in bad.stderr and "Traceback" not in bad.stderr


def test_paired_difference_is_the_pooled_mious_difference_with_a_bootstrap_interval():
    """paired_miou_difference: the pooled mIoU of a minus b, and an interval from the images drawn again; a
    change on every image gives an interval clear of zero, one on a single image of forty an interval about
    zero, and predictions that agree give exactly zero."""
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 4, (8, 8)) for _ in range(40)]
    noisy = [np.where(rng.random(t.shape) < 0.3, rng.integers(0, 4, t.shape), t) for t in truths]
    confs = lambda preds: np.stack([confusion_matrix(p, t, 4, None) for p, t in zip(preds, truths)])
    exact, rough = confs(truths), confs(noisy)
    diff, low, high = paired_miou_difference(exact, rough, draws=500)
    pooled = evaluate(truths, truths, list("abcd"), None).miou - evaluate(noisy, truths, list("abcd"), None).miou
    assert diff == pytest.approx(pooled) and 0 < low < diff < high
    one = confs([truths[0]] + noisy[1:])        # better than rough on one image only
    diff, low, high = paired_miou_difference(one, rough, draws=500)
    assert 0 < diff < 0.05 and low <= 0 < high
    assert paired_miou_difference(rough, rough, draws=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        paired_miou_difference(exact, rough[:-1])
