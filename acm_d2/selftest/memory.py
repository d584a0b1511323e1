"""The memory peak of one training step and the tensors that make it (CUDA caching allocator history).

`record_step_memory` records the allocator's history (`torch.cuda.memory._record_memory_history`, with
Python stacks) over one call, takes the snapshot and `peak_allocations` replays its trace: the peak
of the bytes allocated during the call, and the allocations live at that peak grouped by the first
stack frame in project or Detectron2 code (where a conv activation, ACM's saved input, ... was made).
"""

import collections
import gzip
import pickle
from typing import Callable, Optional

import torch

GIB = 2**30
# Coarse kinds of allocation, by the stack frames that made them: the first test that matches wins.
_KINDS = (
    ("backward (gradients, autograd buffers)", lambda f: f["name"] == "backward"),
    ("ACM (acm_d2/layers)", lambda f: "acm_d2/layers/" in f["filename"]),
    ("conv activations", lambda f: "conv" in f["name"].lower() or "wrappers.py" in f["filename"]),
    ("norm activations", lambda f: "norm" in f["name"].lower() or "norm" in f["filename"]),
    ("heads (RPN, ROI, losses)", lambda f: "proposal_generator" in f["filename"]),
    ("heads (RPN, ROI, losses)", lambda f: "roi_heads" in f["filename"]),
    ("backbone, other", lambda f: "backbone" in f["filename"]),
)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/acm_d2/", "/detectron2/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker == "site-packages/" else marker.strip("/") + "/" + tail
    return "/".join(filename.split("/")[-2:])


def _where(frames: list) -> str:
    """The innermost frame in acm_d2 or Detectron2 code (else the innermost frame) as file:line function."""
    chosen = next(
        (f for f in frames if "acm_d2/" in f["filename"] or "detectron2/" in f["filename"]),
        frames[0] if frames else None,
    )
    return f"{_short(chosen['filename'])}:{chosen['line']} {chosen['name']}" if chosen else "?"


def _kind(frames: list) -> str:
    for what, test in _KINDS:
        if any(test(f) for f in frames):
            return what
    return "other"


def peak_allocations(snapshot: dict, device: int = 0, top: int = 15) -> dict:
    """Replay the snapshot's allocation trace of `device`: the peak of the bytes allocated inside the
    recorded window (blocks allocated before it and freed inside it are not counted), and the blocks
    live at that peak, grouped by `_where` (top `top`) and by kind."""
    trace = snapshot["device_traces"][device]
    live, current, peak, peak_at = {}, 0, 0, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            current += event["size"] - live.pop(event["addr"], {"size": 0})["size"]
            live[event["addr"]] = event
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, peak_at = current, i
    live = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups, kinds = {}, collections.Counter()
    for event in live.values():
        frames = event.get("frames") or []
        key = _where(frames)
        size, count = groups.get(key, (0, 0))
        groups[key] = (size + event["size"], count + 1)
        kinds[_kind(frames)] += event["size"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {
        "peak_gib": peak / GIB,
        "events": len(trace),
        "by_kind_gib": {k: v / GIB for k, v in kinds.most_common()},
        "top": [
            {"where": where, "gib": size / GIB, "blocks": count}
            for where, (size, count) in ranked[:top]
        ],
    }


def record_step_memory(
    step: Callable[[], None], snapshot_path: Optional[str] = None, max_entries: int = 500_000
) -> dict:
    """Peak memory of one call of `step` (CUDA) above what was allocated before it, from the allocator's
    own counter and from its history (`peak_allocations`); the snapshot pickled (gzip) to
    snapshot_path if given, for https://pytorch.org/memory_viz."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if snapshot_path:
        with gzip.open(snapshot_path, "wb") as f:
            pickle.dump(snapshot, f)
    result = peak_allocations(snapshot, torch.cuda.current_device())
    result.update(
        base_gib=base / GIB,
        max_allocated_above_base_gib=(torch.cuda.max_memory_allocated() - base) / GIB,
        snapshot=snapshot_path,
    )
    return result
