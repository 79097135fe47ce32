"""The downstream segmenter: it learns toy faces, flips swap mirrored classes, runs are reproducible,
files round-trip, and training folders with different class lists are refused by name."""
import numpy as np
import pytest
import torch

from diffuseseg.datasets import toy_classes
from diffuseseg.errors import DataError
from diffuseseg.label_formats import ClassList, write_labeled_set
from diffuseseg.errors import UserError
from diffuseseg.metrics import evaluate
from diffuseseg.segmenter import (AUTO_COMPILE_MIN_STEPS, augment_batch, load_segmenter, load_training_folders,
                                  predict_masks, save_segmenter, train_segmenter)
from diffuseseg.label_formats import builtin_classes
from diffuseseg.views import flip_lookup, hflip_masks, mirror_pairs
from diffuseseg.toy_faces import CLASS_NAMES, render_faces

C = len(CLASS_NAMES)
SMALL = dict(base_channels=8, batch_size=16, lr=1e-2, warmup=10, progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def faces16():
    train = render_faces(range(0, 64), 16)
    test = render_faces(range(1_000_200, 1_000_240), 16)
    return train, test


def test_short_training_learns_toy_faces(faces16):
    (tr_i, tr_m), (te_i, te_m) = faces16
    losses = []
    model = train_segmenter(tr_i, tr_m, C, steps=300, flip_pairs=mirror_pairs(CLASS_NAMES), seed=0,
                            callback=lambda step, loss: losses.append(loss), **SMALL)
    assert len(losses) == 300 and all(np.isfinite(losses))
    assert np.mean(losses[-15:]) < 0.4 * np.mean(losses[:15]), (losses[:15], losses[-15:])
    assert not model.training and model.train_info["steps"] == 300

    pred = predict_masks(model, te_i, batch_size=16)
    assert pred.shape == te_m.shape and pred.dtype == np.uint8
    learned = evaluate(list(pred), list(te_m), CLASS_NAMES)
    trivial = evaluate(list(np.zeros_like(te_m)), list(te_m), CLASS_NAMES)
    # all-background: 0.035 mIoU, 0.46 pixel accuracy; 300 steps reach ~0.31 and ~0.835 (seeds 0-2)
    assert learned.miou > trivial.miou + 0.2, (learned.miou, trivial.miou)
    assert learned.pixel_accuracy > trivial.pixel_accuracy + 0.3
    assert learned.per_class_iou["skin"] > 0.5 and learned.per_class_iou["hair"] > 0.4


def test_mirror_pairs_from_class_names():
    assert mirror_pairs(CLASS_NAMES) == [(3, 4)]  # l_eye <-> r_eye; "brows" and "ears" are unsided
    celeb = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear"]
    assert mirror_pairs(celeb) == [(4, 5), (6, 7), (8, 9)]
    # CelebAMask-HQ: l_lip (lower lip), ear_r (earring), neck_l (necklace) are not sides; brows, eyes, ears pair up
    names = builtin_classes("celebamask_hq").names
    assert {(names[a], names[b]) for a, b in mirror_pairs(names)} == {("l_brow", "r_brow"), ("l_eye", "r_eye"),
                                                                      ("l_ear", "r_ear")}
    assert mirror_pairs(["background", "left_hand", "right_hand"]) == [(1, 2)]
    assert mirror_pairs(["background", "l_eye"]) is None  # a sided class without partner: never flip
    assert mirror_pairs(["background", "cat", "dog"]) == []


def test_flip_swaps_mirrored_labels_on_a_hand_made_mask():
    mask = np.array([[3, 0, 0, 1, 255],
                     [4, 4, 2, 3, 0]], np.uint8)
    expected = np.array([[255, 1, 0, 0, 4],
                         [0, 4, 2, 3, 3]], np.uint8)
    np.testing.assert_array_equal(hflip_masks(mask, [(3, 4)]), expected)
    torch.testing.assert_close(hflip_masks(torch.from_numpy(mask).long(), [(3, 4)]),
                               torch.from_numpy(expected).long())
    np.testing.assert_array_equal(hflip_masks(hflip_masks(mask, [(3, 4)]), [(3, 4)]), mask)  # an involution
    with pytest.raises(ValueError):
        flip_lookup([(3, 3)])

    # the training augmentation: each sample is either untouched or mirrored with l/r swapped, image alike
    rng = np.random.default_rng(0)
    x = torch.randn(16, 3, 2, 5)
    y = torch.from_numpy(np.stack([mask] * 16)).long()
    table = torch.from_numpy(flip_lookup([(3, 4)]).astype(np.int64))
    xa, ya = augment_batch(x, y, rng, flip_table=table, scale_jitter=0.0, shift_jitter=0.0, ignore_index=255)
    flipped = [bool((ya[i] == torch.from_numpy(expected).long()).all()) for i in range(16)]
    for i in range(16):
        assert flipped[i] or bool((ya[i] == y[i]).all())
        torch.testing.assert_close(xa[i], x[i].flip(-1) if flipped[i] else x[i])
    assert 0 < sum(flipped) < 16


def test_jitter_keeps_labels_valid_and_marks_outside_pixels_ignored():
    _, masks = render_faces(range(8), 16)
    x = torch.zeros(8, 3, 16, 16)
    y = torch.from_numpy(masks.astype(np.int64))
    _, ya = augment_batch(x, y, np.random.default_rng(1), flip_table=None, scale_jitter=0.3, shift_jitter=0.3,
                          ignore_index=255)
    values = set(torch.unique(ya).tolist())
    assert values <= set(range(C)) | {255}
    assert 255 in values  # zooming out / shifting exposes pixels from outside the image
    # no jitter, no flip: the identity, exactly
    _, same = augment_batch(x, y, np.random.default_rng(1), flip_table=None, scale_jitter=0.0, shift_jitter=0.0,
                            ignore_index=255)
    assert torch.equal(same, y)


def test_same_seed_same_weights(faces16):
    (tr_i, tr_m), _ = faces16
    kw = dict(SMALL, steps=6, flip_pairs=[(3, 4)])
    a = train_segmenter(tr_i[:32], tr_m[:32], C, seed=3, **kw).state_dict()
    b = train_segmenter(tr_i[:32], tr_m[:32], C, seed=3, **kw).state_dict()
    c = train_segmenter(tr_i[:32], tr_m[:32], C, seed=4, **kw).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_save_load_round_trip(faces16, tmp_path):
    (tr_i, tr_m), (te_i, _) = faces16
    model = train_segmenter(tr_i[:16], tr_m[:16], C, steps=3, seed=0, **SMALL)
    path = save_segmenter(tmp_path / "seg" / "segmenter.pt", model, arch="unet", num_classes=C,
                          class_names=CLASS_NAMES, base_channels=8, palette=toy_classes().palette,
                          meta={"train_pairs": 16, "folders": ["a", "b"]})
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    loaded, info = load_segmenter(path)
    assert info["class_names"] == list(CLASS_NAMES) and info["arch"]["base_channels"] == 8
    assert info["meta"]["folders"] == ["a", "b"] and len(info["palette"]) == C
    before, after = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(predict_masks(model, te_i), predict_masks(loaded, te_i))

    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a segmenter file"):
        load_segmenter(tmp_path / "other.pt")
    with pytest.raises(UserError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")


def test_training_folders_must_share_the_class_list(tmp_path):
    images, masks = render_faces(range(6), 16)
    classes = toy_classes()
    real = write_labeled_set(tmp_path / "real", [f"{i:03d}" for i in range(6)], images, masks, classes)
    synth = write_labeled_set(tmp_path / "synthetic", [f"s{i:03d}" for i in range(4)], images[:4], masks[:4],
                              classes)
    x, y, cl, counts = load_training_folders([synth, real], 16, [3, 5])
    assert counts == [3, 5] and x.shape == (8, 16, 16, 3) and y.shape == (8, 16, 16)
    assert cl.names == list(CLASS_NAMES)
    np.testing.assert_array_equal(y[3:], masks[:5])

    other_names = list(CLASS_NAMES)
    other_names[3], other_names[4] = "left_eye", "right_eye"
    other = write_labeled_set(tmp_path / "other_labels", ["a", "b"], images[:2], masks[:2],
                              ClassList(other_names, classes.palette))
    with pytest.raises(DataError, match="other_labels") as err:
        load_training_folders([real, other], 16)
    assert "different class list" in str(err.value)
    with pytest.raises(DataError, match="2 caps for 3"):
        load_training_folders([real, synth, real], 16, [1, 2])


def test_compiled_training_returns_the_plain_network_and_tracks_eager(faces16):
    """segmenter.compile: the training forward runs through dynamo (aot_eager: no generated kernels); the
    returned network is the plain module and its weights stay close to the eager run's."""
    from torch._dynamo.utils import counters
    (tr_i, tr_m), _ = faces16
    kw = dict(SMALL, steps=4, flip_pairs=[(3, 4)], seed=3)
    eager = train_segmenter(tr_i[:32], tr_m[:32], C, **kw)
    counters.clear()
    compiled = train_segmenter(tr_i[:32], tr_m[:32], C, compile="default", compile_backend="aot_eager", **kw)
    assert counters["stats"]["unique_graphs"] > 0
    assert type(compiled) is type(eager) and compiled.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-4, rtol=1e-3, msg=key)


def test_a_folder_without_classes_json_takes_the_named_class_list(tmp_path):
    """The shared CelebAMask-HQ faces carry no classes.json: train_segmenter.py reads them with the config's
    labels.classes; with no list to fall back on the error names the missing file."""
    images, masks = render_faces(range(3), 16)
    real = write_labeled_set(tmp_path / "real", ["a", "b", "c"], images, masks, toy_classes())
    (real / "classes.json").unlink()
    with pytest.raises(DataError, match="classes.json"):
        load_training_folders([real], 16)
    x, y, cl, counts = load_training_folders([real], 16, None, toy_classes())
    assert counts == [3] and cl.names == list(CLASS_NAMES)
    np.testing.assert_array_equal(y, masks)


def test_auto_compile_compiles_only_long_cpu_runs_with_a_compiler(monkeypatch):
    """segmenter.compile=auto: torch.compile where it was measured to pay back (a CPU run of
    AUTO_COMPILE_MIN_STEPS or more, with a C++ compiler for inductor), eager for short runs, on GPUs and
    without a compiler; an explicit mode is kept."""
    from diffuseseg import segmenter
    monkeypatch.setattr(segmenter.shutil, "which", lambda name: "/usr/bin/" + name)
    assert segmenter.resolve_compile("auto", "cpu", AUTO_COMPILE_MIN_STEPS) == "default"
    assert segmenter.resolve_compile("auto", "cpu", AUTO_COMPILE_MIN_STEPS - 1) == "none"
    assert segmenter.resolve_compile("auto", "cuda", 10 * AUTO_COMPILE_MIN_STEPS) == "none"
    assert segmenter.resolve_compile("max-autotune", "cpu", 1) == "max-autotune"
    assert segmenter.resolve_compile("none", "cpu", 10 * AUTO_COMPILE_MIN_STEPS) == "none"
    monkeypatch.setattr(segmenter.shutil, "which", lambda name: None)
    assert segmenter.resolve_compile("auto", "cpu", 10 * AUTO_COMPILE_MIN_STEPS) == "none"
