"""Every training loop refuses NaN/inf: bad steps never update the weights, and a run that keeps
producing them stops with an error naming the step (the DDPM loop: tests/test_train_sample.py)."""
import numpy as np
import pytest
import torch

from diffuseseg.conv_head import train_conv_heads
from diffuseseg.guard import NonFiniteError
from diffuseseg.pixel_classifier import train_ensemble
from diffuseseg.segmenter import train_segmenter
from diffuseseg.toy_faces import render_faces


def test_pixel_ensemble_on_nan_features_stops_at_the_limit(one_thread):
    x = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    x[:, 1] = np.nan
    y = np.arange(256) % 3
    with pytest.raises(NonFiniteError, match=r"train pixel ensemble: non-finite loss \(nan\) at step 2, 3 bad"):
        train_ensemble(x, y, 3, members=2, progress=False, max_bad_steps=2)


def test_conv_heads_on_nan_features_stop_at_the_limit(one_thread):
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 3)).astype(np.float32)
    x[0, 2, 2, 0] = np.inf
    y = np.zeros((4, 6, 6), np.uint8)
    with pytest.raises(NonFiniteError, match="train conv heads: non-finite"):
        train_conv_heads(x, y, 2, members=1, hidden=8, steps=20, batch_size=4, progress=False, max_bad_steps=3)


def test_a_diverging_segmenter_stops_and_an_all_ignored_batch_is_not_a_fault(one_thread):
    images, masks = render_faces(range(4), 16, seed=0)
    with pytest.raises(NonFiniteError, match=r"train segmenter \(unet\): non-finite \w+ .* at step \d+"):
        train_segmenter(images, masks, 13, base_channels=4, steps=60, batch_size=2, lr=1e30, progress=False,
                        max_bad_steps=3)
    ignored = np.full_like(masks, 255)  # nothing to learn, but nothing wrong either: no error, weights unchanged
    torch.manual_seed(0)
    model = train_segmenter(images, ignored, 13, base_channels=4, steps=12, batch_size=2, progress=False,
                            max_bad_steps=0, augment=False)
    assert model.train_info["steps"] == 12
