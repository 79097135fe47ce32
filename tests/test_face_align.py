"""Finding and aligning faces (issue 43): the geometry on hand-made inputs, then the whole path on real faces."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuseseg.face_align import (LANDMARKS, Canonical, Similarity, canonical_landmarks, faces_in_mask,
                                   fit_similarity, framing_similarity, landmarks_from_mask, paste_back,
                                   random_scenes, warp_face)
from diffuseseg.image_io import frame, framing
from diffuseseg.label_formats import builtin_classes

NAMES = builtin_classes("celebamask_hq").names
ID = {n: i for i, n in enumerate(NAMES)}


def _face_mask(side: int = 64, eyes=((24, 30), (40, 30)), nose=(32, 37), mouth=(32, 48), swap_eyes=False) -> np.ndarray:
    """A cartoon face mask: a skin disc with two eye squares, a nose and a mouth (x, y centres)."""
    yy, xx = np.mgrid[:side, :side]
    mask = np.zeros((side, side), np.uint8)
    mask[(xx - side / 2) ** 2 + (yy - side * 0.6) ** 2 < (side * 0.33) ** 2] = ID["skin"]
    left, right = ("l_eye", "r_eye") if swap_eyes else ("r_eye", "l_eye")  # the person's right is the image left
    for (x, y), name in zip(eyes, (left, right)):
        mask[y - 2:y + 2, x - 2:x + 2] = ID[name]
    mask[nose[1] - 2:nose[1] + 2, nose[0] - 1:nose[0] + 1] = ID["nose"]
    mask[mouth[1] - 1:mouth[1] + 2, mouth[0] - 4:mouth[0] + 4] = ID["u_lip"]
    return mask


def test_fit_similarity_recovers_a_known_transform_and_compositions_agree():
    truth = Similarity(2.5, math.radians(20), 13.0, -4.0)
    src = np.array([[10.0, 12.0], [30.0, 12.0], [20.0, 25.0], [20.0, 36.0]])
    fit = fit_similarity(src, truth.apply(src))
    assert fit.scale == pytest.approx(2.5) and fit.angle == pytest.approx(math.radians(20))
    assert (fit.tx, fit.ty) == pytest.approx((13.0, -4.0))
    np.testing.assert_allclose(truth.invert(truth.apply(src)), src, atol=1e-9)
    outer = Similarity(0.5, -0.3, 2.0, 1.0)
    np.testing.assert_allclose(truth.then(outer).apply(src), outer.apply(truth.apply(src)), atol=1e-9)
    with pytest.raises(ValueError, match="two distinct points"):
        fit_similarity(src[:1], src[:1])


def test_landmarks_order_the_eyes_by_position_not_by_their_labels():
    """CelebAMask-HQ swaps l_eye / r_eye in some masks: the landmarks must not care."""
    plain, swapped = landmarks_from_mask(_face_mask(), NAMES), landmarks_from_mask(_face_mask(swap_eyes=True), NAMES)
    np.testing.assert_allclose(plain, swapped)
    assert plain[0, 0] < plain[1, 0]  # eye_image_left first
    # upside down (rotated 180 degrees): the eye on the image's right is now the face's left eye
    flipped = landmarks_from_mask(_face_mask()[::-1, ::-1].copy(), NAMES)
    np.testing.assert_allclose(flipped[0], 64 - plain[0], atol=1e-9)
    assert flipped[0, 0] > flipped[1, 0]
    missing = landmarks_from_mask(np.where(_face_mask() == ID["nose"], ID["skin"], _face_mask()), NAMES)
    assert np.isnan(missing[LANDMARKS.index("nose")]).all() and not np.isnan(missing[0]).any()


def test_canonical_framing_is_the_mean_of_the_training_masks():
    masks = np.stack([_face_mask(), _face_mask(eyes=((22, 30), (42, 30)))])
    c = canonical_landmarks(masks, NAMES)
    assert c.faces == 2
    np.testing.assert_allclose(c.mean[0], [23 / 64, 30 / 64])
    np.testing.assert_allclose(c.std[0], [1 / 64, 0], atol=1e-12)
    np.testing.assert_allclose(Canonical.from_dict(c.to_dict()).mean, c.mean, atol=1e-5)


def test_two_blobs_are_two_faces_with_their_own_landmarks():
    scene = np.concatenate([_face_mask(), _face_mask()], axis=1)
    faces = faces_in_mask(scene, NAMES)
    assert len(faces) == 2
    xs = sorted(f[0][0, 0] for f in faces)
    assert xs == pytest.approx([24.0, 88.0])


def test_warp_face_with_the_plain_framing_is_the_plain_resize():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((192, 192), Image.BICUBIC)
    where = framing(photo.size, 64, "center")
    np.testing.assert_array_equal(warp_face(photo, framing_similarity(where), 64), np.asarray(frame(photo, where)))
    # shifted by whole crop pixels: the same picture, moved, with the fill where the photo ends
    moved = warp_face(photo, Similarity(3.0, 0.0, 30.0, 0.0), 64)
    np.testing.assert_array_equal(moved[:, :54], np.asarray(frame(photo, where))[:, 10:])
    assert (moved[:, 55:] == 128).all()


def test_paste_back_rotates_the_crops_mask_onto_the_photo():
    """A crop whose class map is a cartoon face, pasted onto a photo with a 90-degree turn and a 2x scale:
    the photo's mask is the map turned and scaled; pixels outside the crop keep the background."""
    crop_mask = _face_mask(32, eyes=((12, 15), (20, 15)), nose=(16, 19), mouth=(16, 24))
    probs = torch.nn.functional.one_hot(torch.from_numpy(crop_mask).long(), len(NAMES)).float()
    # crop -> photo: rotate +90 degrees (x, y) -> (-y, x), scale 2, then move into a 80 x 64 photo
    where = Similarity(2.0, math.pi / 2, 64.0, 0.0)
    best = np.full((64, 80), -1.0, np.float32)
    labels = np.zeros((64, 80), np.uint8)
    paste_back(probs, where, 32, best, labels)
    expected = np.rot90(np.kron(crop_mask, np.ones((2, 2), np.uint8)), k=-1)  # clockwise on screen (y down)
    np.testing.assert_array_equal(labels[:, :64], expected)
    assert (labels[:, 64:] == 0).all() and (best[:, 64:] == -1).all()


def test_random_scenes_are_seeded_and_hold_the_faces_parts():
    masks = np.stack([_face_mask(128, eyes=((48, 60), (80, 60)), nose=(64, 74), mouth=(64, 96))] * 3)
    images = np.stack([np.full((128, 128, 3), 200, np.uint8)] * 3)
    a = random_scenes(images, masks, 6, 64, seed=3)
    b = random_scenes(images, masks, 6, 64, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (6, 64, 64, 3) and a[1].shape == (6, 64, 64)
    assert set(np.unique(a[1])) <= set(np.unique(masks)) and (a[1] == ID["skin"]).any()
