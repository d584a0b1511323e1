"""Where the host and GPU time of a step goes, per ACM call, read from torch.profiler events.

Each AttendAndCompare forward runs inside a profiler range (`mark_acm_calls`); the autograd nodes that
its ops created are found in the backward by their sequence numbers (the profiler stamps a forward op
and the backward node it made with the same number), whatever the op is built from (custom op,
autograd.Function, plain torch ops). Inside those ranges and nodes, every event's own (self) CPU time
goes to one category by its name (`category`); launches are the CUDA runtime/driver launch calls, GPU
time the kernels the profiler links to those events.
"""

import collections
import contextlib
import re
import statistics
from typing import Callable, Dict, List

import torch

from ..benchmark.layer import LAUNCH_CALL

ACM_RANGE = "acm_d2.acm_call"
_EVALUATE = "autograd::engine::evaluate_function: "
_RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")
_ALLOCATING_OPS = ("empty", "zeros", "ones", "full", "new_", "resize_")
# Python frames (recorded with with_stack=True) by the file they run in: the first match wins.
_PYTHON_FILES = (
    ("acm_fused/triton_backend.py", "launch-parameter code (triton_backend.py)"),
    ("triton/", "Triton's launcher (Python)"),
    ("acm_d2/", "acm_d2 Python (module, op wrapper)"),
    ("torch/autograd/profiler", "profiler (measurement overhead)"),
    ("torch/profiler/", "profiler (measurement overhead)"),
    ("torch/_library/", "autograd/custom-op machinery"),
    ("torch/_ops.py", "autograd/custom-op machinery"),
    ("torch/autograd/", "autograd/custom-op machinery"),
    ("torch/_dynamo/", "autograd/custom-op machinery"),
    ("torch/_compile.py", "autograd/custom-op machinery"),
    ("torch/amp/", "autocast switches"),
    ("torch/nn/modules/", "nn.Module call"),
)
CATEGORIES = (
    "autograd/custom-op machinery",
    "allocations",
    "launch-parameter code (triton_backend.py)",
    "Triton's launcher (Python)",
    "CUDA launch calls",
    "other CUDA runtime calls",
    "torch ops (aten)",
    "acm_d2 Python (module, op wrapper)",
    "autocast switches",
    "nn.Module call",
    "profiler (measurement overhead)",
    "other",
)


@contextlib.contextmanager
def mark_acm_calls(model: torch.nn.Module):
    """Run each AttendAndCompare forward of `model` inside a profiler range named ACM_RANGE."""
    from ..layers.acm import AttendAndCompare

    open_ranges = []

    def enter(module, args):
        open_ranges.append(torch.profiler.record_function(ACM_RANGE))
        open_ranges[-1].__enter__()

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    modules = [m for m in model.modules() if isinstance(m, AttendAndCompare)]
    if not modules:
        raise ValueError("mark_acm_calls: the model has no AttendAndCompare module")
    handles = [m.register_forward_pre_hook(enter) for m in modules]
    handles += [m.register_forward_hook(leave) for m in modules]
    try:
        yield len(modules)
    finally:
        for handle in handles:
            handle.remove()


def profile_events(fn: Callable[[], None], cuda: bool, with_stack: bool = False) -> list:
    """The profiler's events of one call of fn (CPU and, on CUDA, GPU activity)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=with_stack) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return list(prof.events())


def _is_python_frame(e) -> bool:
    return bool(getattr(e, "is_python_function", False)) or e.name.startswith("<built-in")


def category(e) -> str:
    """The category of an event's own CPU time (a built-in's is resolved by `_walk`)."""
    name = e.name
    if LAUNCH_CALL in name:
        return "CUDA launch calls"
    if _RUNTIME_CALL.match(name):
        return "allocations" if "Malloc" in name or "Free" in name else "other CUDA runtime calls"
    if name == ACM_RANGE:
        return "profiler (measurement overhead)"
    if _is_python_frame(e):
        for fragment, what in _PYTHON_FILES:
            if fragment in name:
                return what
        return "other"
    if name.startswith("aten::"):
        op = name[len("aten::") :]
        return "allocations" if op.startswith(_ALLOCATING_OPS) else "torch ops (aten)"
    if name.startswith(_EVALUATE) or "Backward" in name or "::" in name:
        return "autograd/custom-op machinery"  # autograd nodes, custom-op dispatch, AccumulateGrad
    return "other"


def _walk(root, counts: collections.Counter, per_category: collections.Counter, kernels: dict):
    """Add root's subtree to the counters: self CPU us by category, launches, top-level aten ops, and
    the GPU kernels linked to its events (name -> [calls, us])."""
    stack = [(root, None)]
    while stack:
        e, parent_category = stack.pop()
        what = category(e)
        if e.name.startswith("<built-in"):
            # A C function called from Python: a torch op's binding if it ran one, else its caller's.
            if any(c.name.startswith("aten::") for c in e.cpu_children):
                what = "torch ops (aten)"
            elif parent_category is not None:
                what = parent_category
        per_category[what] += max(e.self_cpu_time_total, 0.0)
        counts["launches"] += LAUNCH_CALL in e.name
        if e.name.startswith("aten::") and not (
            e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")
        ):
            counts["aten_ops"] += 1
        for k in getattr(e, "kernels", ()):
            entry = kernels.setdefault(k.name, [0, 0.0])
            entry[0] += 1
            entry[1] += k.duration
        stack.extend((c, what) for c in e.cpu_children)


def _summary(roots_per_call: Dict[int, list], calls: int) -> dict:
    counts, per_category, kernels = collections.Counter(), collections.Counter(), {}
    host = []
    for roots in roots_per_call.values():
        host.append(sum(r.cpu_time_total for r in roots))
        for r in roots:
            _walk(r, counts, per_category, kernels)
    calls = max(calls, 1)
    return {
        # The mean, so that the categories (means too) add up to it; the median and range beside it.
        "host_us_per_call": sum(host) / calls,
        "host_us_median": statistics.median(host) if host else 0.0,
        "host_us_min_max": [min(host), max(host)] if host else None,
        "host_ms_total": sum(host) / 1e3,
        "launches_per_call": counts["launches"] / calls,
        "aten_ops_per_call": counts["aten_ops"] / calls,
        "gpu_us_per_call": sum(us for _, us in kernels.values()) / calls,
        "self_us_per_call": {c: per_category[c] / calls for c in CATEGORIES if per_category.get(c)},
        "kernels": {
            name: {"calls_per_call": n / calls, "us_per_call": us / calls}
            for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])
        },
    }


def acm_breakdown(events: list) -> dict:
    """Per ACM call, forward and backward: host time (median, min-max), self CPU time by category,
    launches, top-level aten ops, GPU kernels. Backward entries are absent for an inference."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward = [e for e in cpu if e.name == ACM_RANGE]
    call_of = {}
    for i, root in enumerate(forward):
        stack = [root]
        while stack:
            e = stack.pop()
            if e.sequence_nr >= 0:
                call_of[e.sequence_nr] = i
            stack.extend(e.cpu_children)
    backward = collections.defaultdict(list)
    for e in cpu:
        if e.name.startswith(_EVALUATE) and e.sequence_nr in call_of:
            backward[call_of[e.sequence_nr]].append(e)
    out = {
        "calls": len(forward),
        "forward": _summary({i: [r] for i, r in enumerate(forward)}, len(forward)),
    }
    if backward:
        out["backward"] = _summary(dict(backward), len(forward))
    out["gpu_ms"] = sum(
        out[p]["gpu_us_per_call"] * len(forward) / 1e3 for p in ("forward", "backward") if p in out
    )
    return out


def step_kernels(events: list, top: int = 12) -> dict:
    """GPU kernel time of the profiled window: total, launches and the `top` kernels by time."""
    per_kernel = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(
            ("Memcpy", "Memset")
        ):
            calls, us = per_kernel.get(e.name, (0, 0.0))
            per_kernel[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    return {
        "gpu_ms": sum(us for _, us in per_kernel.values()) / 1e3,
        "kernels": sum(calls for calls, _ in per_kernel.values()),
        "top": [{"name": n, "calls": c, "ms": us / 1e3} for n, (c, us) in ranked[:top]],
    }


def format_breakdown(label: str, b: dict) -> List[str]:
    """A few printed lines per profiled run: host us per call and where it goes, launches, GPU us."""
    lines = []
    for phase in ("forward", "backward"):
        if phase not in b:
            continue
        p = b[phase]
        parts = sorted(p["self_us_per_call"].items(), key=lambda kv: -kv[1])
        lines.append(
            f"  {label} {phase:<8} {p['host_us_per_call']:8.0f} us host/call, "
            f"{p['launches_per_call']:4.1f} launches, {p['aten_ops_per_call']:4.1f} aten ops, "
            f"{p['gpu_us_per_call']:7.1f} us GPU/call"
        )
        lines.append("      " + ", ".join(f"{c} {us:.0f}" for c, us in parts[:6]))
    return lines
