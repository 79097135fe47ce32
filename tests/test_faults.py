"""Nothing lost, nothing clobbered: one writer per run folder (two real processes, kill -9 takes over),
file-system faults as one-line errors naming the path, and disk-full writes that leave the old file."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, run_script
from diffuseseg.cli import run_main
from diffuseseg.io import atomic_write, atomic_write_text, exclusive_folder
from diffuseseg.toy_faces import render_faces


def _train(out, *overrides, flags=(), wait=True):
    return run_script("train_ddpm.py", TINY + [f"train.out_dir={out}", "run.threads=1", *overrides], "--no-progress",
                      *flags, wait=wait)


def _wait_for(path, timeout=60.0):
    end = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_one_writer_per_run_folder_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = _train(out, "train.max_steps=1000000", "train.time_budget_min=2", wait=False)
    try:
        _wait_for(out / "last.pt")
        second = _train(out, "train.max_steps=5")
        assert second.returncode == 2, second.stderr
        assert f"{out} is in use by process {first.pid}" in second.stderr, second.stderr
        os.kill(first.pid, signal.SIGKILL)  # no cleanup at all: the lock file stays behind
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / ".lock").read_text().startswith(f"process {first.pid} ")
    resumed = _train(out, "train.max_steps=400", flags=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped by max_steps at step 400" in resumed.stdout


def test_an_atomic_write_has_the_permissions_of_a_plain_one(tmp_path):
    """Outputs written through a temp file get the mode open() gives (umask applied), not mkstemp's 0600."""
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_output_under_a_regular_file_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    out = _train(blocker / "run", "train.max_steps=1")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert str(blocker) in out.stderr and "a part of that path is a file" in out.stderr, out.stderr


def test_disk_full_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path, capsys):
    target = tmp_path / "ema_fp16.pt"
    atomic_write_text(target, "good weights")

    def disk_full(f):
        f.write(b"half of the new weig")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    with pytest.raises(OSError):
        atomic_write(target, disk_full)
    assert target.read_text() == "good weights"
    assert [p.name for p in tmp_path.iterdir()] == ["ema_fp16.pt"]  # the temp file is gone too

    def script():
        atomic_write(target, disk_full)
    with pytest.raises(SystemExit) as stop:
        run_main(script)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: file system error at {target}: No space left on device (the disk is full" in err


class _RunsCodeWhenUnpickled:
    """A checkpoint that runs code on a plain ``pickle.load``: here it would create a folder."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_checkpoint_with_code_in_it_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pt")
    out = run_script("sample_ddpm.py", [f"run.checkpoint={tmp_path / 'evil.pt'}",
                                        f"sample.out_dir={tmp_path / 'samples'}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot read checkpoint {tmp_path / 'evil.pt'}" in out.stderr, out.stderr
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line_naming_the_file(stack, tmp_path):
    whole = (stack["root"] / "ddpm" / "ema_fp16.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    out = run_script("sample_ddpm.py", stack["overrides"] + [f"run.checkpoint={tmp_path / 'cut.pt'}",
                                                             f"sample.out_dir={tmp_path / 'samples'}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot read checkpoint {tmp_path / 'cut.pt'}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_sampling_into_a_path_under_a_file_names_the_path(stack, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    out = run_script("sample_ddpm.py", stack["overrides"] + [f"sample.out_dir={blocker / 'samples'}",
                                                             "sample.num_images=1", "sample.steps=1"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert str(blocker) in out.stderr and "a part of that path is a file" in out.stderr, out.stderr
    assert "it/s" not in out.stderr  # refused before sampling (no progress bar), not after it


def test_no_permission_names_the_path_and_what_to_do(tmp_path, capsys):
    # Injected: this suite may run as root, for whom chmod does not take write permission away.
    target = tmp_path / "masks" / "0.png"

    def refused():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
    with pytest.raises(SystemExit) as stop:
        run_main(refused)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: file system error at {target}: Permission denied (no permission: choose a folder you " \
                  "can write to)\n"


def test_grey_rgba_and_16_bit_pngs_segment_like_their_8_bit_rgb_version(stack, tmp_path):
    face = render_faces(range(1), 16, seed=3)[0][0]
    grey = np.asarray(Image.fromarray(face).convert("L"))
    inputs, same = tmp_path / "inputs", tmp_path / "same"
    inputs.mkdir(), same.mkdir()
    Image.fromarray(grey.astype(np.uint16) * 257).save(inputs / "grey16.png")  # mode I;16
    Image.fromarray(grey).save(inputs / "grey8.png")
    Image.fromarray(np.dstack([face, np.full(face.shape[:2], 128, np.uint8)])).save(inputs / "rgba.png")
    Image.fromarray(np.dstack([grey] * 3)).save(same / "grey16.png")
    Image.fromarray(np.dstack([grey] * 3)).save(same / "grey8.png")
    white = Image.new("RGBA", face.shape[1::-1], (255, 255, 255, 255))  # transparency shows white (image_io)
    Image.alpha_composite(white, Image.open(inputs / "rgba.png")).convert("RGB").save(same / "rgba.png")
    masks = {}
    for folder in (inputs, same):
        out = run_script("segment.py", stack["overrides"] + [f"segment.input_dir={folder}",
                                                             f"segment.out_dir={tmp_path / (folder.name + '_out')}"])
        assert out.returncode == 0, out.stderr
        masks[folder.name] = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / f"{folder.name}_out" / "masks")
                              .iterdir()}
    assert sorted(masks["inputs"]) == ["grey16.png", "grey8.png", "rgba.png"]
    for name, mask in masks["same"].items():
        np.testing.assert_array_equal(masks["inputs"][name], mask, err_msg=name)


def test_no_trained_read_out_says_how_to_make_one(stack, tmp_path):
    out = run_script("segment.py", stack["overrides"] + [f"ensemble.path={tmp_path / 'ensemble.pt'}",
                                                         f"segment.out_dir={tmp_path / 'out'}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"ensemble file not found: {tmp_path / 'ensemble.pt'} (train one with utils/train_mlps.py)" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, key, bad, message", [
    ("segment.py", "segment.out_dir", "features.blocks=[ups.0,ups.7]", "features.blocks: ['ups.7'] not in this U-Net"),
    ("segment.py", "segment.out_dir", "segment.input_dir=MISSING", "image folder not found"),
    ("generate_dataset.py", "generate.out_dir", "generate.num_images=0", "generate.num_images: 0 is below"),
    ("generate_dataset.py", "generate.out_dir", "run.checkpoint=MISSING", "checkpoint not found"),
])
def test_a_refused_segment_or_generate_run_leaves_no_output_folder(stack, tmp_path, script, key, bad, message):
    out = tmp_path / "out"
    proc = run_script(script, stack["overrides"] + [bad.replace("MISSING", str(tmp_path / "missing")), f"{key}={out}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_data_writing_scripts_refuse_a_folder_another_process_is_writing(tmp_path):
    toy, converted = tmp_path / "toy", tmp_path / "converted"
    small = TINY + [f"data.root={toy}", "data.test_indices=[1000200,1000204]"]
    convert = [sys.executable, "utils/convert_labels.py", str(toy / "test"), str(converted), "--format", "index",
               "--to", str(toy / "test" / "classes.json")]
    assert run_script("make_toy_faces.py", small, "--splits", "test").returncode == 0
    with exclusive_folder(toy / "test"), exclusive_folder(converted):  # held by this test's process
        made = run_script("make_toy_faces.py", small, "--splits", "test")
        refused = subprocess.run(convert, cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 2, made.stderr
    assert f"{toy / 'test'} is in use by process {os.getpid()}" in made.stderr, made.stderr
    assert refused.returncode == 2, refused.stderr
    assert f"{converted} is in use by process {os.getpid()}" in refused.stderr, refused.stderr
    assert [p.name for p in converted.iterdir()] == [".lock"]
    done = subprocess.run(convert, cwd=REPO, capture_output=True, text=True)  # released: the same command works
    assert done.returncode == 0, done.stderr
    assert len(list((converted / "images").iterdir())) == 4
