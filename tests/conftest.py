"""Shared test fixtures: the reference material in ../shared (skipped with a reason when absent), a tiny
trained stack in DiffuseSeg's file formats, and a helper that runs the scripts as a user does."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffuseseg.checkpoint import load_unet
from diffuseseg.config import load_config
from diffuseseg.label_formats import ClassList
from diffuseseg.pixel_classifier import PixelEnsemble
from diffuseseg.segmentation import build_extractor
from diffuseseg.toy_faces import CLASS_NAMES, PALETTE
from diffuseseg.training import train_ddpm

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


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the tests in reverse file order (with -p no:randomly): no test may depend on another")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


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
def _process_state():
    """Every test starts from the same global RNG and must leave the thread count as it found it: the
    count changes float results bit by bit, so a leak makes later tests depend on the order they run in."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    leaked = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert leaked == threads, (f"this test left torch's CPU thread count at {leaked} (was {threads}): "
                               "library code sets it with runtime.thread_scope, which restores it")


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> dict:
    """DiffuseSeg-format weights: a 2-step tiny DDPM as a plain state_dict .pth, a folder of 3
    mlp_<k>_best.pt files, and the toy class list."""
    root = tmp_path_factory.mktemp("stack")  # shared, read-only: tests write into their own tmp_path
    train_ddpm(load_config(REPO / "config.yaml", TINY + [f"train.out_dir={root / 'ddpm'}", "train.max_steps=2"]),
               progress=False)
    (root / "classes.json").write_text(ClassList(list(CLASS_NAMES), PALETTE).to_json())
    # Saved the way DiffuseSeg saves its DDPM: torch.save(model.state_dict(), "DDPM_Celeb_*.pth").
    ddpm_cfg = load_config(REPO / "config.yaml", TINY)
    torch.save(load_unet(root / "ddpm" / "ema_fp16.pt", ddpm_cfg).state_dict(), root / "ddpm.pth")
    overrides = TINY + [f"run.checkpoint={root / 'ddpm.pth'}", f"labels.classes={root / 'classes.json'}",
                        f"ensemble.path={root / 'mlps'}", "run.threads=1", "features.batch_size=4",
                        "features.blocks=[ups.0,ups.1]"]
    cfg = load_config(REPO / "config.yaml", overrides)
    dim = build_extractor(cfg).dim
    torch.manual_seed(1)  # random members whose (view-averaged) masks still vary by pixel on the test faces
    # init="pytorch": nn.Linear's wider U(+-1/sqrt(d)) draws, not the official N(0, 0.02) default (the
    # random members below are chosen for masks that vary; they are never trained).
    members = PixelEnsemble(dim, len(CLASS_NAMES), members=3, layer_order="diffuseseg", init="pytorch")
    for bn in (members.bn1, members.bn2):  # non-trivial running statistics, as a trained file has
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    (root / "mlps").mkdir()
    for k, sd in enumerate(members.to_member_state_dicts(), start=1):
        torch.save(sd, root / "mlps" / f"mlp_{k}_best.pt")
    return {"root": root, "overrides": overrides, "cfg": cfg, "dim": dim}


def toy_split_overrides(root: Path, labeled: int, num_labeled: int, split: str, split_size: int) -> list[str]:
    """Toy faces rendered on first use under ``root``: a labeled pool of ``labeled`` faces (the first
    ``num_labeled`` used) and ``split_size`` faces of the evaluation ``split`` ('val' or 'test')."""
    first = {"val": 1_000_100, "test": 1_000_200}[split]
    return [f"data.root={root}", f"labels.labeled_dir={root / 'labeled'}", f"labels.{split}_dir={root / split}",
            "labels.classes=", f"data.labeled_indices=[1000000,{1_000_000 + labeled}]",
            f"labels.labeled_range=[0,{labeled}]", f"labels.num_labeled={num_labeled}",
            f"data.{split}_indices=[{first},{first + split_size}]", f"labels.{split}_range=[0,{split_size}]"]


def run_script(script: str, overrides: list[str], *extra: str, wait: bool = True):
    args = [sys.executable, f"utils/{script}", *[a for s in overrides for a in ("--set", s)], *extra]
    if not wait:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True)
