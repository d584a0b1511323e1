"""python -m acm_d2.selftest on the CPU: its sections run, the JSON report is written after each one, the
correctness checks pass (and can fail), and a failing section is recorded without stopping the run."""

import json
import subprocess
import sys

import pytest
import torch

from acm_d2 import selftest
from acm_d2.selftest.correctness import compare
from conftest import REPO


def read(path):
    with open(path) as f:
        return json.load(f)  # strict JSON: non-finite floats are written as strings


def test_cpu_sections_pass_and_write_the_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert (
        selftest.main(["--quick", "--sections", "env,correctness,layer", "--json", str(out)]) == 0
    )
    report = read(out)
    assert (
        report["device"] == "cpu"
        and report["versions"]["torch"] == torch.__version__
        and report["timestamp"]
    )
    assert report["args"]["sections"] == ["env", "correctness", "layer"]
    sections = report["sections"]
    assert [s["status"] for s in sections.values()] == ["ok"] * 3
    assert sections["env"]["gpu_count"] == 0 and sections["env"]["detectron2"]
    correctness = sections["correctness"]
    # 3 variants x 2 group counts x 2 shapes x (fp32, bf16), torch backend, plus two memory layouts.
    assert (
        correctness["total"] == 26
        and correctness["passed"] == 26
        and correctness["backends"] == ["torch"]
    )
    assert {c["variant"] for c in correctness["checks"]} == {"full", "no_p", "no_q"}
    assert all(c["max_rel_err"]["dx"] < 1e-2 for c in correctness["checks"])
    layer = sections["layer"]
    assert layer["copy_bandwidth_gbs"] > 0
    assert len(layer["results"]) == 4 * 2 * 2 * 2  # levels x dtypes x impls x modes
    assert all(r["median_ms"] > 0 and r["vs_floor"] > 0 for r in layer["results"])
    assert report["summary"][0].startswith("==== acm_d2 selftest")
    printed = capsys.readouterr().out
    assert "correctness   26/26 passed" in printed and "no GPU found" in printed


def test_cpu_training_sections(tmp_path):
    out = tmp_path / "report.json"
    assert selftest.main(["--sections", "amp_training,model", "--json", str(out)]) == 0
    sections = read(out)["sections"]
    runs = sections["amp_training"]["runs"]
    assert sorted(runs) == ["ACM fp32", "none fp32"]
    assert all(r["finite"] and r["final_losses"]["total_loss"] > 0 for r in runs.values())
    assert "ACM fp16" in sections["amp_training"]["skipped_without_cuda"]
    models = sections["model"]["per_dtype"]["fp32"]["models"]
    assert [m["model"] for m in models] == [
        "none",
        "ACM (reference)",
        "ACM (fused)",
        "ACM (fused, recompute)",
    ]
    assert all(m["train_step_ms_min_max"][0] <= m["train_step_ms"] for m in models)


def test_cpu_breakdown_section(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert selftest.main(["--sections", "breakdown", "--json", str(out)]) == 0
    breakdown = read(out)["sections"]["breakdown"]
    assert sorted(breakdown["runs"]) == ["fp32 ACM fused", "fp32 none"]
    acm_step = breakdown["runs"]["fp32 ACM fused"]["train_step"]
    # The CPU version's R-18 has an ACM in each of its 8 blocks: every call is found, and its backward.
    assert acm_step["acm"]["calls"] == 8 and acm_step["wall_ms"] > 0
    for phase in ("forward", "backward"):
        p = acm_step["acm"][phase]
        assert p["host_us_per_call"] > 0 and p["aten_ops_per_call"] > 0
        assert sum(p["self_us_per_call"].values()) == pytest.approx(p["host_us_per_call"], rel=0.1)
        assert acm_step["acm_python_stacks"][phase]["self_us_per_call"]
    assert "backward" not in breakdown["runs"]["fp32 ACM fused"]["inference"]["acm"]
    assert "acm" not in breakdown["runs"]["fp32 none"]["train_step"]
    assert "memory" in breakdown["skipped"] and breakdown["memory"] == {}
    assert "breakdown     wall ms" in capsys.readouterr().out


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "report.json"

    def broken(ctx):
        raise RuntimeError("deliberately broken")

    def after(ctx):
        # The report on disk already holds the broken section: a run killed here keeps it.
        assert read(out)["sections"]["correctness"]["status"] == "error"
        return {"ran": True}

    monkeypatch.setitem(selftest.SECTIONS, "correctness", broken)
    monkeypatch.setitem(selftest.SECTIONS, "env", after)
    assert selftest.main(["--sections", "correctness,env", "--json", str(out)]) == 1
    sections = read(out)["sections"]
    assert sections["correctness"]["error"] == "RuntimeError: deliberately broken"
    assert "Traceback" in sections["correctness"]["traceback"]
    assert sections["env"] == {"status": "ok", "ran": True, "seconds": sections["env"]["seconds"]}


def test_correctness_comparison_fails_on_a_wrong_result():
    torch.manual_seed(0)
    want = {
        "y": torch.randn(2, 8, 3, 3),
        "d": torch.randn(2),
        "dx": torch.randn(2, 8, 3, 3),
        "w": torch.randn(4),
    }
    assert compare(dict(want), want, torch.float32)["passed"]
    wrong = dict(want, dx=want["dx"] * (1 + 1e-3))
    result = compare(wrong, want, torch.float32)
    assert not result["passed"] and result["failed"] == ["dx"]
    assert compare(dict(want, d=None), want, torch.float32)["failed"] == ["d"]


@pytest.mark.parametrize("sections", ["env,speed", "", " , "])
def test_unknown_or_no_section_is_refused_naming_the_valid_ones(sections, capsys):
    with pytest.raises(SystemExit) as exit_info:
        selftest.parse_args(["--sections", sections])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--sections" in err and ",".join(selftest.SECTIONS) in err


def test_python_m_entry_point_runs_the_runner(tmp_path):
    """`python -m acm_d2.selftest` (the package's __main__) reaches the runner's argument parser."""
    result = subprocess.run(
        [sys.executable, "-m", "acm_d2.selftest", "--sections", "", "--json", ""],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "choose one or more of env," in result.stderr
