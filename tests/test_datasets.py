"""Data layouts and training streams: folders, labeled sets, determinism, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffuseseg.config import load_config
from diffuseseg.datasets import (ImageFolder, LabeledFolder, folder_files, training_batches, training_image_files,
                                 write_toy_split)
from diffuseseg.errors import DataError
from diffuseseg.image_io import list_images, resize_center_crop
from diffuseseg.label_formats import ClassList, read_index_mask, write_labeled_set


def _write_images(root, n, size=(40, 30)):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        ext = ".png" if i % 3 else ".jpg"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(sub / f"{i}{ext}")


def test_image_folder_recursive_resized_and_center_cropped(tmp_path):
    _write_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path / "imgs", 16)
    assert len(ds) == 5 and ds[0].shape == (16, 16, 3) and ds[0].dtype == np.uint8


def test_center_crop_takes_the_middle_of_the_longer_side(tmp_path):
    """Pixels that encode their column (row) index pin the crop window: a 40 x 16 image cropped to 16 keeps
    columns 12..27, a 16 x 40 one rows 12..27, not the top-left corner."""
    ramp = (np.arange(40) * 6).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (16, 40, 3)).copy()).save(tmp_path / "imgs" / "a_wide.png")
    Image.fromarray(np.broadcast_to(ramp[:, None, None], (40, 16, 3)).copy()).save(tmp_path / "imgs" / "b_tall.png")
    ds = ImageFolder(tmp_path / "imgs", 16)
    expected = np.arange(12, 28) * 6
    np.testing.assert_array_equal(ds[0][:, :, 0], np.broadcast_to(expected[None, :], (16, 16)))
    np.testing.assert_array_equal(ds[1][:, :, 0], np.broadcast_to(expected[:, None], (16, 16)))
    # Scaled first (80 x 32 -> 40 x 16), then cropped: column pairs share a value, so the halving is exact.
    pairs = (np.arange(80) // 2 * 6).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(pairs[None, :, None], (32, 80, 3)).copy())
    out = np.asarray(resize_center_crop(img, 16, Image.NEAREST))
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(expected[None, :], (16, 16)))


def test_bad_images_fail_with_the_file_name_or_are_skipped(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    files = list_images(tmp_path / "imgs")
    bad_index = files.index(broken)
    with pytest.raises(DataError, match="broken.png.*on_bad_image=skip"):
        ImageFolder(tmp_path / "imgs", 8)[bad_index]
    with pytest.warns(UserWarning, match="broken.png"):
        assert ImageFolder(tmp_path / "imgs", 8, on_bad_image="skip")[bad_index].shape == (8, 8, 3)
    with pytest.raises(DataError, match="image folder not found"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images"):
        list_images(tmp_path / "empty")


def test_labeled_layout_round_trip(tmp_path):
    classes = ClassList(["bg", "a", "b"], np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8))
    masks = np.random.default_rng(1).integers(0, 3, (2, 8, 8)).astype(np.uint8)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    write_labeled_set(tmp_path, ["x", "y"], images, masks, classes)
    assert ClassList.read(tmp_path / "classes.json").names == ["bg", "a", "b"]
    np.testing.assert_array_equal(read_index_mask(tmp_path / "masks" / "y.png", 3), masks[1])
    with pytest.raises(DataError, match=r"y.png: \d+ pixels have class ids >= 2"):
        read_index_mask(tmp_path / "masks" / "y.png", 2)
    assert LabeledFolder(tmp_path, 8, positions=(1, 2)).names == ["y"]
    with pytest.raises(DataError, match=r"range \[0, 3\) ends past the folder's 2 labeled images"):
        LabeledFolder(tmp_path, 8, positions=(0, 3))


def test_toy_split_on_disk_matches_renderer(tmp_path):
    cfg = load_config(None, ["model.im_size=16", "data.labeled_indices=[1000000,1000005]"])
    root = write_toy_split(cfg, "labeled", tmp_path / "labeled")
    from diffuseseg.toy_faces import render_faces
    images, masks = render_faces([1000003], 16)
    np.testing.assert_array_equal(np.asarray(Image.open(root / "images" / "1000003.png")), images[0])
    np.testing.assert_array_equal(read_index_mask(root / "masks" / "1000003.png", 13), masks[0])


@pytest.mark.parametrize("source", ["toy_faces", "folder"])
def test_training_stream_is_a_function_of_step(tmp_path, source):
    _write_images(tmp_path / "imgs", 7)
    cfg = load_config(None, ["model.im_size=16", "train.batch_size=3", f"data.source={source}",
                             f"data.root={tmp_path / 'imgs'}"])
    stream = training_batches(cfg, 0)
    first = [next(stream) for _ in range(5)]
    resumed = training_batches(cfg, 3)
    assert first[0].shape == (3, 3, 16, 16) and first[0].min() >= -1 and first[0].max() <= 1
    torch.testing.assert_close(next(resumed), first[3])
    torch.testing.assert_close(next(resumed), first[4])
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("source", ["toy_faces", "folder"])
def test_worker_processes_load_the_same_training_batches(tmp_path, source):
    # Workers render/load whole steps in parallel (a GPU needs them); the stream must not change.
    _write_images(tmp_path / "imgs", 7)
    overrides = ["model.im_size=16", "train.batch_size=3", f"data.source={source}", f"data.root={tmp_path / 'imgs'}"]
    plain = training_batches(load_config(None, overrides), 2)
    workers = training_batches(load_config(None, overrides + ["data.num_workers=2"]), 2)
    for _ in range(5):
        torch.testing.assert_close(next(workers), next(plain))


def test_extra_roots_join_the_training_images_with_ranges_by_name(tmp_path):
    """data.extra_roots adds folders, each whole or a [start:stop] slice of its files sorted by name (as the
    labeled splits count them): the DDPM can train on a labeled folder's pool and val images but not its test."""
    _write_images(tmp_path / "unlabeled", 3)
    _write_images(tmp_path / "labeled", 6)
    labeled = list_images(tmp_path / "labeled")
    cfg = load_config(None, ["model.im_size=16", "train.batch_size=4", "data.source=folder",
                             f"data.root={tmp_path / 'unlabeled'}", f"data.extra_roots=['{tmp_path / 'labeled'}[1:4]']"])
    files = training_image_files(cfg)
    assert files == list_images(tmp_path / "unlabeled") + labeled[1:4]
    seen = {int(x.sum()) for _ in range(1) for x in next(training_batches(cfg, 0))}
    assert len(seen) == 4  # batches are drawn from the joined list
    with pytest.raises(DataError, match=r"labeled\[2:9\].*outside the folder's 6 images"):
        folder_files(f"{tmp_path / 'labeled'}[2:9]")
    assert folder_files(f"{tmp_path / 'labeled'}[4:]") == labeled[4:]


def test_image_folder_decodes_each_file_once(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    ds = ImageFolder(tmp_path / "imgs", 8)
    first = ds[1]
    ds.files[1].unlink()  # a second read comes from memory
    np.testing.assert_array_equal(ds[1], first)
