"""The README's "Use ACM in your own code" snippets run as written on a machine without CUDA."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# What the backbone snippet leaves to the reader: a normalised batch and a task loss.
READER_PARTS = """
import torch
images = torch.randn(2, 3, 64, 64)
task_loss = lambda features: sum(f.mean() for f in features.values())
"""


def readme_snippets(section: str) -> list:
    """The ```python blocks of one README section (its "## " heading)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_own_code_snippets_run_on_the_cpu():
    snippets = readme_snippets("Use ACM in your own code")
    assert len(snippets) == 2, "README's own-code section changed: update this test"
    checks = [
        "assert type(model).__name__ == 'ACMGeneralizedRCNN' and model.device.type == 'cpu'",
        "loss.backward(); assert sorted(features) == ['p2', 'p3', 'p4', 'p5', 'p6']",
    ]
    script = READER_PARTS + "".join(f"{code}\n{check}\n" for code, check in zip(snippets, checks))
    proc = subprocess.run(
        [sys.executable, "-c", script + "print('README-OK')"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # as on a machine without a GPU
        timeout=300,
    )
    assert proc.returncode == 0 and "README-OK" in proc.stdout, proc.stderr[-3000:]
