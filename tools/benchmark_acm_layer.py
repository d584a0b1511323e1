#!/usr/bin/env python
"""Micro-benchmark of one ACM layer: reference vs fused, forward (eval, no grad) and forward+backward
(train, loss = sum(y * dy) + sum(d)), interleaved repetitions, medians and ratios to the reference.

The memory floor is the time to move the bytes that any implementation must move (forward: one read of
x and one write of y; backward: one read each of x and dy and one write of dx) at --bandwidth GB/s.
On CUDA the kernel launches of one call are counted with torch.profiler.

    python tools/benchmark_acm_layer.py                       # CUDA, 2x256x200x304 (res2 of an 800x1216 pair)
    python tools/benchmark_acm_layer.py --device cpu          # CPU, 2x256x50x76
"""
import argparse
import json
import statistics
import time

import torch

from acm_d2.layers.acm import ACM_VARIANTS, AttendAndCompare

IMPLS = ("reference", "fused")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), help="default: 2 256 200 304 on CUDA, 2 256 50 76 on CPU")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--variant", default="full", choices=sorted(ACM_VARIANTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions of each measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=3000.0, help="device memory bandwidth, GB/s (H100: ~3000)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser.parse_args()


def make_step(module, x, dy, backward):
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

    return step


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def count_launches(step):
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    args = parse_args()
    device = torch.device(args.device)
    shape = args.shape or ([2, 256, 200, 304] if device.type == "cuda" else [2, 256, 50, 76])
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    modules = {}
    for impl in IMPLS:
        torch.manual_seed(0)  # same weights for both
        modules[impl] = AttendAndCompare(shape[1], num_groups=args.groups, variant=args.variant, impl=impl).to(device)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)

    results = {}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        steps = {}
        for impl, module in modules.items():
            module.train(backward)
            steps[impl] = make_step(module, x, dy, backward)
            for _ in range(args.warmup):
                steps[impl]()
        times = {impl: [] for impl in IMPLS}
        for _ in range(args.reps):  # interleaved, so drifts (clocks, other load) hit both alike
            for impl in IMPLS:
                times[impl].append(timed(steps[impl], device))
        for impl in IMPLS:
            results[(impl, mode)] = {"median_ms": statistics.median(times[impl])}
            if device.type == "cuda":
                results[(impl, mode)]["launches"] = count_launches(steps[impl])

    bytes_x = x.numel() * x.element_size()
    floor_ms = {"fwd": 2 * bytes_x / args.bandwidth / 1e6, "fwd+bwd": 5 * bytes_x / args.bandwidth / 1e6}
    rows = []
    print(f"ACM {args.variant}, x {'x'.join(map(str, shape))} {args.dtype}, G={args.groups}, {device}, median of {args.reps}")
    print(f"{'impl':<10} {'mode':<8} {'ms':>9} {'x ref':>7} {'x floor':>8} {'launches':>9}")
    for (impl, mode), r in results.items():
        r["vs_reference"] = r["median_ms"] / results[("reference", mode)]["median_ms"]
        r["vs_floor"] = r["median_ms"] / floor_ms[mode]
        print(f"{impl:<10} {mode:<8} {r['median_ms']:9.3f} {r['vs_reference']:7.2f} {r['vs_floor']:8.1f} {r.get('launches', '-'):>9}")
        rows.append({"impl": impl, "mode": mode, **r})
    print(f"memory floor at {args.bandwidth:g} GB/s: fwd {floor_ms['fwd']:.3f} ms, fwd+bwd {floor_ms['fwd+bwd']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "shape": shape, "floor_ms": floor_ms, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
