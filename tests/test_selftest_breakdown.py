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


def _event(i, name, start, end, thread=1, seq=-1, device=torch.autograd.DeviceType.CPU):
    from torch.autograd.profiler_util import FunctionEvent

    return FunctionEvent(
        id=i,
        name=name,
        thread=thread,
        start_us=start,
        end_us=end,
        sequence_nr=seq,
        device_type=device,
    )


def test_gpu_launches_and_kernel_time_are_attributed_to_the_acm_call():
    """A CUDA-like profile built by hand (no GPU here): the fused op's forward launches 3 kernels from
    inside the ACM range, its backward node (same sequence number, another thread) 2 and allocates; a
    conv outside ACM launches one. Only ACM's launches and kernels count per call."""
    from torch.autograd.profiler_util import EventList

    forward_op = _event(2, "acm_d2::acm_fused_forward", 10, 90, seq=7)
    forward_op.append_kernel("_fwd_reduce_kernel", 0, 50)
    backward_node = _event(20, "autograd::engine::evaluate_function: AcmBackward", 300, 400, 2, 7)
    backward_node.append_kernel("_bwd_dx_kernel", 0, 30)
    conv = _event(10, "aten::conv2d", 100, 200, seq=8)
    conv.append_kernel("sm90_conv", 0, 80)
    events = [
        _event(1, profiling.ACM_RANGE, 0, 100),
        forward_op,
        *[_event(3 + i, "cuLaunchKernelEx", 20 + 10 * i, 25 + 10 * i) for i in range(3)],
        conv,
        _event(11, "cudaLaunchKernel", 110, 115),
        backward_node,
        _event(21, "cudaLaunchKernel", 310, 312, 2),
        _event(22, "cudaLaunchKernel", 313, 315, 2),
        _event(23, "aten::empty", 320, 325, 2),
        _event(30, "autograd::engine::evaluate_function: ConvBackward0", 400, 500, 2, 8),
        _event(40, "_fwd_reduce_kernel", 50, 100, device=torch.autograd.DeviceType.CUDA),
        _event(41, "sm90_conv", 120, 200, device=torch.autograd.DeviceType.CUDA),
        _event(42, "Memset (Device)", 200, 201, device=torch.autograd.DeviceType.CUDA),
    ]
    tree = EventList(events)
    tree._build_tree()
    b = profiling.acm_breakdown(list(tree))
    assert b["calls"] == 1
    assert b["forward"]["launches_per_call"] == 3 and b["backward"]["launches_per_call"] == 2
    assert b["forward"]["host_us_per_call"] == 100 and b["backward"]["host_us_per_call"] == 100
    assert b["forward"]["kernels"] == {
        "_fwd_reduce_kernel": {"calls_per_call": 1, "us_per_call": 50}
    }
    assert b["gpu_ms"] == pytest.approx(0.08)
    backward = b["backward"]["self_us_per_call"]
    assert backward["CUDA launch calls"] == 4 and backward["allocations"] == 5
    assert backward["autograd/custom-op machinery"] == 100 - 4 - 5
    step = profiling.step_kernels(list(tree))
    assert step["kernels"] == 2 and step["gpu_ms"] == pytest.approx(0.13)
    assert step["top"][0] == {"name": "sm90_conv", "calls": 1, "ms": 0.08}
