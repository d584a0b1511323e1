"""tools/demo.py (make demo / demo-compare), shrunk to a few iterations on tiny images, as a user runs it."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

DEMO = os.path.join(REPO, "tools", "demo.py")
# A few iterations on 64 px images: the demo's code path in seconds.
TINY = [
    "--num-train",
    "4",
    "--num-val",
    "2",
    "--image-size",
    "64",
    "--vis-images",
    "2",
    "SOLVER.MAX_ITER",
    "3",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
]
FINAL_LINE = re.compile(r"^demo: bbox AP=(\S+) segm AP=(\S+)$", re.M)


def run_demo(output, *args):
    cmd = [sys.executable, DEMO, "--output", str(output), *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout, result.stderr


def test_tiny_demo_prints_the_final_line_and_writes_its_outputs(tmp_path):
    out, err = run_demo(tmp_path, *TINY)
    assert out.rstrip().splitlines()[-1].startswith("demo: bbox AP=")
    bbox, segm = (float(v) for v in FINAL_LINE.search(out).groups())
    for name in (
        "model_final.pth",
        "metrics.json",
        "loss_curve.png",
        "attention.png",
        "data/train.json",
        "data/val.json",
    ):
        assert (tmp_path / name).exists(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bbox"]["AP"] == pytest.approx(bbox, abs=0.01, nan_ok=True)
    assert results["segm"]["AP"] == pytest.approx(segm, abs=0.01, nan_ok=True)
    assert (
        "eta:" in out + err and "Evaluation results for segm" in out + err
    )  # Detectron2's progress and COCOEvaluator
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("loss_acm_orth" in row for row in metrics)


def test_missing_config_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        DEMO,
        "--output",
        str(tmp_path),
        "--config-file",
        str(tmp_path / "nope.yaml"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (
        result.returncode != 0
        and "nope.yaml" in result.stderr
        and "does not exist" in result.stderr
    )


@pytest.mark.slow
def test_tiny_compare_prints_both_context_modules(tmp_path):
    out, _err = run_demo(tmp_path, "--compare", *TINY)
    assert re.search(r"^\| none \|", out, re.M) and re.search(r"^\| ACM \|", out, re.M)
    assert re.search(
        r"^demo-compare: none: bbox AP=\S+ segm AP=\S+  ACM: bbox AP=\S+ segm AP=\S+$", out, re.M
    )
    assert (tmp_path / "ACM" / "attention.png").exists() and not (
        tmp_path / "none" / "attention.png"
    ).exists()
    metrics = (tmp_path / "none" / "metrics.json").read_text()
    assert "loss_acm_orth" not in metrics  # no ACM, no orthogonal loss
