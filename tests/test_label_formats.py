"""Real-data label formats (palette, CelebAMask-HQ, ddpm-segmentation), class mapping by name, convert_labels.py."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuseseg.datasets import LabeledFolder
from diffuseseg.errors import DataError
from diffuseseg.label_formats import ClassList, pair_readers
from diffuseseg.label_formats import (CELEBA19_CLASSES, CELEBAMASK_HQ_CLASSES, CELEBAMASK_HQ_PARTS,
                                      DIFFUSESEG_CLASSES, IGNORE_ID, builtin_classes, class_mapping,
                                      resolve_classes)

REPO = Path(__file__).resolve().parents[1]
CELEBA_SAMPLE = REPO.parent / "shared" / "data" / "celebahq64_sample"
FACE_CLASSES = ("skin", "hair", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "u_lip", "l_lip", "bg")


def _sample() -> Path:
    if not (CELEBA_SAMPLE / "images").is_dir():
        pytest.skip(f"CelebA-HQ sample not found at {CELEBA_SAMPLE} (../shared is absent in this checkout)")
    return CELEBA_SAMPLE


def _palette_folder(root: Path, n: int = 3, size: int = 8, classes: ClassList = DIFFUSESEG_CLASSES) -> np.ndarray:
    """n random (image, RGB palette mask) pairs; returns the ids (n, size, size)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(classes.names), (n, size, size)).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(classes.palette[ids[i]]).save(root / "masks" / f"im{i}.png")
    return ids


# ---------------------------------------------------------------------------------------------- palette

def test_readers_are_registered():
    assert {"index", "palette", "celebamask_hq", "ddpm_segmentation"} <= set(pair_readers())


def test_diffuseseg_sample_loads_through_the_palette_reader():
    root = _sample()
    folder = LabeledFolder(root, 64, "palette", DIFFUSESEG_CLASSES)
    names, images, masks = folder.load()
    assert len(names) == 60 and names == sorted(names)
    assert images.shape == (60, 64, 64, 3) and masks.shape == (60, 64, 64) and masks.dtype == np.uint8
    assert masks.max() < len(DIFFUSESEG_CLASSES.names)
    present = {DIFFUSESEG_CLASSES.names[i] for i in np.unique(masks)}
    assert set(FACE_CLASSES) <= present
    # exact decoding: the ids re-coloured give back the mask file
    rgb = np.asarray(Image.open(root / "masks" / f"{names[0]}.png").convert("RGB"))
    np.testing.assert_array_equal(DIFFUSESEG_CLASSES.palette[masks[0]], rgb)


def test_unknown_colour_is_reported_with_file_and_count(tmp_path):
    root = _sample()
    copy = tmp_path / "bad"
    names = sorted(p.name for p in (root / "images").glob("*.png"))[:2]
    for sub in ("images", "masks"):
        (copy / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(root / sub / n, copy / sub / n)
    rgb = np.asarray(Image.open(copy / "masks" / names[1]).convert("RGB")).copy()
    rgb[:3, :4] = (1, 2, 3)
    rgb[10, 10] = (9, 9, 9)
    Image.fromarray(rgb).save(copy / "masks" / names[1])
    folder = LabeledFolder(copy, 64, "palette", DIFFUSESEG_CLASSES)
    folder[0]  # the intact one loads
    with pytest.raises(DataError, match=r"13 pixels .*\(1, 2, 3\), \(9, 9, 9\)") as err:
        folder[1]
    assert names[1] in str(err.value)


def test_palette_mode_masks_image_without_mask_and_size_mismatch(tmp_path):
    ids = _palette_folder(tmp_path / "p")
    # a "P" (indexed) PNG whose palette holds the class colours reads the same as RGB
    p_img = Image.fromarray(ids[0], mode="P")
    p_img.putpalette(DIFFUSESEG_CLASSES.palette.reshape(-1).tolist())
    p_img.save(tmp_path / "p" / "masks" / "im0.png")
    _, _, masks = LabeledFolder(tmp_path / "p", 8, "palette", DIFFUSESEG_CLASSES).load()
    np.testing.assert_array_equal(masks, ids)

    (tmp_path / "p" / "masks" / "im2.png").unlink()
    with pytest.raises(DataError, match="image\\(s\\) without a mask.*im2"):
        LabeledFolder(tmp_path / "p", 8, "palette", DIFFUSESEG_CLASSES)

    Image.fromarray(DIFFUSESEG_CLASSES.palette[np.zeros((6, 8), np.uint8)]).save(tmp_path / "p" / "masks" / "im2.png")
    with pytest.raises(DataError, match=r"im2.png is 8x6 but its image .*im2.png is 8x8"):
        LabeledFolder(tmp_path / "p", 8, "palette", DIFFUSESEG_CLASSES)[2]


# ---------------------------------------------------------------------------------------------- CelebAMask-HQ

def _celebamask_folder(root: Path) -> None:
    """Images 1 and 2003 (32 px) with 16 px part masks in folders 0/ and 1/."""
    (root / "CelebA-HQ-img").mkdir(parents=True)
    for k in (1, 2003):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "CelebA-HQ-img" / f"{k}.jpg")

    def part(k, name, rows, cols, rgb=False):
        on = np.zeros((16, 16), np.uint8)
        on[rows, cols] = 255
        d = root / "CelebAMask-HQ-mask-anno" / str(k // 2000)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([on] * 3, -1) if rgb else on).save(d / f"{k:05d}_{name}.png")

    part(1, "skin", slice(0, 16), slice(0, 16))
    part(1, "hair", slice(0, 8), slice(0, 16), rgb=True)    # overwrites skin (painted later)
    part(1, "nose", slice(0, 12), slice(6, 10))             # painted before hair: hair wins on rows 0-7
    part(1, "neck_l", slice(12, 16), slice(0, 16))
    part(1, "neck", slice(14, 16), slice(0, 16))            # neck after neck_l: wins on rows 14-15
    part(2003, "cloth", slice(8, 16), slice(0, 16))


def test_celebamask_hq_parts_painted_in_official_order(tmp_path):
    _celebamask_folder(tmp_path)
    cmhq = CELEBAMASK_HQ_CLASSES.names
    classes = resolve_classes("", tmp_path, "celebamask_hq")  # no classes.json: the official 19
    assert classes.names == cmhq and cmhq[1:] == list(CELEBAMASK_HQ_PARTS)
    folder = LabeledFolder(tmp_path, 32, "celebamask_hq", classes)
    assert folder.names == ["00001", "02003"]
    mask = folder.pairs[0].read_mask()
    assert mask.shape == (32, 32)  # the 16 px parts are scaled to the image with nearest neighbour
    expect = np.zeros((16, 16), np.uint8)
    expect[:, :] = cmhq.index("skin")
    expect[0:12, 6:10] = cmhq.index("nose")
    expect[0:8, :] = cmhq.index("hair")
    expect[12:16, :] = cmhq.index("neck_l")
    expect[14:16, :] = cmhq.index("neck")
    np.testing.assert_array_equal(mask, expect.repeat(2, 0).repeat(2, 1))
    other = folder[1].mask
    assert set(np.unique(other)) == {0, cmhq.index("cloth")}

    # the same folder read with ddpm-segmentation's celeba_19 ids, by name
    m19 = LabeledFolder(tmp_path, 16, "celebamask_hq", CELEBA19_CLASSES)[0].mask
    assert CELEBA19_CLASSES.names[m19[0, 0]] == "hair" and CELEBA19_CLASSES.names[m19[15, 0]] == "neck"


def test_celebamask_hq_part_without_image_and_bad_names(tmp_path):
    _celebamask_folder(tmp_path)
    stray = tmp_path / "CelebAMask-HQ-mask-anno" / "0" / "00007_skin.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(stray)
    with pytest.raises(DataError, match="00007_skin.png has no image"):
        LabeledFolder(tmp_path, 16, "celebamask_hq", CELEBAMASK_HQ_CLASSES)
    stray.rename(stray.with_name("00001_beard.png"))
    with pytest.raises(DataError, match="00001_beard.png: expected"):
        LabeledFolder(tmp_path, 16, "celebamask_hq", CELEBAMASK_HQ_CLASSES)


# ---------------------------------------------------------------------------------------------- ddpm-segmentation

def test_ddpm_segmentation_layout(tmp_path):
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(12, 10)] * 2):
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    good = rng.integers(0, 19, (12, 10))
    np.save(tmp_path / "0.npy", good.astype(np.uint8))
    np.save(tmp_path / "1.npy", good.astype(np.int64))  # integer dtypes cast losslessly, as the official loader
    folder = LabeledFolder(tmp_path, 10, "ddpm_segmentation", CELEBA19_CLASSES)
    np.testing.assert_array_equal(folder.pairs[1].read_mask(), good)
    assert folder.pairs[1].read_mask().dtype == np.uint8

    for bad, pattern in [(good.astype(np.float32), "dtype float32"), (good[..., None].astype(np.uint8), r"2-D .*\(12, 10, 1\)"),
                         (good[:, :9].astype(np.uint8), r"\(12, 9\).*10x12"), (good.astype(np.uint8) + 19, "outside 0..18")]:
        np.save(tmp_path / "1.npy", bad)
        with pytest.raises(DataError, match=pattern) as err:
            folder[1]
        assert "1.npy" in str(err.value)

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "2.jpg")
    with pytest.raises(DataError, match=r"without a .npy label map.*2.jpg"):
        LabeledFolder(tmp_path, 10, "ddpm_segmentation", CELEBA19_CLASSES)


# ---------------------------------------------------------------------------------------------- class mapping

def test_class_mapping_round_trips_and_reports():
    there, report = class_mapping(DIFFUSESEG_CLASSES, CELEBAMASK_HQ_CLASSES)
    back, _ = class_mapping(CELEBAMASK_HQ_CLASSES, DIFFUSESEG_CLASSES)
    names = DIFFUSESEG_CLASSES.names
    for i, name in enumerate(names):
        expect = "ear_r" if name == "earring" else name  # CelebAMask-HQ's ear_r is the earring
        assert names[back[there[i]]] == expect
    text = "\n".join(report)
    assert "necklace" in text and "neck_l" in text and "earring" in text and "synonym" in text
    assert "bg" in text and "background" in text

    a, _ = class_mapping(CELEBA19_CLASSES, CELEBAMASK_HQ_CLASSES)
    b, _ = class_mapping(CELEBAMASK_HQ_CLASSES, CELEBA19_CLASSES)
    np.testing.assert_array_equal(b[a[:19]], np.arange(19))
    assert a[19:].tolist() == [IGNORE_ID] * (256 - 19)

    no_hat = ClassList(["bg", "skin", "hair"], np.zeros((3, 3), np.uint8))
    lut, report = class_mapping(CELEBAMASK_HQ_CLASSES, no_hat)
    assert lut[CELEBAMASK_HQ_CLASSES.names.index("hat")] == IGNORE_ID and lut[0] == 0
    assert any("hat" in line and "NO COUNTERPART" in line for line in report)
    lut, _ = class_mapping(CELEBAMASK_HQ_CLASSES, no_hat, unmapped="background")
    assert lut[CELEBAMASK_HQ_CLASSES.names.index("hat")] == 0


def test_builtin_class_lists():
    assert len(DIFFUSESEG_CLASSES.names) == 20 and len(CELEBAMASK_HQ_CLASSES.names) == 19
    assert CELEBA19_CLASSES.names[0] == "background"
    assert CELEBA19_CLASSES.names[1:] == sorted(CELEBA19_CLASSES.names[1:])  # official order: alphabetical
    assert set(CELEBA19_CLASSES.names) == set(CELEBAMASK_HQ_CLASSES.names)
    for c in (DIFFUSESEG_CLASSES, CELEBAMASK_HQ_CLASSES, CELEBA19_CLASSES):
        assert c.palette.shape == (len(c.names), 3) and len({tuple(p) for p in c.palette}) == len(c.names)
    assert builtin_classes("diffuseseg").names[19] == "bg"
    with pytest.raises(DataError, match="unknown built-in"):
        builtin_classes("ffhq")


# ---------------------------------------------------------------------------------------------- convert_labels.py

def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "utils" / "convert_labels.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_convert_labels_end_to_end(tmp_path):
    ids = _palette_folder(tmp_path / "src")
    no_hat = {"names": ["background", "skin", "hair"], "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]]}
    (tmp_path / "small.json").write_text(json.dumps(no_hat))

    out = _run(tmp_path / "src", tmp_path / "cmhq", "--format", "palette", "--from", "diffuseseg",
               "--to", "celebamask_hq")
    assert out.returncode == 0, out.stderr
    assert "necklace" in out.stdout and "wrote 3 images" in out.stdout
    lut, _ = class_mapping(DIFFUSESEG_CLASSES, CELEBAMASK_HQ_CLASSES)
    _, _, masks = LabeledFolder(tmp_path / "cmhq", 8, "index").load()  # native layout with classes.json
    np.testing.assert_array_equal(masks, lut[ids])
    assert json.loads((tmp_path / "cmhq" / "classes.json").read_text())["names"] == CELEBAMASK_HQ_CLASSES.names

    out = _run(tmp_path / "cmhq", tmp_path / "small", "--format", "index", "--to", tmp_path / "small.json",
               "--unmapped", "background")
    assert out.returncode == 0, out.stderr
    assert "NO COUNTERPART -> background" in out.stdout and "pixels had no counterpart" in out.stdout
    _, _, small = LabeledFolder(tmp_path / "small", 8, "index").load()
    src_names = [DIFFUSESEG_CLASSES.names[i] for i in ids.reshape(-1)]
    expect = [{"skin": 1, "hair": 2}.get(n, 0) for n in src_names]
    np.testing.assert_array_equal(small.reshape(-1), expect)

    out = _run(tmp_path / "cmhq", tmp_path / "small", "--format", "index", "--to", "celeba19")
    assert out.returncode == 2 and "not empty" in out.stderr and "Traceback" not in out.stderr
