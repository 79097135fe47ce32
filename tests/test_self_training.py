"""The teacher-student step's pieces: confident pixels become pseudo-labels, the real pairs keep their share."""
import numpy as np
import pytest
import torch

from diffuseseg.self_training import pseudo_masks, student_training_set, teacher_kinds


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
