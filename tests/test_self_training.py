"""The teacher-student step's pieces: confident pixels become pseudo-labels, the real pairs keep their share."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffuseseg.config import load_config
from diffuseseg.datasets import labeled_split
from diffuseseg.metrics import evaluate
from diffuseseg.segmenter import load_segmenter, predict_masks, predict_probabilities, train_from_config
from diffuseseg.self_training import (pseudo_masks, student_segmenter_config, student_training_set, teacher_kinds,
                                     train_student)
from diffuseseg.toy_faces import CLASS_NAMES, render_faces
from conftest import REPO, run_script, toy_split_overrides


def test_pseudo_masks_keep_the_top_class_where_the_teacher_is_sure():
    probs = torch.tensor([[[[0.7, 0.2, 0.1], [0.3, 0.35, 0.35]]]])  # (1, 1, 2, 3)
    assert pseudo_masks(probs, 0.6, 255).tolist() == [[[0, 255]]]
    assert pseudo_masks(probs, 0.0, 255).tolist() == [[[0, 1]]]  # ties: the first top class


def test_real_pairs_are_repeated_to_their_share():
    real_x, real_y = np.zeros((4, 2, 2, 3), np.uint8), np.zeros((4, 2, 2), np.uint8)
    fake_x, fake_y = np.ones((36, 2, 2, 3), np.uint8), np.ones((36, 2, 2), np.uint8)
    x, y = student_training_set(real_x, real_y, fake_x, fake_y, 0.25)  # 12 real of 48
    assert len(x) == len(y) == 48 and (x[:, 0, 0, 0] == 0).sum() == 12 and (y[:12] == 0).all()
    x, _ = student_training_set(real_x, real_y, fake_x, fake_y, 0.0)  # each real pair once
    assert len(x) == 40
    with pytest.raises(ValueError, match="real_fraction"):
        student_training_set(real_x, real_y, fake_x, fake_y, 1.0)


def test_teachers_name_the_kinds_they_average():
    assert teacher_kinds("ddpm") == ("ddpm",) and teacher_kinds("fused") == ("ddpm", "supervised")
    with pytest.raises(ValueError, match="teacher"):
        teacher_kinds("oracle")


def test_a_second_round_student_learns_from_the_first_students_confident_pixels(tmp_path):
    overrides = ["model.im_size=16", "segmenter.batch_size=4", "student.base_channels=8", "student.steps=5",
                 "student.confidence=0.3"]
    cfg = load_config(REPO / "config.yaml", overrides)
    (images, masks), unlabeled = render_faces(range(3), 16, seed=0), render_faces(range(3, 11), 16, seed=0)[0]
    first_labels = np.full((8, 16, 16), 1, np.uint8)
    first = train_student(cfg, images, masks, unlabeled, first_labels, CLASS_NAMES, progress=False)
    # At train_student's batch size (the student's segmenter batch): another batch size runs other
    # convolution shapes, whose float bits (and so a pixel at the confidence threshold) may differ on some CPUs.
    probabilities = predict_probabilities(first, unlabeled, batch_size=student_segmenter_config(cfg).batch_size)
    relabeled = pseudo_masks(probabilities, 0.3, cfg.labels.ignore_index)
    x, y = student_training_set(images, masks, unlabeled, relabeled, cfg.student.real_fraction)
    expected = train_from_config(x, y, CLASS_NAMES, student_segmenter_config(cfg), progress=False)
    second = train_student(load_config(REPO / "config.yaml", overrides + ["student.rounds=2"]), images, masks,
                           unlabeled, first_labels, CLASS_NAMES, progress=False)
    assert (relabeled != first_labels).any()  # the relabelling changes what the second student sees
    for name, tensor in expected.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_train_student_script_writes_a_student_that_scores_what_it_reports(stack, tmp_path, one_thread):
    toy, out = tmp_path / "toy", tmp_path / "student"
    overrides = stack["overrides"] + toy_split_overrides(toy, 4, 3, "test", 5) + [
        "conv_head.members=2", "conv_head.hidden=8", "conv_head.steps=3", "segmenter.steps=4",
        "segmenter.batch_size=2", "student.unlabeled=10", "student.steps=6", "student.base_channels=8",
        f"student.out_dir={out}"]
    proc = run_script("train_student.py", overrides)
    assert proc.returncode == 0, proc.stderr
    assert "-> student mIoU" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unlabeled"] == 10 and summary["labeled"] == 3 and summary["teacher"] == "ddpm"
    assert 0 <= summary["ignored_fraction"] <= 1
    cfg = load_config(REPO / "config.yaml", overrides)
    student, meta = load_segmenter(out / "student.pt")
    assert meta["arch"]["base_channels"] == 8 and meta["meta"]["segmenter_config"]["steps"] == 6  # the student's
    _, images, masks = labeled_split(cfg, "test").load()
    # Predicted as the script does (its batch size, run.threads=1: the one_thread fixture), so the figures
    # below can be compared exactly: another thread count or batch size may change float bits on some CPUs.
    assert cfg.run.threads == torch.get_num_threads() == 1
    report = evaluate(list(predict_masks(student, images, cfg.segmenter.batch_size)), list(masks), meta["class_names"])
    assert summary["student_miou"] == pytest.approx(report.miou, abs=1e-12)
    assert json.loads((out / "metrics.json").read_text())["miou"] == pytest.approx(report.miou, abs=1e-12)
    # 10 images: two rows of images, each above a row of their pseudo-labels, 8 tiles wide.
    side = cfg.model.im_size
    assert Image.open(out / "pseudo_labels.png").size == ((8 * (side + 2) + 2) * 4, (4 * (side + 2) + 2) * 4)
    assert (out / "config.yaml").is_file()
