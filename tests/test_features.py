"""Pixel features: the recorded DiffuseSeg features are reproduced; layout and noise rules hold."""
import dataclasses

import pytest
import torch

from diffuseseg.config import ModelConfig
from diffuseseg.diffusion import NoiseSchedule
from diffuseseg.features import FeatureExtractor, FeatureSpec, feature_noise
from diffuseseg.unet import UNet, model_config_from_diffuseseg


def test_reproduces_fixture_features(seed_fixture):
    model = UNet(model_config_from_diffuseseg(seed_fixture["unet_config"]))
    model.load_state_dict(seed_fixture["unet_state_dict"])
    extractor = FeatureExtractor(model, NoiseSchedule(), seed_fixture["feature_timesteps"], ["ups.0", "ups.1", "ups.2"])
    assert extractor.dim == 120
    features = extractor(seed_fixture["x"], noise=seed_fixture["feature_noise"])
    # Absolute 1e-5, as the README promises (measured: 4-6e-6 at 1-2 threads); rtol=0, because values reach
    # ~2.5 and rtol=1e-4 would let errors of 2.5e-4 through.
    torch.testing.assert_close(features, seed_fixture["features"], atol=1e-5, rtol=0)


def _small_extractor(**kw) -> FeatureExtractor:
    cfg = ModelConfig(im_size=16, down_channels=[8, 16, 16], mid_channels=[16, 16], down_sample=[True, True],
                      attention=[False, True], time_emb_dim=16, out_block_channels=8)
    return FeatureExtractor(UNet(cfg), NoiseSchedule(), kw.pop("timesteps", [5, 50]), kw.pop("blocks", ["ups.0", "ups.1"]), **kw)


def test_timestep_major_layout_matches_separate_passes():
    ex = _small_extractor()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    both = ex(x)
    assert both.shape == (3, ex.dim, 16, 16) and ex.dim == 2 * (8 + 8)
    for i, t in enumerate(ex.timesteps):
        single = _small_extractor(timesteps=[t])
        single.model.load_state_dict(ex.model.state_dict())
        torch.testing.assert_close(both[:, i * 16:(i + 1) * 16], single(x), atol=1e-5, rtol=1e-4)


def test_noise_modes_and_batch_independence():
    shared = feature_noise((3, 8, 8), "shared", 1, [0, 1, 2])
    assert torch.equal(shared[0], shared[2])
    per = feature_noise((3, 8, 8), "per_image", 1, [0, 1, 2])
    assert not torch.equal(per[0], per[1])
    torch.testing.assert_close(feature_noise((3, 8, 8), "per_image", 1, [2])[0], per[2])
    ex = _small_extractor(noise="per_image")
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(ex(x, keys=[10, 11, 12, 13])[2:], ex(x[2:], keys=[12, 13]), atol=1e-5, rtol=1e-4)


def test_label_size_and_spec_round_trip():
    ex = _small_extractor(label_size=32, checkpoint_sha256="abc")
    assert ex(torch.zeros(1, 3, 16, 16)).shape[-2:] == (32, 32)
    spec = FeatureSpec.from_dict(ex.spec.to_dict())
    assert spec == ex.spec
    other = dataclasses.replace(spec, timesteps=(5,))
    assert spec.differences(other) == ["timesteps: (5, 50) != (5,)"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        _small_extractor(timesteps=[5000])
    with pytest.raises(KeyError, match="ups.7"):
        _small_extractor(blocks=["ups.7"])


def test_blocks_are_concatenated_in_the_listed_order():
    """features.blocks order is the feature layout (a read-out trained on one order is wrong on another):
    listed ["ups.1", "ups.0"], the first 8 channels of each timestep are ups.1's."""
    listed = _small_extractor(timesteps=[5], blocks=["ups.1", "ups.0"])
    alone = {name: _small_extractor(timesteps=[5], blocks=[name]) for name in ("ups.0", "ups.1")}
    for ex in alone.values():
        ex.model.load_state_dict(listed.model.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    features = listed(x)
    torch.testing.assert_close(features[:, :8], alone["ups.1"](x), atol=0, rtol=0)
    torch.testing.assert_close(features[:, 8:], alone["ups.0"](x), atol=0, rtol=0)


def test_compiled_feature_pass_gives_the_eager_features():
    """features.compile: the U-Net's feature pass runs through dynamo (aot_eager: traced graphs, no generated
    kernels, which take minutes on a CPU) and gives the eager features."""
    from torch._dynamo.utils import counters
    eager = _small_extractor()
    compiled = _small_extractor(compile="default", compile_backend="aot_eager")
    compiled.model.load_state_dict(eager.model.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    counters.clear()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] > 0
