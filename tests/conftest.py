"""Shared test fixtures: the reference material in ../shared (skipped with a reason when absent)."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "reference" / "seed_unet_fixture.pt"
CELEBA_SAMPLE = SHARED / "data" / "celebahq64_sample"


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
