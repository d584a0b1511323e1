"""benchmarks/run_gpu.sh and its closing table (acm_d2.selftest.targets): the issue's targets judged from
a self-test report, training runs read from their folders and logs, and the script's CPU dry run."""

import json
import os
import subprocess
import sys

import pytest

from acm_d2.selftest import targets
from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "run_gpu.sh")


def _model(name, step, memory, inference, step_ms=100.0):
    return {
        "model": name,
        "train_step_ratio": step,
        "peak_memory_ratio": memory,
        "inference_ratio": inference,
        "train_step_ms": step_ms,
    }


def _report():
    models = [
        _model("none", 1.0, 1.0, 1.0),
        _model("ACM (fused)", 1.05, 1.30, 1.20, step_ms=105.0),
        _model("ACM (fused, recompute)", 1.15, 1.10, 1.20, step_ms=115.5),
    ]
    layer = [
        {"level": "res2", "dtype": "fp32", "impl": "fused", "mode": "fwd+bwd", "vs_floor": 1.8},
        {"level": "res5", "dtype": "fp32", "impl": "fused", "mode": "fwd", "median_ms": 0.25},
    ]
    acm = {"forward": {"launches_per_call": 3.0}, "backward": {"launches_per_call": 6.0}}
    return {
        "device_name": "NVIDIA H200",
        "device": "cuda",
        "versions": {"torch": "2.11.0", "triton": "3.6.0", "acm_d2": "0.1"},
        "sections": {
            "model": {"per_dtype": {"fp32": {"models": models}}},
            "layer": {"results": layer},
            "breakdown": {"runs": {"fp32 ACM fused": {"train_step": {"acm": acm}}}},
        },
    }


def test_targets_are_judged_against_the_issue_limits():
    rows = {r["figure"]: r for r in targets.target_rows(_report())}
    assert rows["training step fp32, fused / none"]["verdict"] == "PASS"
    assert rows["peak memory fp32, fused / none"]["verdict"] == "FAIL"
    assert rows["inference fp32, fused / none"]["verdict"] == "FAIL"
    assert rows["peak memory fp32, fused + CONTEXT_RECOMPUTE / none"]["verdict"] == "PASS"
    recompute_cost = rows["training step fp32, recompute / fused"]
    assert recompute_cost["verdict"] == "info" and recompute_cost["value"] == pytest.approx(1.1)
    assert rows["layer fwd+bwd res2 fp32, x memory floor"]["verdict"] == "PASS"
    assert rows["layer fwd res5 fp32"]["verdict"] == "FAIL"
    assert rows["launches per ACM call, forward"]["verdict"] == "PASS"
    assert rows["launches per ACM call, fwd + bwd"]["value"] == 9.0
    assert rows["launches per ACM call, fwd + bwd"]["verdict"] == "FAIL"
    # bf16 was not measured, and nothing is launched on a CPU: missing, not passed.
    assert rows["training step bf16, fused / none"]["verdict"] == "MISSING"
    cpu_rows = {r["figure"]: r for r in targets.target_rows(dict(_report(), device="cpu"))}
    assert cpu_rows["launches per ACM call, forward"]["verdict"] == "MISSING"


def _training_folder(root, name, log_lines, finished=True, ap=True):
    folder = root / name
    folder.mkdir()
    entries = [{"iteration": i, "time": 0.1 + i / 1000, "total_loss": 1.0} for i in (19, 39, 59)]
    if ap:
        entries.append({"iteration": 59, "bbox/AP": 12.5, "segm/AP": 10.0})
    (folder / "metrics.json").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    if finished:
        (folder / "model_final.pth").write_bytes(b"")
    (root / f"{name}.log").write_text("\n".join(log_lines) + "\n")
    return folder


def test_training_run_reads_ap_time_per_iteration_and_triton_warnings(tmp_path):
    _training_folder(tmp_path, "train_ACM", ["[d2] Starting training", "copypaste: 12.5"])
    run = targets.training_run(str(tmp_path / "train_ACM"), str(tmp_path / "train_ACM.log"))
    assert run["ok"] and run["finished"] and run["iterations"] == 60
    assert run["ap"] == {"bbox/AP": 12.5, "segm/AP": 10.0}
    assert run["seconds_per_iteration"] == pytest.approx(0.149)  # median after the first window
    warning = "WARNING acm_d2: the fused ACM's Triton kernels failed on cuda:0 (RuntimeError: ...)"
    _training_folder(tmp_path, "demo", ["ok", warning])
    run = targets.training_run(str(tmp_path / "demo"), str(tmp_path / "demo.log"))
    assert not run["ok"] and run["triton_warnings"] == [warning]
    _training_folder(tmp_path, "train_none", [], ap=False)
    assert not targets.training_run(str(tmp_path / "train_none"), "")["ok"]


def test_targets_main_writes_the_summary_and_fails_on_a_part_over_budget(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (out / "selftest.json").write_text(json.dumps(_report()))
    for name in targets.TRAINING_RUNS:
        _training_folder(work, name, ["fine"])
    (work / "parts.txt").write_text("selftest 0 200 250\ndemo 0 50 60\n")
    assert targets.main([str(out), str(work)]) == 0
    summary = (out / "summary.md").read_text()
    assert "| training step fp32, fused / none | 1.05x | <= 1.1x | PASS |" in summary
    assert "| demo | 0 | 50 (60) |" in summary
    assert json.loads((out / "e2e.json").read_text())["training_runs"]["demo"]["ok"]
    (work / "parts.txt").write_text("selftest 124 250 250\n")
    assert targets.main([str(out), str(work)]) == 1
    assert "124 (over budget)" in (out / "summary.md").read_text()
    assert "FAILED: selftest" in capsys.readouterr().err


def test_run_gpu_refuses_unknown_arguments():
    result = subprocess.run(["bash", SCRIPT, "--quick"], capture_output=True, text=True)
    assert result.returncode == 2 and "--cpu-dry-run" in result.stderr


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_part(tmp_path):
    """The whole script on the CPU (about 3 min on 2 cores): every part runs and the table is written."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path / "out"),
        WORK=str(tmp_path / "work"),
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        ["bash", SCRIPT, "--cpu-dry-run"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["e2e.json", "run.log", "selftest.json", "summary.md"]
    e2e = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert sorted(e2e["parts"]) == ["demo", "selftest", "train_ACM", "train_none"]
    assert all(run["ok"] for run in e2e["training_runs"].values())
