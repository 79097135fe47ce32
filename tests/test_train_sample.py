"""A tiny real run: train -> checkpoint -> resume -> sample, through the scripts' library calls."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from diffuseseg.checkpoint import CheckpointError, check_compatible, load_unet, read_checkpoint
from diffuseseg.config import load_config
from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteError, NonFiniteGuard
from diffuseseg.sampling import generate_images
from diffuseseg.visualize import save_animation
from PIL import Image
from diffuseseg.training import learning_rate, run_progress, train_ddpm

REPO = Path(__file__).resolve().parents[1]



def tiny_config(out_dir: Path, *extra: str):
    return load_config(REPO / "config.yaml", TINY + [f"train.out_dir={out_dir}", *extra])


def test_resume_is_exact(tmp_path):
    # A constant schedule, so that stopping at 3 of 6 steps is the same trajectory as an interruption.
    straight = train_ddpm(tiny_config(tmp_path / "a", "train.max_steps=6", "train.lr_schedule=constant"),
                          progress=False)
    train_ddpm(tiny_config(tmp_path / "b", "train.max_steps=3", "train.lr_schedule=constant"), progress=False)
    resumed = train_ddpm(tiny_config(tmp_path / "b", "train.max_steps=6", "train.lr_schedule=constant"),
                         resume=True, progress=False)
    assert straight.step == resumed.step == 6
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(tmp_path / "b" / "last.pt")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert [r["step"] for r in records] == [2, 3, 4, 6] and all(np.isfinite(r["loss"]) for r in records)


def test_a_compiled_run_checkpoints_plain_weights_and_resumes_either_way(tmp_path):
    """train.compile wraps only the step's forward: last.pt and the EMA export hold the plain U-Net's keys, an
    eager run resumes a compiled one and a compiled run an eager one, and the losses are the eager ones.
    (aot_eager traces and runs the graphs through dynamo and AOTAutograd without generating C++ kernels,
    which take minutes on CPU; the mode is inductor's only.)"""
    from torch._dynamo.utils import counters
    compiled = ["train.compile=default", "run.compile_backend=aot_eager", "train.lr_schedule=constant"]
    counters.clear()
    train_ddpm(tiny_config(tmp_path / "c", "train.max_steps=2", *compiled), progress=False)
    assert counters["stats"]["unique_graphs"] > 0  # the step did run through dynamo
    state = read_checkpoint(tmp_path / "c" / "last.pt")
    assert not any("_orig_mod" in k for k in (*state["model"], *state["ema"]))
    load_unet(tmp_path / "c" / "ema_fp16.pt", tiny_config(tmp_path / "c"))  # an eager model takes the export
    eager = train_ddpm(tiny_config(tmp_path / "c", "train.max_steps=4", "train.lr_schedule=constant"),
                       resume=True, progress=False)
    again = train_ddpm(tiny_config(tmp_path / "c", "train.max_steps=6", *compiled), resume=True, progress=False)
    assert (eager.step, again.step) == (4, 6)
    straight = train_ddpm(tiny_config(tmp_path / "e", "train.max_steps=6", "train.lr_schedule=constant"),
                          progress=False)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
              for run in ("c", "e")]
    assert len(losses[0]) == len(losses[1]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)


def test_maybe_compile_wraps_only_when_asked():
    from diffuseseg.runtime import maybe_compile
    model = torch.nn.Linear(3, 2)
    assert maybe_compile(model, "none") is model
    wrapped = maybe_compile(model, "default", "aot_eager")
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is model
    with pytest.raises(ValueError, match="unknown compile mode"):
        maybe_compile(model, "fast")


def test_cosine_schedule_warms_up_then_decays_by_steps_or_by_the_clock():
    cfg = load_config(REPO / "config.yaml", ["train.lr=1e-3", "train.warmup_steps=10", "train.max_steps=1000",
                                             "train.lr_schedule=cosine", "train.lr_min_ratio=0.1"])
    assert learning_rate(cfg, 0, run_progress(cfg, 0, 0.0)) == pytest.approx(1e-4)  # warmup 1/10
    assert learning_rate(cfg, 9, run_progress(cfg, 9, 0.0)) == pytest.approx(1e-3, rel=1e-3)
    assert learning_rate(cfg, 500, run_progress(cfg, 500, 0.0)) == pytest.approx(0.55e-3)  # half way
    assert learning_rate(cfg, 1000, run_progress(cfg, 1000, 0.0)) == pytest.approx(1e-4)  # the floor
    budgeted = load_config(REPO / "config.yaml", ["train.lr=1e-3", "train.warmup_steps=10", "train.max_steps=1000",
                                                  "train.lr_schedule=cosine",
                                                  "train.lr_min_ratio=0.1", "train.time_budget_min=2"])
    # 60 of 120 budget seconds spent at step 20: the clock, not the step count, says half way.
    assert run_progress(budgeted, 20, 60.0) == pytest.approx(0.5)
    assert learning_rate(budgeted, 20, run_progress(budgeted, 20, 60.0)) == pytest.approx(0.55e-3)
    constant = load_config(REPO / "config.yaml", ["train.lr=1e-3", "train.warmup_steps=10",
                                                  "train.lr_schedule=constant"])
    assert learning_rate(constant, 500, 0.9) == pytest.approx(1e-3)


def test_a_resumed_time_budgeted_run_continues_the_budget_instead_of_restarting_it(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=3", "train.time_budget_min=10")
    train_ddpm(cfg, progress=False)
    spent = read_checkpoint(tmp_path / "run" / "last.pt")["train_seconds"]
    assert 0 < spent < 600
    # The budget is spent once the stored training time reaches it: a resume stops at once.
    done = tiny_config(tmp_path / "run", "train.max_steps=100", f"train.time_budget_min={spent / 60 / 2}")
    result = train_ddpm(done, resume=True, progress=False)
    assert (result.step, result.stopped_by) == (3, "time_budget")


def test_a_time_budget_stops_a_fresh_run_within_one_step_of_the_budget(tmp_path, one_thread):
    """A run with steps to spare stops by its budget: at the first step boundary after budget seconds of
    training (not before, not many steps later), with last.pt and the log at that step. max_steps is
    finite, so a budget that is ignored fails here in seconds instead of hanging."""
    budget_min, max_steps = 0.01, 100
    cfg = tiny_config(tmp_path / "run", f"train.max_steps={max_steps}", f"train.time_budget_min={budget_min}",
                      "train.log_every=1", "train.ckpt_every=100000", "run.threads=1")
    result = train_ddpm(cfg, progress=False)
    assert result.stopped_by == "time_budget" and 1 < result.step < max_steps
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == result.step
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, result.step + 1))
    slowest_step = max(cfg.train.batch_size / r["img_per_s"] for r in records)
    budget_s = budget_min * 60
    assert budget_s <= state["train_seconds"] < budget_s + slowest_step + 0.05


def test_training_lowers_the_loss_and_samples_are_reproducible(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=40", "train.lr=2e-3", "train.log_every=10")
    train_ddpm(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    model = load_unet(tmp_path / "run" / "ema_fp16.pt", cfg)
    first = generate_images(model, cfg, 3, steps=4, seed=5, batch_size=2, progress=False)
    again = generate_images(model, cfg, 3, steps=4, seed=5, batch_size=3, progress=False)
    other = generate_images(model, cfg, 3, steps=4, seed=6, batch_size=3, progress=False)
    assert first.shape == (3, 16, 16, 3) and first.dtype == np.uint8
    # Same seed -> same images, whatever the batch size (each image's noise is its own). Batches of 2 + 1 and
    # of 3 run the network on other tensor shapes, whose float bits may differ on some CPUs: a pixel then
    # rounds to the next uint8 level, so allow one level at a few pixels. Noise tied to the batch (a wrong
    # implementation) changes the last image everywhere, by far more (as `other` below shows for a new seed).
    diff = np.abs(first.astype(np.int16) - again.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    # Another seed: every image differs by more than one level almost everywhere (measured: >98% of values),
    # so the tolerance above cannot hide an image drawn from the wrong noise.
    assert (np.abs(first.astype(np.int16) - other.astype(np.int16)) > 1).mean(axis=(1, 2, 3)).min() > 0.5
    # The trajectory: one frame per sampler step for the first batch, ending at the returned images.
    frames = []
    traced = generate_images(model, cfg, 3, steps=4, seed=5, batch_size=2, progress=False, trajectory=frames)
    np.testing.assert_array_equal(traced, first)  # recording changes nothing
    assert len(frames) == 4 and frames[0].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(frames[-1], first[:2])
    gif = save_animation(frames, tmp_path / "trajectory.gif")
    with Image.open(gif) as animation:
        assert animation.n_frames == 4


def test_refuses_to_overwrite_a_run_and_checkpoint_config_mismatch_names_keys(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=1")
    train_ddpm(cfg, progress=False)
    with pytest.raises(UserError, match="--resume"):
        train_ddpm(cfg, progress=False)
    other = tiny_config(tmp_path / "run", "model.time_emb_dim=32", "diffusion.beta_schedule=cosine")
    with pytest.raises(CheckpointError, match=r"model.time_emb_dim: 16 != 32.*|diffusion.beta_schedule"):
        load_unet(tmp_path / "run" / "ema_fp16.pt", other)


def test_sample_script_end_to_end(tmp_path):
    cfg_args = [a for s in TINY for a in ("--set", s)]
    train = subprocess.run([sys.executable, "utils/train_ddpm.py", *cfg_args, "--set", "train.max_steps=2",
                            "--set", f"train.out_dir={tmp_path / 'run'}", "--no-progress"],
                           cwd=REPO, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    sample = subprocess.run([sys.executable, "utils/sample_ddpm.py", *cfg_args,
                             "--set", f"run.checkpoint={tmp_path / 'run' / 'ema_fp16.pt'}",
                             "--set", f"sample.out_dir={tmp_path / 'samples'}", "--set", "sample.num_images=3",
                             "--set", "sample.steps=3"], cwd=REPO, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == [".lock", "0.png", "1.png", "2.png", "config.yaml", "grid.png"]  # .lock: one writer at a time


def test_user_errors_are_one_line_without_traceback_and_leave_no_output(tmp_path):
    """A refused run exits 2 with one line and creates no output folder, also for the mistakes found only
    when the run starts (the image folder, the weights to start from, --resume without a run)."""
    out = tmp_path / "r"
    train = ["utils/train_ddpm.py", "--no-progress", "--set", f"train.out_dir={out}"]
    sample = ["utils/sample_ddpm.py", "--set", f"sample.out_dir={out}"]
    cases = [
        (train + ["--set", "train.lr=fast"], "train.lr: expected float"),
        (train + ["--set", "train.nope=1"], "unknown key 'train.nope'"),
        (train + ["--set", "data.source=folder", "--set", f"data.root={tmp_path / 'missing'}"],
         "image folder not found"),
        (train + ["--set", f"train.init_weights={tmp_path / 'missing.pt'}"], "checkpoint not found"),
        (train + ["--resume"], f"--resume: no checkpoint at {out / 'last.pt'}"),
        (sample + ["--set", "run.checkpoint=missing.pt"], "checkpoint not found: missing.pt"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists(), (args, sorted(p.name for p in out.iterdir()))


def _script_args(tmp_path, *extra):
    return [a for s in TINY + [f"train.out_dir={tmp_path / 'run'}", *extra] for a in ("--set", s)]


def test_ctrl_c_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, one_thread):
    """SIGINT to a real train_ddpm.py: it stops after the current step, saves a checkpoint and exits 0;
    --resume to the same max_steps then ends with exactly the model, EMA and optimizer state of a run
    that was never interrupted."""
    import signal
    import time
    steps = 200  # ~196 steps remain after the second log line: SIGINT lands mid-run with a wide margin
    extra = [f"train.max_steps={steps}", "train.ckpt_every=100000", "run.threads=1"]
    proc = subprocess.Popen([sys.executable, "utils/train_ddpm.py", *_script_args(tmp_path, *extra), "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by interrupt" in stdout, stdout
    stopped = read_checkpoint(tmp_path / "run" / "last.pt")["step"]
    assert 4 <= stopped < steps
    assert not list((tmp_path / "run").glob(".*.tmp")), "a temporary file was left behind"

    resumed = subprocess.run([sys.executable, "utils/train_ddpm.py", *_script_args(tmp_path, *extra), "--resume",
                              "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped by max_steps at step {steps}" in resumed.stdout, resumed.stdout
    straight = train_ddpm(tiny_config(tmp_path / "straight", *extra), progress=False)
    assert straight.step == steps
    a, b = read_checkpoint(tmp_path / "straight" / "last.pt"), read_checkpoint(tmp_path / "run" / "last.pt")
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after Ctrl-C and --resume"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, opt_b["state"][i][name]), f"optimizer state {i}.{name} differs"


def _ddp_reference(cfg, world: int) -> tuple[dict, dict]:
    """What ``world`` DDP ranks compute, in one process: every rank's loss on its own batch with its own
    (step, rank) timesteps and noise, gradients averaged as DDP does (each rank's / world, summed), then the
    same clip, AdamW step and EMA update as training.py. Returns (model, EMA) state dicts."""
    import copy
    from diffuseseg.checkpoint import build_unet
    from diffuseseg.datasets import training_batches
    from diffuseseg.diffusion import diffusion_loss
    from diffuseseg.sampling import schedule_from_config
    from diffuseseg.training import _step_seed, ema_decay, update_ema
    torch.manual_seed(cfg.run.seed)
    model = build_unet(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = schedule_from_config(cfg.diffusion)
    streams = [training_batches(cfg, 0, rank, world) for rank in range(world)]
    params = list(model.parameters())
    for step in range(cfg.train.max_steps):
        total = [torch.zeros_like(p) for p in params]
        for rank, stream in enumerate(streams):
            model.zero_grad(set_to_none=True)
            loss = diffusion_loss(model, schedule, next(stream), prediction_type=cfg.diffusion.prediction_type,
                                  loss_weighting=cfg.diffusion.loss_weighting,
                                  min_snr_gamma=cfg.diffusion.min_snr_gamma,
                                  generator=torch.Generator().manual_seed(_step_seed(cfg, step, rank)))
            loss.backward()
            for acc, p in zip(total, params):
                acc += p.grad / world
        for acc, p in zip(total, params):
            p.grad = acc
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        update_ema(ema, model, ema_decay(cfg, step))
    return model.state_dict(), ema.state_dict()


def test_torchrun_ddp_averages_the_gradients_of_ranks_that_see_different_data(tmp_path, one_thread):
    """2 torchrun ranks (gloo, CPU) train one model: the union of the ranks' batches is the one-process
    batch of twice the size, and the weights equal those of averaged per-rank gradients.

    Not "2 ranks x b == 1 process x 2b": every rank draws its own timesteps and noise from (seed, step,
    rank), by design (a rank's draws must not depend on the world size's other ranks), so the 2-rank run
    cannot equal a 1-process run. The reference instead computes each rank's loss in one process and
    averages the gradients; without the DDP wrapper rank 0 would step on its own gradient alone and miss it.
    """
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    extra = ["data.source=folder", f"data.root={images}", "data.hflip=false", "train.batch_size=2",
             "train.max_steps=3", "train.lr_schedule=constant", "train.lr=1e-3", "run.threads=1"]
    cfg = tiny_config(tmp_path / "run", *extra)
    # Ranks see different data, and together exactly the one-process batch of 2b.
    from diffuseseg.datasets import training_batches
    double = load_config(REPO / "config.yaml", TINY + extra[:-4] + ["train.batch_size=4"])
    ranks = [training_batches(cfg, 0, r, 2) for r in range(2)]
    single = training_batches(double, 0)
    for _ in range(3):
        a, b = next(ranks[0]), next(ranks[1])
        assert not torch.equal(a, b)
        assert torch.equal(torch.cat([a, b]), next(single))

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "utils/train_ddpm.py", *_script_args(tmp_path, *extra), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world size 2" in proc.stdout
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)  # written by rank 0 only

    model, ema = _ddp_reference(cfg, world=2)
    for key, expected in (("model", model), ("ema", ema)):
        for name, tensor in expected.items():
            # Bit-exact: halving is exact in floating point and a sum of two is commutative, so DDP's
            # all-reduce of g/2 per rank is the reference's g0/2 + g1/2 whatever order gloo adds in.
            torch.testing.assert_close(state[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")


def test_init_weights_starts_a_new_run_from_exported_weights(tmp_path):
    train_ddpm(tiny_config(tmp_path / "first", "train.max_steps=3", "train.lr=2e-3"), progress=False)
    start = tmp_path / "first" / "ema_fp16.pt"
    # lr 0: one step later the new run still holds exactly the weights it started from.
    train_ddpm(tiny_config(tmp_path / "second", "train.max_steps=1", "train.lr=0", f"train.init_weights={start}"),
               progress=False)
    cfg = tiny_config(tmp_path)
    before, after = load_unet(start, cfg).state_dict(), load_unet(tmp_path / "second" / "ema_fp16.pt", cfg).state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    fresh = train_ddpm(tiny_config(tmp_path / "third", "train.max_steps=1", "train.lr=0"), progress=False)
    assert not torch.equal(load_unet(fresh.out_dir / "ema_fp16.pt", cfg).state_dict()["conv_in.weight"],
                           before["conv_in.weight"])


def test_a_committed_ema_continues_on_another_machine_with_the_recipes_parameterisation(tmp_path, capsys):
    """The long run's path across machines: a v-prediction run's fp16 EMA (what is committed) starts a new run
    with the same recipe; ε weights may be fine-tuned into v-prediction (said once); a plain load stays strict."""
    v_pred = "diffusion.prediction_type=v_prediction"
    train_ddpm(tiny_config(tmp_path / "machine_a", "train.max_steps=3", "train.lr=2e-3", v_pred), progress=False)
    committed = tmp_path / "machine_a" / "ema_fp16.pt"
    capsys.readouterr()
    train_ddpm(tiny_config(tmp_path / "machine_b", "train.max_steps=1", "train.lr=0", v_pred,
                           f"train.init_weights={committed}"), progress=False)
    assert "fine-tunes" not in capsys.readouterr().out
    v_cfg = tiny_config(tmp_path, v_pred)
    continued = tmp_path / "machine_b" / "ema_fp16.pt"
    assert read_checkpoint(continued)["config"]["diffusion"]["prediction_type"] == "v_prediction"
    before, after = load_unet(committed, v_cfg).state_dict(), load_unet(continued, v_cfg).state_dict()
    assert all(torch.equal(tensor, after[name]) for name, tensor in before.items())
    with pytest.raises(CheckpointError, match="prediction_type"):  # sampling it as ε would be wrong
        load_unet(continued, tiny_config(tmp_path))

    train_ddpm(tiny_config(tmp_path / "eps", "train.max_steps=2"), progress=False)
    train_ddpm(tiny_config(tmp_path / "eps_to_v", "train.max_steps=1", "train.lr=0", v_pred,
                           f"train.init_weights={tmp_path / 'eps' / 'ema_fp16.pt'}"), progress=False)
    assert "trained to predict epsilon: this run fine-tunes it to predict v_prediction" in capsys.readouterr().out
    assert torch.equal(load_unet(tmp_path / "eps_to_v" / "ema_fp16.pt", v_cfg).state_dict()["conv_in.weight"],
                       load_unet(tmp_path / "eps" / "ema_fp16.pt", tiny_config(tmp_path)).state_dict()["conv_in.weight"])


def test_a_diverging_run_stops_with_the_step_and_never_writes_nan(tmp_path):
    good = tiny_config(tmp_path / "run", "train.max_steps=3")
    train_ddpm(good, progress=False)
    diverging = tiny_config(tmp_path / "run", "train.max_steps=40", "train.lr=1e6", "train.warmup_steps=0",
                            "train.grad_clip=0", "train.max_bad_steps=4")
    before = (tmp_path / "run" / "ema_fp16.pt").read_bytes()
    # Either guard stops it: NaN/inf steps in a row, or weights that no longer fit the fp16 export.
    with pytest.raises((NonFiniteError, CheckpointError),
                       match=r"train ddpm: non-finite \w+ .* at step \d+, 5 bad steps in a row|not writing .*ema_fp16"):
        train_ddpm(diverging, resume=True, progress=False)
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in state[key].values()), key
    ema = read_checkpoint(tmp_path / "run" / "ema_fp16.pt")["state_dict"]
    assert all(torch.isfinite(t.float()).all() for t in ema.values())
    assert (tmp_path / "run" / "ema_fp16.pt").read_bytes() == before  # the good export was never replaced


def test_the_guard_skips_bad_steps_and_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard("demo", max_bad_steps=2)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert guard.ok(0, 1.0) and not guard.ok(1, float("nan")) and not guard.ok(2, 1.0, [w])
    w.grad = torch.zeros(3)
    assert guard.ok(3, 0.5, [w]) and guard.in_a_row == 0 and guard.skipped == 2  # a good step resets the count
    assert not guard.ok(4, float("inf")) and not guard.ok(5, float("inf"))
    with pytest.raises(NonFiniteError, match="demo: non-finite loss .* at step 6, 3 bad steps in a row"):
        guard.ok(6, float("inf"))


def test_weights_written_before_a_model_key_existed_still_load(tmp_path):
    """Checkpoints carry the model config they were trained with; a key added later (model.backbone)
    counts as the value every earlier checkpoint had."""
    cfg = tiny_config(tmp_path / "run", "train.max_steps=1")
    train_ddpm(cfg, progress=False)
    obj = read_checkpoint(tmp_path / "run" / "ema_fp16.pt")
    del obj["config"]["model"]["backbone"]
    torch.save(obj, tmp_path / "old.pt")
    model = load_unet(tmp_path / "old.pt", cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(CheckpointError, match="model.backbone: 'native' != 'diffusers'"):
        check_compatible(obj["config"], tiny_config(tmp_path / "run", "model.backbone=diffusers"), tmp_path / "old.pt")


def test_snapshots_keep_the_ema_weights_every_few_training_minutes(tmp_path, one_thread):
    # One thread: on a busy machine, threads waiting for each other made single steps longer than the
    # 0.6 s between snapshots (one snapshot then covers two marks and the list has a gap).
    cfg = tiny_config(tmp_path / "run", "train.max_steps=100000", "train.time_budget_min=0.03",
                      "train.snapshot_every_min=0.01", "train.ckpt_every=100000", "run.threads=1")
    result = train_ddpm(cfg, progress=False)
    assert result.stopped_by == "time_budget"
    snapshots = sorted((tmp_path / "run" / "snapshots").glob("*.pt"))
    assert [p.name for p in snapshots] == ["ema_fp16_min0.01.pt", "ema_fp16_min0.02.pt", "ema_fp16_min0.03.pt"]
    states = [read_checkpoint(p) for p in snapshots]
    steps = [s["step"] for s in states]
    assert steps == sorted(steps) and steps[0] > 0 and steps[-1] == result.step
    assert [round(s["train_seconds"] // 0.6) for s in states] == [1, 2, 3]
    # Each is a usable set of weights, and the last equals the run's exported EMA.
    final = read_checkpoint(tmp_path / "run" / "ema_fp16.pt")["state_dict"]
    assert all(torch.equal(states[-1]["state_dict"][k], v) for k, v in final.items())
    load_unet(snapshots[0], cfg)
