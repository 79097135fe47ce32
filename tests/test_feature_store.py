"""The feature store: rows match in-memory features, ignore pixels dropped, rare classes ignored."""
import numpy as np
import pytest

from diffuseseg.config import load_config
from diffuseseg.datasets import labeled_split
from diffuseseg.errors import DataError
from diffuseseg.feature_store import FeatureStore, write_feature_store
from diffuseseg.features import RawPixelFeatures
from diffuseseg.segmentation import extract, training_mask, training_pixels, view_features, view_training_pixels
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
