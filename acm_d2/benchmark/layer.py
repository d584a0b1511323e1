"""One ACM layer, reference against fused: forward (eval, no grad) and forward+backward (train, loss =
sum(y * dy) + sum(d)), interleaved repetitions, medians, the ratio to the memory-traffic floor, and the
kernel launches and host syncs of one call.

The floor is the time to move the bytes that any implementation must move, at the copy bandwidth
measured on the device (`copy_bandwidth_gbs`): forward one read of x and one write of y (2 x bytes of
x); forward+backward adds one read each of x and dy and one write of dx (5 x bytes of x).
"""

import argparse
import collections
import json
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..layers.acm import ACM_VARIANTS, AttendAndCompare

__all__ = [
    "IMPLS",
    "R50_FPN_SHAPES",
    "make_modules",
    "make_step",
    "bench_ms",
    "copy_bandwidth_gbs",
    "floor_ms",
    "count_launches_and_syncs",
    "benchmark_layer",
    "print_rows",
    "main",
]

IMPLS = ("reference", "fused")
# The inputs of the ACMs of a Mask R-CNN R50-FPN for 2 images of 800 x 1216 (res2-res5).
R50_FPN_SHAPES = {
    "res2": (2, 256, 200, 304),
    "res3": (2, 512, 100, 152),
    "res4": (2, 1024, 50, 76),
    "res5": (2, 2048, 25, 38),
}
# CUDA runtime/driver calls counted by count_launches_and_syncs, by the names torch.profiler gives them:
# a launch is any call whose name contains LAUNCH_CALL (cudaLaunchKernel, cudaLaunchKernelExC_v11060,
# cuLaunchKernel, cuLaunchKernelEx: Triton's), a sync one of SYNC_CALLS.
LAUNCH_CALL = "LaunchKernel"
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")
_L2_FLUSH_BYTES = (
    256 * 2**20
)  # larger than any GPU's L2, so every timed call starts with a cold cache


def make_modules(
    shape: Sequence[int], groups: int = 32, variant: str = "full", device="cpu", impls=IMPLS
) -> Dict[str, AttendAndCompare]:
    """One AttendAndCompare per impl, with the same (seeded) weights."""
    modules = {}
    for impl in impls:
        modules[impl] = AttendAndCompare(
            shape[1], num_groups=groups, variant=variant, impl=impl
        ).to(device)
        if impl != impls[0]:
            modules[impl].load_state_dict(modules[impls[0]].state_dict())
    return modules


def make_step(
    module: AttendAndCompare, x: torch.Tensor, dy: torch.Tensor, backward: bool
) -> Callable[[], None]:
    """One call of the layer: eval forward under no_grad, or train forward + backward of sum(y * dy) + sum(d)."""

    def step():
        if backward:
            x.grad = None
            module.zero_grad(set_to_none=True)
            y = module(x)
            loss = (y * dy).sum() + (module.orth_term.sum() if module.orth_term is not None else 0)
            loss.backward()
        else:
            with torch.no_grad():
                module(x)

    module.train(backward)
    return step


def bench_ms(
    fns: Dict[str, Callable[[], None]], device, warmup: int = 3, reps: int = 20
) -> Dict[str, List[float]]:
    """Milliseconds of each call of each function, the functions interleaved (so that drifting clocks hit
    them alike). CUDA: CUDA events around each call, the L2 cache flushed before it (as
    triton.testing.do_bench does); CPU: perf_counter."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    if device.type != "cuda":
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        return times
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    events = {name: [] for name in fns}
    torch.cuda.synchronize(device)
    for _ in range(reps):
        for name, fn in fns.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize(device)
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def copy_bandwidth_gbs(device, nbytes: Optional[int] = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes), counting the bytes read plus the bytes
    written, from the median time of copying `nbytes` (default 1 GiB on CUDA, 64 MiB on CPU)."""
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = statistics.median(
        bench_ms({"copy": lambda: dst.copy_(src)}, device, warmup=2, reps=reps)["copy"]
    )
    return 2 * nbytes / (ms * 1e-3) / 1e9


def floor_ms(x: torch.Tensor, bandwidth_gbs: float) -> Dict[str, float]:
    """The memory-traffic floor of one layer call, ms: fwd 2 x bytes of x, fwd+bwd 5 x bytes of x."""
    bytes_x = x.numel() * x.element_size()
    return {"fwd": 2 * bytes_x / bandwidth_gbs / 1e6, "fwd+bwd": 5 * bytes_x / bandwidth_gbs / 1e6}


def count_launches_and_syncs(step: Callable[[], None], calls: int = 3) -> Dict[str, float]:
    """Per call of `step` (CUDA), from torch.profiler, counting the host-side events inside the calls:
    launches = CUDA runtime/driver launch calls (names containing LAUNCH_CALL: cudaLaunchKernel,
    cuLaunchKernelEx (Triton's), ...); syncs = calls that wait for the GPU (SYNC_CALLS) plus device-to-host
    copies (memcpy DtoH, which block the host); kernels = GPU kernels in the profiled window; runtime_calls
    = every CUDA runtime/driver call inside the calls, by name, so that an uncounted kind shows up."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            with record_function("acm_layer_call"):
                step()
        torch.cuda.synchronize()
    events = list(prof.events())
    ranges = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.name == "acm_layer_call" and e.device_type == torch.autograd.DeviceType.CPU
    ]

    def inside(e):
        return any(start <= e.time_range.start and e.time_range.end <= end for start, end in ranges)

    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and inside(e)]
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(LAUNCH_CALL in e.name for e in cpu)
    syncs = sum(e.name in SYNC_CALLS for e in cpu) + sum("DtoH" in e.name for e in gpu)
    kernels = sum(not e.name.startswith("Memcpy") and not e.name.startswith("Memset") for e in gpu)
    runtime = collections.Counter(e.name for e in cpu if _RUNTIME_CALL.match(e.name))
    kernel_us = collections.Counter()
    for e in gpu:
        kernel_us[e.name[:60]] += e.time_range.elapsed_us() / calls
    # Host time of a call against the GPU time of its kernels: which side bounds the call.
    host_ms = sum(end - start for start, end in ranges) / calls / 1e3
    return {
        "launches": launches / calls,
        "syncs": syncs / calls,
        "kernels": kernels / calls,
        "host_ms": host_ms,
        "kernel_ms": sum(kernel_us.values()) / 1e3,
        "kernel_us": dict(kernel_us.most_common()),
        "runtime_calls": {name: n / calls for name, n in sorted(runtime.items())},
    }


def benchmark_layer(
    shape: Sequence[int],
    dtype=torch.float32,
    device="cuda",
    groups: int = 32,
    variant: str = "full",
    warmup: int = 3,
    reps: int = 20,
    bandwidth_gbs: Optional[float] = None,
    count_calls: Optional[bool] = None,
) -> List[dict]:
    """Rows {impl, mode, median_ms, ms_all, vs_reference, vs_floor, floor_ms, launches, syncs, kernels} for
    reference and fused, fwd and fwd+bwd. vs_floor needs bandwidth_gbs; launch counts are CUDA only."""
    device = torch.device(device)
    count_calls = device.type == "cuda" if count_calls is None else count_calls
    torch.manual_seed(0)
    modules = make_modules(shape, groups, variant, device)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    floors = floor_ms(x, bandwidth_gbs) if bandwidth_gbs else {}
    rows = []
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        steps = {impl: make_step(module, x, dy, backward) for impl, module in modules.items()}
        times = bench_ms(steps, device, warmup, reps)
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        for impl in steps:
            row = {
                "impl": impl,
                "mode": mode,
                "median_ms": medians[impl],
                "ms_all": times[impl],
                "vs_reference": medians[impl] / medians["reference"],
                "floor_ms": floors.get(mode),
                "vs_floor": medians[impl] / floors[mode] if floors else None,
            }
            if count_calls:
                row.update(count_launches_and_syncs(steps[impl]))
            rows.append(row)
    return rows


def print_rows(rows: List[dict], title: str) -> None:
    print(title)
    print(
        f"{'impl':<10} {'mode':<8} {'ms':>9} {'x ref':>7} {'x floor':>8} {'launches':>9} {'syncs':>6}"
    )
    for r in rows:
        vs_floor = f"{r['vs_floor']:8.1f}" if r["vs_floor"] is not None else f"{'-':>8}"
        print(
            f"{r['impl']:<10} {r['mode']:<8} {r['median_ms']:9.3f} {r['vs_reference']:7.2f} {vs_floor} "
            f"{r.get('launches', '-'):>9} {r.get('syncs', '-'):>6}"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Micro-benchmark of one ACM layer, reference vs fused (see acm_d2/benchmark/layer.py).",
        epilog="python tools/benchmark_acm_layer.py                # CUDA, 2x256x200x304 (res2 of an 800x1216 pair)\n"
        "python tools/benchmark_acm_layer.py --device cpu   # CPU, 2x256x50x76\n"
        "python tools/benchmark_acm_layer.py --scratch --shape 1024 2048 7 7   # backward scratch, no GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        metavar=("B", "C", "H", "W"),
        help="default: 2 256 200 304 on CUDA, 2 256 50 76 on CPU",
    )
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--variant", default="full", choices=sorted(ACM_VARIANTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--reps", type=int, default=20, help="timed repetitions of each measurement"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--bandwidth",
        type=float,
        help="memory bandwidth for the floor, GB/s (default: measured by a device copy)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--scratch",
        action="store_true",
        help="only print the scratch memory of the Triton backward for --shape on an H100 (no GPU needed)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ([2, 256, 200, 304] if device.type == "cuda" else [2, 256, 50, 76])
    if args.scratch:
        from ..layers.acm_fused.aot import backward_scratch_bytes

        x_mib = torch.empty(shape, dtype=getattr(torch, args.dtype), device="meta").nbytes / 2**20
        scratch = backward_scratch_bytes(
            shape, args.groups, args.variant, getattr(torch, args.dtype)
        )
        print(
            f"Triton backward of ACM {args.variant}, x {'x'.join(map(str, shape))} {args.dtype}, G={args.groups}: "
            f"scratch {scratch / 2**20:.1f} MiB besides dx (x itself {x_mib:.1f} MiB)"
        )
        return scratch
    bandwidth = args.bandwidth or copy_bandwidth_gbs(device)
    rows = benchmark_layer(
        shape,
        getattr(torch, args.dtype),
        device,
        args.groups,
        args.variant,
        args.warmup,
        args.reps,
        bandwidth,
    )
    print_rows(
        rows,
        f"ACM {args.variant}, x {'x'.join(map(str, shape))} {args.dtype}, G={args.groups}, {device}, median of {args.reps}",
    )
    floors = {r["mode"]: r["floor_ms"] for r in rows}
    print(
        f"memory floor at {bandwidth:.0f} GB/s: fwd {floors['fwd']:.3f} ms, fwd+bwd {floors['fwd+bwd']:.3f} ms"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "shape": shape, "bandwidth_gbs": bandwidth, "results": rows},
                f,
                indent=2,
            )
    return rows
