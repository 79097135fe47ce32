"""Pretrained diffusers UNet2DModel checkpoints as the DDPM, without network: a tiny random model
written with save_pretrained (model folder, pipeline folder, safetensors and .bin) drives loading,
block features, the schedule from its scheduler config, sampling against diffusers' own scheduler,
the scripts (features -> read-out -> segment -> factory) and fine-tuning with export."""
import json

import pytest
import torch

from conftest import REPO, run_script
from diffuseseg.backbones import (BackboneError, DiffusersUNet, adopt_checkpoint_schedule, describe_blocks,
                                  load_diffusers_unet)
from diffuseseg.config import ConfigError, load_config
from diffuseseg.diffusion import DDIMSampler, NoiseSchedule, sample_images
from test_diffusion import _to_f64

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

SIZE = 16


def _tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("diffusers")
    net = _tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.012)
    net.save_pretrained(root / "model")  # safetensors
    scheduler.save_pretrained(root / "model")  # scheduler_config.json beside config.json
    net.save_pretrained(root / "model_bin", safe_serialization=False)
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(root / "pipeline")
    return {"root": root, "net": net.eval()}


def _cfg(folder, *extra):
    return load_config(REPO / "config.yaml", ["model.backbone=diffusers", f"run.checkpoint={folder}",
                                              f"model.im_size={SIZE}", "run.device=cpu", *extra])


def test_both_layouts_and_both_weight_formats_load_the_same_network(folders):
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 500])
    with torch.no_grad():
        ref = folders["net"](x, t).sample
        for name in ("model", "model_bin", "pipeline"):
            model = load_diffusers_unet(folders["root"] / name, _cfg(folders["root"] / name))
            torch.testing.assert_close(model(x, t), ref)
    assert model.block_names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


def test_block_features_match_hooks_and_stop_early(folders):
    model = DiffusersUNet(folders["net"])
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([50])
    seen = []
    handle = folders["net"].up_blocks[1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        feats = model.forward_features(x, t, ["up_blocks.0", "mid_block", "up_blocks.0.resnets.0"])
    finally:
        handle.remove()
    assert not seen  # up_blocks.1 never ran: the pass stopped after the last requested block
    assert feats["mid_block"].shape == (1, 16, SIZE // 2, SIZE // 2)
    assert feats["up_blocks.0"].shape == (1, 16, SIZE, SIZE)  # up-sampled at the block's end
    shapes = dict(describe_blocks(model))
    assert shapes["down_blocks.1"] == (16, SIZE // 2, SIZE // 2) and shapes["up_blocks.1"] == (8, SIZE, SIZE)
    with pytest.raises(KeyError, match="unknown U-Net block"):
        model.forward_features(x, t, ["ups.0"])


def test_the_schedule_comes_from_the_checkpoint_and_a_contradiction_names_both_values(folders, monkeypatch):
    cfg = adopt_checkpoint_schedule(_cfg(folders["root"] / "pipeline"))
    assert cfg.diffusion.beta_end == 0.012 and cfg.diffusion.num_train_timesteps == 1000
    with pytest.raises(ConfigError, match=r"diffusion.beta_end: config 0.03 != checkpoint 0.012"):
        adopt_checkpoint_schedule(_cfg(folders["root"] / "model", "diffusion.beta_end=0.03"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an id that is in no cache, whatever the machine's network
    with pytest.raises(BackboneError, match="download no-such-org/no-such-model"):
        load_diffusers_unet("no-such-org/no-such-model")
    with pytest.raises(ConfigError, match=r"model.im_size: config 32 != checkpoint 16"):
        load_diffusers_unet(folders["root"] / "model", _cfg(folders["root"] / "model", "model.im_size=32"))


def test_ddim_sampling_through_the_project_sampler_matches_diffusers_scheduler(folders):
    model = DiffusersUNet(folders["net"])
    schedule = NoiseSchedule(1000, "linear", 1e-4, 0.012)
    ours = DDIMSampler(schedule, "epsilon", clip_sample=True, timestep_spacing="leading")
    ours.set_timesteps(10)
    x = sample_images(model, ours, (2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0), progress=False)
    # diffusers' scheduler with our float64 alpha-bar table (see tests/test_diffusion.py): what remains
    # is float32 rounding in the network itself
    ref = _to_f64(DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.012, clip_sample=True,
                                timestep_spacing="leading"), schedule)
    ref.set_timesteps(10)
    y = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(folders["net"](y, t).sample, t, y).prev_sample.float()
    assert (x - y.clamp(-1, 1)).abs().max() < 1e-4


def test_features_readout_segment_and_factory_through_the_scripts(folders, tmp_path):
    toy = tmp_path / "toy"
    overrides = ["model.backbone=diffusers", f"run.checkpoint={folders['root'] / 'pipeline'}", f"model.im_size={SIZE}",
                 "run.device=cpu", "run.threads=1", "features.blocks=[up_blocks.0,up_blocks.1]", "features.batch_size=4",
                 f"data.root={toy}", f"labels.labeled_dir={toy / 'labeled'}", f"labels.test_dir={toy / 'test'}",
                 "labels.labeled_range=[0,4]", "labels.num_labeled=4", "labels.test_range=[0,3]", "labels.min_pixels=0",
                 f"features.store_dir={tmp_path / 'store'}", f"ensemble.path={tmp_path / 'ens' / 'ensemble.pt'}",
                 "ensemble.readout=pixel_mlp", "ensemble.members=2", "ensemble.min_steps=0", "ensemble.max_epochs=1", f"segment.out_dir={tmp_path / 'seg'}",
                 f"generate.out_dir={tmp_path / 'gen'}", "generate.num_images=3", "generate.steps=2",
                 "generate.batch_size=3"]
    listed = run_script("extract_features.py", overrides, "--list-blocks")
    assert listed.returncode == 0, listed.stderr
    assert "up_blocks.1" in listed.stdout and "8 channels  16x16" in listed.stdout
    for script in ("make_toy_faces.py", "extract_features.py", "train_mlps.py", "segment.py", "generate_dataset.py"):
        proc = run_script(script, overrides)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["dim"] == 3 * (16 + 8) and meta["spec"]["checkpoint_sha256"]  # 3 timesteps x (16 + 8) channels
    assert len(list((tmp_path / "seg" / "masks").glob("*.png"))) == 3
    assert len((tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()) == 3


def test_fine_tuning_exports_a_pipeline_diffusers_and_this_project_load(folders, tmp_path):
    out = tmp_path / "ft"
    overrides = ["model.backbone=diffusers", f"run.checkpoint={folders['root'] / 'model'}", f"model.im_size={SIZE}",
                 "run.device=cpu", "run.threads=1", f"train.out_dir={out}", "train.batch_size=2",
                 "train.ckpt_every=2", "train.sample_every=0", "train.warmup_steps=1"]
    proc = run_script("train_ddpm.py", overrides + ["train.max_steps=3"], "--no-progress")
    assert proc.returncode == 0, proc.stderr
    resumed = run_script("train_ddpm.py", overrides + ["train.max_steps=4"], "--resume", "--no-progress")
    assert resumed.returncode == 0 and "step 4" in resumed.stdout, resumed.stderr
    pipe = DDPMPipeline.from_pretrained(out / "ema_diffusers")
    assert pipe.scheduler.config.beta_end == 0.012  # the checkpoint's schedule was adopted and exported
    ours = load_diffusers_unet(out / "ema_diffusers", _cfg(out / "ema_diffusers"))
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), pipe.unet(x, t).sample)
        assert not torch.allclose(ours(x, t), folders["net"](x, t).sample)  # the weights did move
