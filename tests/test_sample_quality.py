"""The classifier two-sample test, the memorisation check and the PIL line chart of the recipe study."""
import json

import numpy as np
import pytest
from PIL import Image

from diffuseseg.sample_quality import (frechet_distance, memorisation_check, nearest_neighbours,
                                       random_feature_distance, sample_report, two_sample_accuracy)
from diffuseseg.toy_faces import render_faces
from diffuseseg.visualize import LINE_COLOURS, line_chart


def test_two_sample_test_tells_wrong_faces_from_real_ones_but_not_real_from_real():
    real, _ = render_faces(range(0, 128), 16)
    more_real, _ = render_faces(range(500, 628), 16)
    assert two_sample_accuracy(real, more_real, steps=150) < 0.65
    # Plausible but wrong: the colour channels swapped (skin turns blue), as a poor generator might do.
    wrong = more_real[..., ::-1].copy()
    assert two_sample_accuracy(real, wrong, steps=150) > 0.9
    with pytest.raises(ValueError, match="equal-shaped"):
        two_sample_accuracy(real, more_real[:64])


def test_frechet_distance_matches_the_closed_form_and_ranks_worse_samples_further():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2 + 1  # N(1, 4 I): distance 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    real, _ = render_faces(range(0, 128), 16)
    more_real, _ = render_faces(range(500, 628), 16)
    near = random_feature_distance(real, more_real)
    noisy = np.clip(more_real.astype(int) + rng.integers(-60, 61, more_real.shape), 0, 255).astype(np.uint8)
    assert near < random_feature_distance(real, noisy) < random_feature_distance(real, more_real[..., ::-1].copy())
    assert random_feature_distance(real, more_real) == near  # a fixed seed: a fixed yardstick


def test_line_chart_draws_every_series_in_its_colour():
    chart = np.asarray(line_chart({"a": [(5, 0.3), (10, 0.4)], "b": [(5, 0.35), (10, 0.32)]},
                                  title="t", xlabel="minutes", ylabel="mIoU"))
    for colour in LINE_COLOURS[:2]:
        assert (chart == colour).all(axis=-1).sum() > 50  # the line, its markers and the legend swatch
    assert not (chart == LINE_COLOURS[2]).all(axis=-1).any()


def test_memorisation_check_finds_copied_and_mirrored_training_images(tmp_path):
    """Samples that are training images (one mirrored) sit at distance 0 from them, far closer than unseen
    images of the same kind: the ratio is ~0. New images of the same distribution give a ratio near 1."""
    rng = np.random.default_rng(0)
    train, held_out, new = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (40, 20, 20))
    copies = np.concatenate([train[[3, 7]], train[[11]][:, :, ::-1]])
    idx, dist = nearest_neighbours(copies, train)
    assert idx.tolist() == [3, 7, 11] and np.allclose(dist, 0, atol=1e-6)
    assert memorisation_check(copies, train, held_out)["ratio"] < 0.01
    fresh = memorisation_check(new, train, held_out)
    assert 0.9 < fresh["ratio"] < 1.1 and fresh["fraction_closer_than_any_held_out"] < 0.2
    report = sample_report(np.concatenate([copies, new[:5]]), train, held_out, tmp_path, pairs=4)
    assert report["nearest_train_index"][:3] == [3, 7, 11] and report["feature_distance_train_to_held_out"] > 0
    assert json.loads((tmp_path / "quality.json").read_text())["ratio"] == report["ratio"]
    assert Image.open(tmp_path / "nearest_train.png").size == (2 * (4 * 10 + 2), 2 * (2 * 10 + 2))
