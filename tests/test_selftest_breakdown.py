"""The self-test's breakdown tooling on the CPU: ACM calls found in a profile with their backward, event
categories, and the memory peak replayed from an allocator snapshot."""

import types

import pytest
import torch

from acm_d2.layers.acm import AttendAndCompare
from acm_d2.selftest import memory, profiling


def test_acm_calls_and_their_backward_nodes_are_found_in_a_profile():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        AttendAndCompare(32, num_groups=8, impl="fused"),
        torch.nn.ReLU(),
        AttendAndCompare(32, num_groups=8, impl="reference"),
    ).train()
    x = torch.randn(2, 32, 6, 10, requires_grad=True)

    def step():
        y = model(x)
        (y.sum() + model[0].orth_term + model[2].orth_term).sum().backward()

    with profiling.mark_acm_calls(model) as calls:
        step()
        events = profiling.profile_events(step, cuda=False)
    assert calls == 2
    b = profiling.acm_breakdown(events)
    assert b["calls"] == 2 and set(b) == {"calls", "forward", "backward", "gpu_ms"}
    assert b["gpu_ms"] == 0  # nothing runs on a GPU here
    assert b["backward"]["host_us_per_call"] > 0
    # The reference ACM's backward is many small autograd nodes, the fused one's a single node.
    assert b["backward"]["self_us_per_call"]["autograd/custom-op machinery"] > 0
    assert b["forward"]["launches_per_call"] == 0 and b["forward"]["gpu_us_per_call"] == 0
    # The hooks are gone afterwards: a new profile holds no ACM range.
    assert profiling.acm_breakdown(profiling.profile_events(step, cuda=False))["calls"] == 0


def test_a_model_without_acm_is_refused():
    with pytest.raises(ValueError, match="no AttendAndCompare"):
        with profiling.mark_acm_calls(torch.nn.Conv2d(3, 3, 1)):
            pass


@pytest.mark.parametrize(
    "name, python, expected",
    [
        ("cudaLaunchKernel", False, "CUDA launch calls"),
        ("cuLaunchKernelEx", False, "CUDA launch calls"),
        ("cudaMalloc", False, "allocations"),
        ("aten::empty_strided", False, "allocations"),
        ("aten::mul", False, "torch ops (aten)"),
        (
            "autograd::engine::evaluate_function: MulBackward0",
            False,
            "autograd/custom-op machinery",
        ),
        ("acm_d2::acm_fused_backward", False, "autograd/custom-op machinery"),
        (
            "acm_d2/layers/acm_fused/triton_backend.py(90): stream_config",
            True,
            "launch-parameter code (triton_backend.py)",
        ),
        ("triton/runtime/jit.py(700): run", True, "Triton's launcher (Python)"),
        ("torch/_library/custom_ops.py(441): backend_impl", True, "autograd/custom-op machinery"),
        ("acm_d2/layers/acm.py(173): forward", True, "acm_d2 Python (module, op wrapper)"),
    ],
)
def test_event_categories(name, python, expected):
    event = types.SimpleNamespace(name=name, is_python_function=python)
    assert profiling.category(event) == expected


def _alloc(addr, size, filename, name, line=1):
    return {
        "action": "alloc",
        "addr": addr,
        "size": size,
        "frames": [{"filename": filename, "line": line, "name": name}],
    }


def test_memory_peak_is_replayed_and_attributed_to_the_frames_that_made_it():
    conv = "/x/site-packages/detectron2/layers/wrappers.py"
    acm = "/repo/acm_d2/layers/acm_fused/op.py"
    trace = [
        {"action": "free_completed", "addr": 99, "size": 10**9},  # allocated before the window
        _alloc(1, 3 * 2**20, conv, "forward", 10),
        _alloc(2, 2**20, acm, "acm_fused", 20),
        _alloc(3, 2**20, conv, "forward", 10),
        {"action": "free_completed", "addr": 2, "size": 2**20},
        _alloc(4, 2**20, "/x/site-packages/torch/autograd/__init__.py", "backward"),
        {"action": "free_completed", "addr": 1, "size": 3 * 2**20},
        {"action": "free_completed", "addr": 3, "size": 2**20},
    ]
    result = memory.peak_allocations({"device_traces": [trace]})
    # Peak after the 3rd allocation: 5 MiB (3 + 1 + 1), the first and third from the conv's line.
    assert result["peak_gib"] * 2**10 == pytest.approx(5.0)
    assert result["top"][0] == {
        "where": "detectron2/layers/wrappers.py:10 forward",
        "gib": 4 / 2**10,
        "blocks": 2,
    }
    assert result["top"][1]["where"] == "acm_d2/layers/acm_fused/op.py:20 acm_fused"
    assert result["by_kind_gib"] == {
        "conv activations": 4 / 2**10,
        "ACM (acm_d2/layers)": 1 / 2**10,
    }
