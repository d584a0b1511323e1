"""The host-time benchmark of the fused ACM (acm_d2/benchmark/host.py), which needs no GPU."""

import json

import pytest

pytest.importorskip("triton")
host = pytest.importorskip("acm_d2.benchmark.host")


def test_host_benchmark_reports_acm_against_conv_bn_with_breakdown(tmp_path, capsys):
    out = tmp_path / "host.json"
    host.main(["--shape", "res5", "--calls", "3", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"acm_fused_triton", "acm_fused_torch", "conv1x1_bn"}
    for r in rows.values():
        assert (
            0 < r["inference_us"] <= r["inference_us_median"]
            and 0 < r["forward_us"] < r["train_us"]
        )
    triton = rows["acm_fused_triton"]
    assert triton["launches_forward"] == [
        "_fwd_reduce_kernel",
        "_fwd_stats_kernel",
        "_fwd_output_kernel",
    ]
    assert len(triton["launches_backward"]) == 4
    for phase in ("inference", "train"):
        assert result[f"ratio_triton_to_conv_bn_{phase}"] == pytest.approx(
            triton[f"{phase}_us"] / rows["conv1x1_bn"][f"{phase}_us"]
        )
    assert result["triton_binder_train_us"] > 0
    # The breakdown splits the measured time: its parts add up to the fwd+bwd figure.
    assert sum(result["breakdown_triton_train_us"].values()) == pytest.approx(triton["train_us"])
    printed = capsys.readouterr().out
    assert "Conv2d+BatchNorm2d" in printed and "launch parameters" in printed


def test_launches_are_recorded_not_run():
    """On CPU tensors the Triton path runs with every launch recorded: no kernel runs, none fails."""
    recorded = []
    call = host.acm_call((2, 64, 3, 4), 8, device="cpu")
    with host.recording(lambda kernel, grid, *a, **m: recorded.append(grid)):
        call.backward(call.forward())
    assert len(recorded) == 7 and recorded[0] == (16, 1)
