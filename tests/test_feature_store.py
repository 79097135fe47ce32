"""The feature store: rows match in-memory features, ignore pixels dropped, rare classes ignored."""
import time

import numpy as np
import pytest
import torch

from diffuseseg.config import ConfigError, load_config
from diffuseseg.datasets import labeled_split
from diffuseseg.errors import DataError
from diffuseseg.feature_store import FeatureStore, write_feature_store
from diffuseseg.features import FeatureSpec, RawPixelFeatures
from diffuseseg.pixel_classifier import PixelEnsemble
from diffuseseg.runtime import PrivateMemoryPeak, private_rss_mb
from diffuseseg.segmentation import (build_extractor, classify, extract, resize_masks, segment, training_mask,
                                    training_pixels, view_features, view_training_pixels)
from diffuseseg.views import resolve_views


def test_training_mask_turns_rare_classes_into_ignore():
    mask = np.zeros((256, 256), np.uint8)
    mask[0, :5] = 3        # 5 pixels: rare
    mask[5:, :] = 2        # kept
    mask[9, 9] = 255       # already ignore
    out = training_mask(mask, min_pixels=20, ignore_index=255)
    assert (out[0, :5] == 255).all() and (out[5:9, :] == 2).all() and out[9, 9] == 255 and (out[1:5] == 0).all()
    # the threshold scales with the area: 5 pixels of a 64x64 mask are ~80 at 256x256
    small = np.zeros((64, 64), np.uint8)
    small[0, :5] = 3
    small[1, :1] = 4
    out = training_mask(small, min_pixels=20, ignore_index=255)
    assert (out[0, :5] == 3).all() and out[1, 0] == 255


def test_store_round_trip_matches_in_memory_features(tmp_path):
    cfg = load_config(None, ["model.im_size=16", f"data.root={tmp_path / 'toy'}",
                             f"labels.labeled_dir={tmp_path / 'toy' / 'labeled'}", "labels.labeled_range=[0,6]",
                             "labels.num_labeled=6"])
    split = labeled_split(cfg, "labeled")
    extractor = RawPixelFeatures(16)
    store_dir = write_feature_store(tmp_path / "store", extractor, split, list(range(6)), batch_size=4,
                                    min_pixels=20, ignore_index=255, progress=False)
    assert not (tmp_path / "store.partial").exists()
    store = FeatureStore.open(store_dir)
    _, images, masks = split.load()
    x, y = training_pixels(extract(extractor, images), masks, 20, 255)
    assert store.features.dtype == np.float16 and store.features.shape == x.shape
    np.testing.assert_array_equal(store.features, x)
    np.testing.assert_array_equal(store.labels, y)
    assert store.meta["images"] == split.names and store.meta["spec"]["blocks"] == ["rgb", "xy"]
    # rewriting replaces the store atomically
    write_feature_store(store_dir, extractor, split, [0], batch_size=4, min_pixels=20, ignore_index=255,
                        progress=False)
    assert FeatureStore.open(store_dir).meta["images"] == split.names[:1]


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="run utils/extract_features.py"):
        FeatureStore.open(tmp_path / "nothing")


def test_store_holds_every_training_view(tmp_path):
    cfg = load_config(None, ["model.im_size=16", f"data.root={tmp_path / 'toy'}",
                             f"labels.labeled_dir={tmp_path / 'toy' / 'labeled'}", "labels.labeled_range=[0,4]",
                             "labels.num_labeled=4"])
    split = labeled_split(cfg, "labeled")
    extractor, views = RawPixelFeatures(16), resolve_views("flip", split.classes.names, "ensemble.train_views")
    store = FeatureStore.open(write_feature_store(tmp_path / "store", extractor, split, list(range(4)), batch_size=4,
                                                  min_pixels=20, ignore_index=255, views=views, progress=False))
    _, images, masks = split.load()
    x, y = view_training_pixels(view_features(extractor, images, views), masks, views, 20, 255)
    np.testing.assert_array_equal(store.features, x)
    np.testing.assert_array_equal(store.labels, y)
    assert store.meta["views"] == "flip" and store.meta["images"] == split.names


def test_resize_masks_samples_pixel_centres_and_upsamples_by_blocks():
    m = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    np.testing.assert_array_equal(resize_masks(m, 2), [[[5, 7], [13, 15]]])
    np.testing.assert_array_equal(resize_masks(resize_masks(m, 2), 4)[0, :2, :2], [[5, 5], [5, 5]])
    assert resize_masks(m, 4) is m


def test_a_coarser_read_out_stores_resized_labels_and_predicts_at_the_image_size(tmp_path):
    cfg = load_config(None, ["model.im_size=16", "features.label_size=8", f"data.root={tmp_path / 'toy'}",
                             f"labels.labeled_dir={tmp_path / 'toy' / 'labeled'}", "labels.labeled_range=[0,4]",
                             "labels.num_labeled=4"])
    split = labeled_split(cfg, "labeled")
    extractor = build_extractor(cfg, "raw_rgb_xy")
    assert extractor.label_size == 8 and extractor.spec.label_size == 8
    store = FeatureStore.open(write_feature_store(tmp_path / "store", extractor, split, list(range(4)), batch_size=3,
                                                  min_pixels=0, ignore_index=255, progress=False))
    _, images, masks = split.load()
    assert masks.shape[1:] == (16, 16)
    np.testing.assert_array_equal(store.labels, resize_masks(masks, 8).reshape(-1))  # 4 x 8 x 8 rows
    torch.manual_seed(0)
    ensemble = PixelEnsemble(extractor.dim, len(split.classes.names), members=2)
    seg = segment(extractor, ensemble, images, batch_size=3)
    # The read-out at its own resolution, in segment's batches of 3 images: the pixel MLP then multiplies
    # matrices of the same shapes (another row count may change float bits, and so a vote, on some CPUs).
    parts = [classify(ensemble, [extract(extractor, images[lo:lo + 3])]) for lo in range(0, len(images), 3)]
    coarse_masks = np.concatenate([p.masks for p in parts])
    coarse_scores = np.concatenate([p.image_scores for p in parts])
    assert coarse_masks.shape[1:] == (8, 8) and seg.masks.shape[1:] == seg.uncertainty.shape[1:] == (16, 16)
    np.testing.assert_array_equal(seg.masks, resize_masks(coarse_masks, 16))
    np.testing.assert_allclose(seg.image_scores, coarse_scores, rtol=1e-6)
    # Specs written before the key existed read as full resolution; a finer-than-image read-out is refused.
    old = {k: v for k, v in build_extractor(load_config(None, ["model.im_size=16"]), "raw_rgb_xy").spec.to_dict().items()
           if k != "label_size"}
    assert FeatureSpec.from_dict(old).label_size == 16
    with pytest.raises(ConfigError, match="features.label_size=32 exceeds model.im_size=16"):
        load_config(None, ["model.im_size=16", "features.label_size=32"])


@pytest.mark.skipif(private_rss_mb() is None, reason="RssAnon is Linux's: no /proc/self/status here")
def test_private_memory_peak_counts_what_the_process_holds_not_the_mapped_features_it_reads(tmp_path):
    """Why the study reports a private peak beside VmHWM: reading 256 MB of memory-mapped features adds them
    to RSS, not to the private memory; holding 256 MB of its own does."""
    path = tmp_path / "features.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1 << 27,))[::4096] = 1  # 256 MB, sparse
    with PrivateMemoryPeak(interval=0.02) as reading:
        mapped = np.load(path, mmap_mode="r")
        total = sum(float(mapped[lo:lo + (1 << 22)].sum(dtype=np.float32)) for lo in range(0, len(mapped), 1 << 22))
    assert total == len(mapped) // 4096
    assert reading.peak_mb - private_rss_mb() < 128
    with PrivateMemoryPeak(interval=0.02) as holding:
        held = np.ones(1 << 27, np.float16)  # 256 MB of its own, touched
        time.sleep(0.2)
    assert holding.peak_mb >= reading.peak_mb + 200 and held.all()
