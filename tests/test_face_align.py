"""Finding and aligning faces (issue 43): the geometry on hand-made inputs, then the whole path on real faces."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuseseg.face_align import (LANDMARKS, Canonical, Similarity, align_faces, canonical_landmarks,
                                   faces_in_mask, fit_similarity, fit_to_canonical, framing_similarity,
                                   landmarks_from_mask, paste_back, random_scenes, soft_landmarks, warp_face)
from diffuseseg.errors import DataError
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


def test_a_transform_fit_to_the_eyes_and_mouth_ignores_the_nose():
    """``fit``: the landmarks a transform is fit to, on the training faces as on a photo's (the nose moves with
    a turned head); a framing file says which, one written before the key fits all four, and a face that shows
    too few of them falls back to every landmark it shows."""
    masks = np.stack([_face_mask(), _face_mask(nose=(36, 37))])
    eyes_mouth = ("eye_image_left", "eye_image_right", "mouth")
    c = canonical_landmarks(masks, NAMES, fit=eyes_mouth)
    assert c.fit == eyes_mouth and c.spread[2] == pytest.approx(0, abs=1e-9)  # the faces differ in the nose alone
    assert canonical_landmarks(masks, NAMES).spread[2] > 0.005
    found = c.at(64) * 2 + 5  # the mean face at twice the size, shifted...
    found[LANDMARKS.index("nose")] += 7  # ...with its nose turned aside
    where = fit_to_canonical(found, c, 64)
    assert (where.scale, where.angle, where.tx, where.ty) == pytest.approx((2, 0, 5, 5))
    assert fit_to_canonical(found, canonical_landmarks(masks, NAMES), 64).tx != pytest.approx(5)
    few = c.at(64) * 2 + 5
    few[[1, 3]] = np.nan  # one eye and the nose left: both are used
    assert fit_to_canonical(few, c, 64).scale == pytest.approx(2)
    assert Canonical.from_dict(c.to_dict()).fit == eyes_mouth
    assert Canonical.from_dict({k: v for k, v in c.to_dict().items() if k != "fit_to"}).fit == LANDMARKS
    with pytest.raises(DataError, match="two or more of"):
        canonical_landmarks(masks, NAMES, fit=["nose", "chin"])


def _one_hot(mask: np.ndarray) -> np.ndarray:
    return np.eye(len(NAMES), dtype=np.float32)[mask]


def test_soft_landmarks_follow_the_parts_probability_between_pixels():
    mask = _face_mask()
    probs = _one_hot(mask)
    region = np.ones(mask.shape, bool)
    np.testing.assert_allclose(soft_landmarks(probs, mask, NAMES, region), landmarks_from_mask(mask, NAMES))
    # the column right of the image-left eye (x 22..25, y 28..31) is 0.3 eye: too little to win the argmax
    probs[28:32, 26] = 0
    probs[28:32, 26, ID["r_eye"]], probs[28:32, 26, ID["skin"]] = 0.3, 0.7
    marks = soft_landmarks(probs, mask, NAMES, region)
    # by hand: 16 pixels of weight 1 at x = 24.0 on average, 4 of weight 0.3 at x = 26.5
    assert marks[0] == pytest.approx(((16 * 24.0 + 4 * 0.3 * 26.5) / 17.2, 30.0))
    np.testing.assert_allclose(marks[1:], landmarks_from_mask(mask, NAMES)[1:])
    # either eye's probability counts (labels swap); the other eye, 16 px away, lies outside the reach
    probs[28:32, 26, ID["r_eye"]], probs[28:32, 26, ID["l_eye"]] = 0, 0.3
    assert soft_landmarks(probs, mask, NAMES, region)[0] == pytest.approx(marks[0])


def test_the_refiner_places_the_aligned_faces_landmarks():
    """align_faces: the finder finds, the refiner's parse of the aligned crop sets the final landmarks."""
    face = _face_mask()
    canonical = canonical_landmarks(np.stack([face, face]), NAMES)
    moved = np.roll(face, 3, axis=1)  # what the refiner sees: the same face 3 px to the right
    finder = lambda images: torch.from_numpy(_one_hot(face))[None].expand(len(images), -1, -1, -1)
    refiner = lambda images: torch.from_numpy(_one_hot(moved))[None].expand(len(images), -1, -1, -1)
    photo = Image.new("RGB", (64, 64))
    by_finder = align_faces([photo], finder, NAMES, canonical, 64, refine=1)[0][0]
    by_refiner, again = align_faces([photo, photo], finder, NAMES, canonical, 64, refine=1, refiner=(refiner, NAMES))
    assert len(by_refiner) == len(again) == 1  # one face each, the two photos' faces refined in one batch
    by_refiner = by_refiner[0]
    np.testing.assert_allclose(by_finder.landmarks, landmarks_from_mask(face, NAMES), atol=1e-6)
    np.testing.assert_allclose(by_refiner.landmarks, landmarks_from_mask(face, NAMES) + [3, 0], atol=1e-6)
    assert by_refiner.where.tx == pytest.approx(3) and by_refiner.where.scale == pytest.approx(1)


def test_a_lone_face_the_refiner_finds_in_the_plain_framing_keeps_it_within_the_band():
    """segment.snap_plain_sd: the refiner's parse of the photo's plain framing is a second opinion. A face it
    sees 3 px off centre (10 of the training faces' standard deviations) keeps the plain framing with a band of
    12, not with 6 or 0; one it sees 20 % larger (beyond snap_sd in scale) or without an eye never does."""
    import dataclasses
    face = _face_mask()
    canonical = dataclasses.replace(canonical_landmarks(np.stack([face, face]), NAMES),
                                    spread=np.array([0.043, 0.022, 0.0045, 0.0055]))  # the real faces' spread
    finder = lambda images: torch.from_numpy(_one_hot(face))[None].expand(len(images), -1, -1, -1)
    photo = Image.new("RGB", (64, 64))
    plain = [framing(photo.size, 64, "center")]

    def framed(seen: np.ndarray, band: float):
        refiner = lambda images: torch.from_numpy(_one_hot(seen))[None].expand(len(images), -1, -1, -1)
        [found] = align_faces([photo], finder, NAMES, canonical, 64, refiner=(refiner, NAMES), plain=plain,
                              snap_plain_sd=band)[0]
        return found

    shifted = np.roll(face, 3, axis=1)
    assert [framed(shifted, band).snapped for band in (0, 6, 12)] == [False, False, True]
    kept = framed(shifted, 12)
    np.testing.assert_allclose(kept.landmarks, landmarks_from_mask(face, NAMES) + [3, 0], atol=1e-6)
    assert kept.pose[2] == pytest.approx(3 / 64) and kept.where == framing_similarity(plain[0])
    larger = _face_mask(eyes=((22, 29), (42, 29)), nose=(32, 37), mouth=(32, 50))
    assert not framed(larger, 100).snapped
    one_eye = face.copy()
    one_eye[one_eye == ID["l_eye"]] = ID["skin"]
    assert not framed(np.roll(one_eye, 3, axis=1), 100).snapped


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
    # shifted by whole crop pixels: the same picture, moved; where the photo ends, its last column continued
    moved = warp_face(photo, Similarity(3.0, 0.0, 30.0, 0.0), 64)
    np.testing.assert_array_equal(moved[:, :54], np.asarray(frame(photo, where))[:, 10:])
    np.testing.assert_array_equal(moved[:, 54:], np.repeat(moved[:, 53:54], 10, axis=1))
    # or a flat colour, where one is asked for
    assert (warp_face(photo, Similarity(3.0, 0.0, 30.0, 0.0), 64, fill=(128, 128, 128))[:, 55:] == 128).all()
    # turned 90 degrees about the photo's middle and cut by its top: every pixel outside is its nearest one inside
    turned = warp_face(photo, Similarity(3.0, math.pi / 2, 288.0, -30.0), 64)
    assert not (turned == 128).all(-1).any()


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


# ----------------------------------------------------------------------------------------------
# the whole path on real faces (the bundled read-out and finder; skipped where ../shared is absent)

from conftest import REPO, SHARED, run_script  # noqa: E402

PRESET = REPO / "configs" / "celebamask_hq64.yaml"
FACES = SHARED / "data" / "celebamask_hq_ce" / "labeled"


@pytest.fixture
def real_faces(monkeypatch):
    if not (FACES / "masks").is_dir():
        pytest.skip(f"CelebAMask-HQ faces not found at {FACES} (../shared is absent in this checkout)")
    monkeypatch.chdir(REPO)
    from diffuseseg.config import load_config
    from diffuseseg.datasets import labeled_split
    cfg = load_config(PRESET, ["labels.val_range=[200,206]"])
    return cfg, labeled_split(cfg, "val")  # tuning faces: never the test faces these figures are judged on


def _face(split, i: int, side: int) -> tuple[Image.Image, np.ndarray]:
    from diffuseseg.image_io import open_rgb
    pair = split.pairs[i]
    return (open_rgb(pair.image_path).resize((side, side), Image.BICUBIC),
            np.asarray(Image.fromarray(pair.read_mask()).resize((side, side), Image.NEAREST)))


def test_segment_finds_two_faces_in_one_photo_and_says_so_where_there_is_none(real_faces, tmp_path):
    cfg, split = real_faces
    photos = tmp_path / "photos"
    photos.mkdir()
    (a, _), (b, _) = _face(split, 0, 96), _face(split, 1, 96)
    pair = Image.new("RGB", (192, 96))
    pair.paste(a, (0, 0))
    pair.paste(b, (96, 0))
    pair.save(photos / "pair.png")
    Image.new("RGB", (80, 60), (90, 140, 200)).save(photos / "sky.png")
    out = tmp_path / "out"
    proc = run_script("segment.py", ["run.threads=1", f"segment.input_dir={photos}", f"segment.out_dir={out}"],
                      "--config", str(PRESET))
    assert proc.returncode == 0, proc.stderr
    assert f"{photos / 'sky.png'}: no face found" in proc.stdout
    mask = np.asarray(Image.open(out / "masks" / "pair.png"))
    assert mask.shape == (96, 192)
    faces = json.loads((out / "faces" / "pair.json").read_text())["faces"]
    assert len(faces) == 2
    assert sorted(f["box"][0] < 96 for f in faces) == [False, True]  # one face in each half
    assert (mask[:, :96] == 1).mean() > 0.15 and (mask[:, 96:] == 1).mean() > 0.15
    sky = np.asarray(Image.open(out / "masks" / "sky.png"))
    assert sky.shape == (60, 80) and (sky == 0).all()
    assert json.loads((out / "faces" / "sky.json").read_text())["faces"] == []


def test_a_tilted_face_comes_back_with_its_mask_tilted(real_faces, one_thread):
    from diffuseseg.metrics import evaluate
    from diffuseseg.photo_faces import face_segmenter
    from diffuseseg.segmentation import configured_views, load_trained_stack
    cfg, split = real_faces
    extractor, readout, classes = load_trained_stack(cfg)
    views = configured_views(cfg, classes.names, "test")
    aligned = face_segmenter(cfg, extractor, readout, classes, views)
    cfg.segment.align = "none"
    plain = face_segmenter(cfg, extractor, readout, classes, views)
    plain.align_faces = False
    photos, truths = [], []
    for i in range(4):
        image, mask = _face(split, i, 128)
        photos.append(image.rotate(30, Image.BICUBIC, fillcolor=(128, 128, 128)))
        truths.append(np.asarray(Image.fromarray(mask).rotate(30, Image.NEAREST, fillcolor=255)))
    found = aligned.segment(photos)
    assert [len(r.faces) for r in found] == [1, 1, 1, 1]
    angles = [r.faces[0].where.to_dict()["angle_deg"] for r in found]
    assert all(20 < -a < 40 for a in angles), angles  # PIL turns counter-clockwise on screen: y points down
    score = evaluate([r.mask for r in found], truths, classes.names, 255).miou
    before = evaluate([np.where(r.mask == 255, 0, r.mask) for r in plain.segment(photos)], truths, classes.names,
                      255).miou
    assert score > before + 0.15, (score, before)


def test_the_photo_paths_crops_lie_where_the_truth_masks_landmarks_put_them(real_faces):
    """robustness.landmark_errors: the preset's finder and refiner place each val face's crop within a few percent
    of the crop fit to its truth mask's landmarks, on photos as they are and tilted (a broken composition of the
    transforms would be off by the tilt itself, 30 degrees)."""
    from diffuseseg.photo_faces import load_canonical, load_finder, load_refiner
    from diffuseseg.robustness import landmark_errors, landmark_table
    cfg, split = real_faces
    finder, names = load_finder(cfg, None, None, None, None)
    refiners = {"finder": None, "judge": load_refiner(cfg, None, None, None, None)}
    errors = landmark_errors(split, finder, names, refiners, load_canonical(cfg), cfg.model.im_size, 255,
                             variants=("as_is", "rotate_30"))
    for rows in errors.values():
        for e in rows.values():
            assert e.shape == (6, 4) and not np.isnan(e).any()
            assert np.median(np.abs(e[:, 0])) < 0.08 and np.degrees(np.median(np.abs(e[:, 1]))) < 4
            assert np.median(np.hypot(e[:, 2], e[:, 3])) < 0.02
    assert "| rotate_30 | judge |" in landmark_table(errors)
    with pytest.raises(ValueError, match="one face per photo"):
        landmark_errors(split, finder, names, refiners, load_canonical(cfg), 64, 255, variants=("two_faces",))
