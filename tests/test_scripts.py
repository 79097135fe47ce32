"""Every script starts: its imports resolve and --help explains it (a broken import fails here, not in a user's shell)."""
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "utils").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = subprocess.run([sys.executable, f"utils/{script}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and len(proc.stdout.splitlines()) > 5, proc.stdout
