"""tools/benchmark_model.py on tiny inputs: it runs the models side by side and writes every figure."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_compares_models_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "benchmark_model.py"),
        "--modules",
        "none",
        "ACM",
        "--acm-impls",
        "reference",
        "fused",
        "--device",
        "cpu",
        "--height",
        "64",
        "--width",
        "64",
        "--images",
        "1",
        "--instances",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--inference-images",
        "1",
        "--json",
        str(out),
        "MODEL.RESNETS.DEPTH",
        "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["models"]] == ["none", "ACM (reference)", "ACM (fused)"]
    assert report["models"][0]["train_step_ratio"] == 1.0
    for m in report["models"]:
        assert (
            m["train_step_ms"] > 0
            and m["inference_ms_per_image"] > 0
            and len(m["train_step_ms_all"]) == 2
        )
    assert report["models"][1]["parameters"] > report["models"][0]["parameters"]
    assert report["environment"]["dtype"] == "fp32" and report["environment"]["torch"]
    assert "ACM (fused)" in result.stdout
