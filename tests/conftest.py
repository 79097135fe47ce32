"""Shared test fixtures: the reference material in ../shared (skipped with a reason when absent)."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "reference" / "seed_unet_fixture.pt"
CELEBA_SAMPLE = SHARED / "data" / "celebahq64_sample"

# A U-Net small enough that a real train / sample / segment run takes seconds on a CPU.
TINY = ["model.im_size=16", "model.down_channels=[8,16,16]", "model.mid_channels=[16,16]",
        "model.down_sample=[true,true]", "model.attention=[false,true]", "model.time_emb_dim=16",
        "model.num_down_layers=1", "model.num_up_layers=1", "model.out_block_channels=8",
        "train.batch_size=4", "train.log_every=2", "train.sample_every=0", "train.ckpt_every=3",
        "run.device=cpu", "train.warmup_steps=2"]


@pytest.fixture(scope="session")
def seed_fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"reference fixture not found at {FIXTURE} (../shared is absent in this checkout)")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast and keeps timings stable on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
