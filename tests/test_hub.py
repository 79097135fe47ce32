"""A Hugging Face hub id as run.checkpoint (model.backbone=diffusers), without network: a tiny UNet2DModel is
written into the hub cache's own layout under tmp_path (models--ORG--NAME/refs/main -> snapshots/<commit>/),
then loaded by its id with HF_HUB_OFFLINE=1. Each load runs in a fresh process, as a user's script does:
huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script
from diffuseseg.checkpoint import file_sha256

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

SIZE = 16
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PIPELINE_ID, MODEL_ID = "tiny-org/tiny-ddpm", "tiny-org/tiny-unet"  # the two layouts a hub repository has
SET = ["model.backbone=diffusers", f"model.im_size={SIZE}", "run.device=cpu", "run.threads=1"]

# Loads each id through the project's entry points and saves what the test compares.
PROBE = """
import sys, torch
from diffuseseg.backbones import adopt_checkpoint_schedule, model_folder
from diffuseseg.checkpoint import file_sha256, load_unet
from diffuseseg.config import load_config
torch.set_num_threads(1)
x = torch.randn(2, 3, %d, %d, generator=torch.Generator().manual_seed(0))
t = torch.tensor([10, 500])
found = {}
for repo in sys.argv[2:]:
    cfg = adopt_checkpoint_schedule(load_config("config.yaml", %r + ["run.checkpoint=" + repo]))
    with torch.no_grad():
        out = load_unet(repo, cfg)(x, t)
    found[repo] = {"out": out, "beta_end": cfg.diffusion.beta_end, "sha": file_sha256(repo),
                   "folder": str(model_folder(repo))}
torch.save({"x": x, "t": t, "found": found}, sys.argv[1])
""" % (SIZE, SIZE, SET)


def _snapshot(hub_cache, repo_id: str):
    """The cache folder of ``repo_id`` at COMMIT, with refs/main naming it (what a download leaves behind)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict:
    home = tmp_path / "hf_home"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=4,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    assert sum(p.numel() for p in net.parameters()) < 15_000  # a few thousand: loads in milliseconds
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.012)
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(_snapshot(home / "hub", PIPELINE_ID))
    flat = _snapshot(home / "hub", MODEL_ID)
    net.save_pretrained(flat)
    scheduler.save_pretrained(flat)
    return {"home": home, "net": net.eval()}


def test_a_hub_id_loads_from_the_cache_offline_as_the_saved_network(hub, tmp_path, one_thread):
    out = tmp_path / "probe.pt"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), PIPELINE_ID, MODEL_ID], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "utils")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    probe = torch.load(out, weights_only=True)
    with torch.no_grad():
        expected = hub["net"](probe["x"], probe["t"]).sample
    snapshots = hub["home"] / "hub"
    for repo, found in probe["found"].items():
        torch.testing.assert_close(found["out"], expected, rtol=0, atol=0, msg=repo)
        assert found["beta_end"] == 0.012  # the schedule of the hub repository's scheduler config
        folder = snapshots / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
        assert found["folder"] == str(folder / "unet" if repo == PIPELINE_ID else folder)
        # Feature specs hash the weights: a read-out trained on the hub id also fits a downloaded copy.
        assert found["sha"] == file_sha256(folder)


def test_a_script_runs_on_a_hub_id_and_an_unknown_one_is_one_line_saying_how_to_get_it(hub):
    proc = run_script("extract_features.py", SET + [f"run.checkpoint={PIPELINE_ID}"], "--list-blocks")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "down_blocks.0" and "up_blocks.1" in proc.stdout

    proc = run_script("extract_features.py", SET + ["run.checkpoint=tiny-org/missing"], "--list-blocks")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: run.checkpoint=tiny-org/missing: no such folder here"), line
    assert f"not in the cache ({hub['home'] / 'hub'}) and HF_HUB_OFFLINE is set" in line
    assert "hf download tiny-org/missing --local-dir DIR" in line and "run.checkpoint=DIR" in line
    assert "unset HF_HUB_OFFLINE" in line
