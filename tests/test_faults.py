"""Nothing lost, nothing clobbered: one writer per run folder (two real processes, kill -9 takes over),
file-system faults as one-line errors naming the path, and disk-full writes that leave the old file."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY
from diffuseseg.cli import run_main
from diffuseseg.io import atomic_write, atomic_write_text


def _train(out, *extra, wait=True):
    args = [sys.executable, "utils/train_ddpm.py", "--no-progress"]
    for o in TINY + [f"train.out_dir={out}", "run.threads=1", *extra]:
        args += ["--set", o]
    if not wait:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True)


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
    resumed = subprocess.run([sys.executable, "utils/train_ddpm.py", "--no-progress", "--resume",
                              *[a for o in TINY + [f"train.out_dir={out}", "run.threads=1", "train.max_steps=400"]
                                for a in ("--set", o)]], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped by max_steps at step 400" in resumed.stdout


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
