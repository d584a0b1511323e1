"""Section breakdown: where one training step and one inference of Mask R-CNN R50-FPN go.

2 images of 800x1216 on a GPU, without ACM and with the fused ACM in all 16 blocks, fp32 and AMP bf16.
Per model and precision: the step's wall time (synchronised, unprofiled), its
GPU kernel time and top kernels; for ACM, per call, forward and backward (profiling.py): host time and
where it goes, launches, GPU time per kernel. The memory peak of one training step (memory.py) for
none, the fused ACM and the fused ACM with MODEL.CONTEXT_RECOMPUTE True, attributed to the
allocations live at the peak. The CPU version runs the same code on an R-18 at 64 px in fp32; what
needs a GPU is listed under "skipped" with the reason.
"""

import contextlib
import os
import time

import torch

from . import memory, profiling
from .common import Context, log
from .speed import model_args

MODELS = {
    "none": ["MODEL.CONTEXT_MODULE", "none"],
    "ACM fused": ["MODEL.CONTEXT_MODULE", "ACM", "MODEL.ACM.IMPL", "fused"],
    # Memory only: the recomputed forward runs the ACM hooks again inside the backward.
    "ACM fused, recompute": [
        *["MODEL.CONTEXT_MODULE", "ACM", "MODEL.ACM.IMPL", "fused"],
        *["MODEL.CONTEXT_RECOMPUTE", True],
    ],
}
SNAPSHOT_OF = ("fp32", "ACM fused")  # the run whose allocator snapshot is written (--snapshot-dir)


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def _timed_ms(ctx: Context, fn) -> float:
    _sync(ctx)
    start = time.perf_counter()
    fn()
    _sync(ctx)
    return (time.perf_counter() - start) * 1e3


def profile_model(ctx: Context, fn, model, acm: bool, warmup: int) -> dict:
    """Wall time of fn (after `warmup` calls), then one profiled call (timings, launches, kernels) and,
    with ACM, one more with Python stacks (where the host time goes; the stacks slow Python down)."""
    for _ in range(warmup):
        fn()
    result = {"wall_ms": _timed_ms(ctx, fn)}  # before the hooks, which cost a little host time
    with profiling.mark_acm_calls(model) if acm else contextlib.nullcontext():
        events = profiling.profile_events(fn, ctx.cuda)
        if ctx.cuda:
            result["gpu"] = profiling.step_kernels(events)
        if acm:
            result["acm"] = profiling.acm_breakdown(events)
            stacked = profiling.acm_breakdown(profiling.profile_events(fn, ctx.cuda, True))
            result["acm_python_stacks"] = {
                phase: {k: stacked[phase][k] for k in ("host_us_per_call", "self_us_per_call")}
                for phase in ("forward", "backward")
                if phase in stacked
            }
    return result


def _log_run(label: str, run: dict) -> None:
    for phase in ("train_step", "inference"):
        r = run[phase]
        gpu = (
            f", GPU kernels {r['gpu']['gpu_ms']:.1f} ms ({r['gpu']['kernels']} kernels)"
            if "gpu" in r
            else ""
        )
        log(f"breakdown {label} {phase}: {r['wall_ms']:.1f} ms{gpu}")
        if "acm" in r:
            for line in profiling.format_breakdown(f"{r['acm']['calls']} ACM calls", r["acm"]):
                log(line)
            for phase_name, p in r["acm_python_stacks"].items():
                parts = sorted(p["self_us_per_call"].items(), key=lambda kv: -kv[1])
                log(
                    f"      with Python stacks, {phase_name}: {p['host_us_per_call']:.0f} us/call: "
                    + ", ".join(f"{c} {us:.0f}" for c, us in parts[:7])
                )


def _log_memory(label: str, m: dict) -> None:
    log(
        f"breakdown memory {label}: peak {m['peak_gib']:.2f} GiB above {m['base_gib']:.2f} GiB "
        f"(allocator counter {m['max_allocated_above_base_gib']:.2f}); "
        + ", ".join(f"{k} {v:.2f}" for k, v in m["by_kind_gib"].items())
    )
    for t in m["top"][:6]:
        log(f"      {t['gib']:6.3f} GiB {t['blocks']:4d} blocks  {t['where'][:100]}")


def _measure_model(ctx: Context, bench, args, opts, dtype_name, batch, inputs, profiled, path):
    """The runs (profiled: training step and inference) and, on CUDA, the memory of one model."""
    from detectron2.utils.events import EventStorage

    dtype = bench.DTYPES[dtype_name]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype_name == "fp16")
    model, optimizer = bench.build(args.config, [*opts, *args.opts], args.device)
    acm = "ACM" in opts
    warmup = 2 if ctx.cuda else 1

    def train():
        bench.train_step(model, optimizer, batch, dtype, scaler)

    def infer():
        with (
            torch.no_grad(),
            torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            model(inputs)

    run, mem = None, None
    with EventStorage():
        if profiled:
            model.train()
            run = {"train_step": profile_model(ctx, train, model, acm, warmup)}
            model.eval()
            run["inference"] = profile_model(ctx, infer, model, acm, warmup)
        if ctx.cuda:
            model.train()
            for _ in range(0 if profiled else warmup):
                train()
            mem = memory.record_step_memory(train, path)
    return run, mem


def section_breakdown(ctx: Context) -> dict:
    from ..benchmark import model as bench

    args = bench.parse_args(model_args(ctx))
    batch = bench.synthetic_batch(args)
    inputs = [{k: v for k, v in batch[0].items() if k != "instances"}]
    if ctx.cuda:
        # fp16's ratios are the model section's; the breakdown keeps to the issue's two precisions.
        dtypes = ["fp32", "bf16"]
        skipped = {}
    else:
        dtypes = ["fp32"]
        skipped = {
            "bf16, fp16": "the CPU version profiles fp32 only; low-precision figures are a GPU's",
            "launches, GPU kernel time": "no CUDA: nothing is launched (aten ops are counted)",
            "memory": "needs CUDA (torch.cuda.memory._record_memory_history)",
        }
    out = {
        "config": os.path.relpath(args.config, bench.CONFIG_ROOT),
        "images": [args.images, args.height, args.width],
        "runs": {},
        "memory": {},
        "skipped": skipped,
    }
    for dtype_name in dtypes:
        for label, opts in MODELS.items():
            key = f"{dtype_name} {label}"
            profiled = "recompute" not in label
            if not (profiled or ctx.cuda):
                continue
            path = None
            if ctx.snapshot_dir and (dtype_name, label) == SNAPSHOT_OF:
                path = os.path.join(ctx.snapshot_dir, "memory_snapshot_fp32_acm.pickle.gz")
            run, mem = _measure_model(
                ctx, bench, args, opts, dtype_name, batch, inputs, profiled, path
            )
            if run is not None:
                out["runs"][key] = run
                _log_run(key, run)
            if mem is not None:
                out["memory"][key] = mem
                _log_memory(key, mem)
            if ctx.cuda:
                torch.cuda.empty_cache()
    return out


def breakdown_lines(b: dict) -> list:
    """The summary's lines: per run, wall and GPU ms, ACM host us and launches per call; memory peaks."""
    lines = [
        "breakdown     wall ms [GPU kernel ms, ACM's]; per ACM call: host us (launches) fwd / bwd"
    ]
    for key, run in b["runs"].items():
        parts = []
        for phase in ("train_step", "inference"):
            r = run[phase]
            gpu = ""
            if "gpu" in r:
                acm_gpu = f", ACM {r['acm']['gpu_ms']:.2f}" if "acm" in r else ""
                gpu = f" [{r['gpu']['gpu_ms']:.1f}{acm_gpu}]"
            acm = ""
            if "acm" in r:
                acm = " " + " / ".join(
                    f"{r['acm'][p]['host_us_per_call']:.0f} ({r['acm'][p]['launches_per_call']:.1f})"
                    for p in ("forward", "backward")
                    if p in r["acm"]
                )
            parts.append(f"{phase} {r['wall_ms']:.1f}{gpu}{acm}")
        lines.append(f"  {key:<22} " + ", ".join(parts))
    for key, m in b["memory"].items():
        lines.append(f"  memory {key:<27} peak {m['peak_gib']:.2f} GiB above {m['base_gib']:.2f}")
    lines += [f"  skipped {what}: {why}" for what, why in b["skipped"].items()]
    return lines
