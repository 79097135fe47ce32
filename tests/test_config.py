"""The one config: shipped file == schema defaults, overrides are typed, mistakes name the key."""
from pathlib import Path

import pytest
import yaml

from diffuseseg.config import Config, ConfigError, documented_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_schema_defaults():
    assert load_config(REPO / "config.yaml") == Config()
    body = (REPO / "config.yaml").read_text().split("\n", 3)[3]
    assert body.strip() == documented_yaml().strip(), "regenerate config.yaml from documented_yaml()"


def test_overrides_are_typed_like_the_existing_value():
    cfg = load_config(None, ["train.lr=1e-4", "train.max_steps=7", "model.attention=[true,true,true]",
                             "data.hflip=false", "train.ema_decay=1"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 7 and cfg.data.hflip is False
    assert cfg.model.attention == [True, True, True] and isinstance(cfg.train.ema_decay, float)


def test_partial_file_takes_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 4}}))
    cfg = load_config(path)
    assert cfg.train.batch_size == 4 and cfg.model == Config().model


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("train.max_steps=0", "train.max_steps: 0 is below the minimum 1"),
    ("sample.sampler=euler", "sample.sampler: 'euler' is not allowed; choose one of: ddpm, ddim"),
    ("model.nope=3", "unknown key 'model.nope'"),
    ("nosection.key=1", "unknown section 'nosection'"),
    ("lr=3", "expected section.key=value"),
    ("model.mid_channels=[64,64,64]", "mid_channels[0]=64 must equal model.down_channels[-1]=96"),
    ("data.test_indices=[5,10]", "overlaps"),
    ("model.attention=[true]", "model.attention needs len(down_channels)-1=3 entries"),
    ("data.hflip=3", "data.hflip: expected bool"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_size: 4}\nextra: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown section\(s\) \['extra'\]"):
        load_config(bad)
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("preset, millions", [("diffuseseg_celebahq64.yaml", 45.88), ("celebahq64_sample_cpu.yaml", 3.54)])
def test_presets_load_and_build_the_model_they_describe(preset, millions):
    from diffuseseg.unet import UNet, count_parameters
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.model.im_size == 64 and cfg.labels.format == "palette" and cfg.labels.classes == "diffuseseg"
    assert round(count_parameters(UNet(cfg.model)) / 1e6, 2) == millions


def test_bundled_checkpoint_config_loads():
    cfg = load_config(REPO / "checkpoints" / "toy_faces_32" / "config.yaml")
    assert cfg.model == Config().model and cfg.diffusion == Config().diffusion
