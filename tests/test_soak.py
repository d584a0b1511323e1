import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_soak_short_run_keeps_memory_flat_and_evaluates(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "soak.py"),
        "--iters",
        "80",
        "--warmup",
        "20",
        "--sample-every",
        "2",
        "--output-dir",
        str(tmp_path),
        "--json",
        str(tmp_path / "soak.json"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS" in result.stdout and (tmp_path / "soak.json").exists()
