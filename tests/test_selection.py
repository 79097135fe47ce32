"""Choosing what to label: greedy k-center covers every cluster, random draws stay the study's old
draws, and select_labels.py end to end on a tiny DDPM."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_script
from diffuseseg.selection import kcenter_greedy, select_images
from diffuseseg.toy_faces import render_faces


def test_kcenter_covers_every_cluster_where_random_draws_miss_the_rare_one():
    rng = np.random.default_rng(0)
    common = rng.normal(0, 0.1, (95, 2))
    rare = rng.normal(0, 0.1, (5, 2)) + [10, 0]  # 5% of the pool, e.g. faces with hats
    x = np.concatenate([common, rare])
    chosen = kcenter_greedy(x, 2)
    assert chosen[0] < 95 and chosen[1] >= 95  # a typical image first, then the rare kind
    assert len(set(kcenter_greedy(x, 30))) == 30
    misses = sum(not (select_images("random", 2, None, 100, seed=s) >= 95).any() for s in range(50))
    assert misses > 40  # two random labels almost never include the rare kind
    assert all((select_images("kcenter", 2, x, 100, seed=s) >= 95).any() for s in range(20))
    with pytest.raises(ValueError, match="cannot choose 101"):
        kcenter_greedy(x, 101)


def test_random_selection_is_the_baseline_studys_draw():
    expected = np.sort(np.random.default_rng([0, 20, 1]).choice(100, 20, replace=False))
    np.testing.assert_array_equal(select_images("random", 20, None, 100, seed=[0, 20, 1]), expected)


def test_select_labels_script(stack, tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i, image in enumerate(render_faces(range(8), 16, seed=0)[0]):
        Image.fromarray(image).save(folder / f"face_{i}.png")
    out = tmp_path / "chosen"
    proc = run_script("select_labels.py", stack["overrides"], "--images", str(folder), "--k", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    names = (out / "selection.txt").read_text().split()
    assert len(names) == len(set(names)) == 3 and all(n.startswith("face_") for n in names)
    assert json.loads((out / "selection.json").read_text())["images"] == names
    assert Image.open(out / "contact_sheet.png").size[0] > 16
    too_many = run_script("select_labels.py", stack["overrides"], "--images", str(folder), "--k", "9")
    assert too_many.returncode == 2 and "--k 9" in too_many.stderr and str(folder) in too_many.stderr
