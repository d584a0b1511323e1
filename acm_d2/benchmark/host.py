"""Host (Python and dispatch) time of one fused-ACM call, measured without a GPU.

The fused ACM's Triton path runs with its launches recorded instead of run, as the ahead-of-time
check records them (acm_d2/layers/acm_fused/aot.py), sized for an H100 (132 SMs). What is left is the
host work a GPU step pays per ACM call: the autograd Function, the launch parameters, the allocations,
the launch calls and any small torch op. The same figure for a 1x1 Conv2d + BatchNorm2d of the same
batch and channels (the block's last conv and norm, just before ACM) runs side by side, and the torch
backend's. Not included: Triton's launcher, timed apart: its Python argument binder and specialiser
(Triton's own, for sm_90) runs on the recorded launches; its cache lookup and the CUDA driver's launch
(~5 us per launch of a cached kernel, public figures) are not, nor entering the CUDA device guard.

The tensors are CPU tensors with a 1 x 1 map by default (--hw): CPU ops and allocations of that size
are C++ dispatch plus a few microseconds of compute, like a CUDA op's host side. On `meta` tensors
(--device meta, the full map) several ops (empty_like, batch_norm, convolution) run Python meta
kernels that a CUDA call never runs, which overstates everything but the Triton path's own code.

Also counts, per call, the Triton launches and the torch ops that would launch a kernel on a GPU
(views, allocations and metadata do not), and prints where the host time goes (cProfile).

    python -m acm_d2.benchmark.host --shape res2 --groups 32 --json host.json
"""

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import statistics
import time
from typing import Callable, Dict, List, NamedTuple
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from acm_d2.layers.acm_fused import acm_fused, aot

__all__ = [
    "Call",
    "acm_call",
    "conv_bn_call",
    "count_launches",
    "host_time_us",
    "binder_time_us",
    "breakdown",
]

H100_SMS = aot.TARGETS[90]

# Operators that allocate without writing or only make metadata: no kernel on a GPU.
_NO_KERNEL = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
}


class Call(NamedTuple):
    """One layer call: forward() returns its outputs, backward(outputs) takes the gradients;
    infer() is the inference forward (eval mode, no autograd)."""

    forward: Callable[[], tuple]
    backward: Callable[[tuple], None]
    infer: Callable[[], object]


def acm_call(
    shape,
    groups: int = 32,
    variant: str = "full",
    dtype=torch.float32,
    backend: str = "triton",
    device: str = "meta",
) -> Call:
    """A training call of the fused ACM (orthogonality term in the loss where the variant has it);
    on the Triton backend run it inside `recording(...)`, which records the launches."""
    x, kw, qw, p_params = (
        t if t is None or not isinstance(t, torch.Tensor) else _on(t, device)
        for t in aot.meta_inputs(shape, groups, variant, dtype)
    )
    p_params = None if p_params is None else tuple(_on(t, device) for t in p_params)
    kb = torch.zeros(groups, device=device)
    qb = None if qw is None else torch.zeros_like(kb)
    leaves = [t for t in (x, kw, kb, qw, qb, *(p_params or ())) if t is not None]
    for t in leaves:
        t.requires_grad_()
    need_orth = qw is not None
    grads = (torch.ones_like(x), torch.ones(shape[0], device=device))

    def forward():
        return acm_fused(x, kw, kb, qw, qb, p_params, groups, need_orth, backend=backend)

    @torch.no_grad()
    def infer():
        return acm_fused(x, kw, kb, qw, qb, p_params, groups, False, backend=backend)

    def backward(out):
        y, d = out
        outputs, grad_outputs = ((y, d), grads) if need_orth else ((y,), grads[:1])
        torch.autograd.grad(outputs, leaves, grad_outputs)

    return Call(forward, backward, infer)


def conv_bn_call(shape, dtype=torch.float32, device: str = "meta") -> Call:
    """A training call of a bias-free 1x1 Conv2d (C -> C) + BatchNorm2d."""
    C = shape[1]
    conv = nn.Conv2d(C, C, 1, bias=False, device=device, dtype=dtype)
    bn = nn.BatchNorm2d(C, device=device, dtype=dtype)
    x = torch.ones(shape, device=device, dtype=dtype, requires_grad=True)
    leaves = [x, conv.weight, bn.weight, bn.bias]
    grad = torch.ones(shape, device=device, dtype=dtype)
    frozen = nn.Sequential(conv, nn.BatchNorm2d(C, device=device, dtype=dtype)).eval()
    return Call(
        lambda: (bn(conv(x)),),
        lambda out: torch.autograd.grad(out, leaves, (grad,)),
        torch.no_grad()(lambda: frozen(x)),
    )


def _on(t: torch.Tensor, device: str) -> torch.Tensor:
    """A tensor like the meta tensor t on device (ones: values do not change the host work)."""
    return t if device == "meta" else torch.ones(t.shape, dtype=t.dtype, device=device)


@contextlib.contextmanager
def recording(launch=None, num_sms: int = H100_SMS):
    """Triton launches go to launch(kernel, grid, *args, **meta) (default: dropped) instead of
    running. On CPU tensors acm_fused's backend="triton" asks for TRITON_INTERPRET=1, a guard for
    real launches; nothing is launched here, so the guard is satisfied for the duration."""
    with (
        aot.recorded_launches(launch or _no_launch, num_sms),
        mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}),
    ):
        yield


class _KernelOps(TorchDispatchMode):
    """The torch ops dispatched while active that would launch a kernel on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _NO_KERNEL and not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count_launches(call: Call, num_sms: int = H100_SMS) -> Dict[str, List[str]]:
    """What one forward and one backward launch: Triton kernels by name, torch ops by operator."""
    counts, launches = {}, []
    with recording(lambda kernel, grid, *a, **m: launches.append(kernel.fn.__name__), num_sms):
        out = None
        for phase in ("forward", "backward"):
            launches.clear()
            with _KernelOps() as ops:
                out = call.forward() if phase == "forward" else call.backward(out)
            counts[phase] = launches + ops.ops
    return counts


def host_time_us(fn: Callable[[], object], calls: int = 100, repeats: int = 15) -> List[float]:
    """Microseconds per fn() in each of `repeats` runs of `calls` calls, after a warm-up run."""
    for _ in range(calls):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return runs


def binder_time_us(call: Call, calls: int = 100, repeats: int = 15, arch: int = 90) -> List[float]:
    """Microseconds per forward + backward spent in Triton's argument binder (the Python part of
    its JIT launcher, run on every launch), over the launches of one call, per timed run."""
    launches = []
    with recording(lambda kernel, grid, *a, **m: launches.append((kernel, a, m))):
        call.backward(call.forward())
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    bound = [(aot.binder(kernel, target)[1], a, m) for kernel, a, m in launches]

    def bind_all():
        for bind, a, m in bound:
            bind(*a, **m)

    return host_time_us(bind_all, calls, repeats)


def _train_step(call: Call) -> Callable[[], None]:
    return lambda: call.backward(call.forward())


def _no_launch(kernel, grid, *args, **meta):
    pass


# cProfile's own-time of each function, summed per category of host work (first match wins).
_CATEGORIES = (
    ("launch (recorded, not run)", lambda f, n: n in ("_no_launch", "_launch")),
    (
        "launch parameters",
        lambda f, n: (
            f.endswith("triton_backend.py")
            and n in ("stream_config", "stats_config", "_num_sms", "_x_strides", "_next_power_of_2")
        ),
    ),
    (
        "allocations",
        lambda f, n: f == "~" and any(k in n for k in ("empty", "zeros", "full")),
    ),
    (
        "autograd engine and Function",
        lambda f, n: "torch/autograd" in f or (f == "~" and ("_EngineBase" in n or "apply" in n)),
    ),
    ("torch ops (views, metadata)", lambda f, n: f == "~" and ("torch" in n or "Tensor" in n)),
    ("acm_d2 Python (op.py, backends)", lambda f, n: "acm_fused" in f),
    ("other Python (torch utilities, autograd.grad checks)", lambda f, n: True),
)


def breakdown(fn: Callable[[], None], calls: int = 100) -> Dict[str, float]:
    """Share (0..1) of fn's host time per category, from cProfile's own-time of each function."""
    profile = cProfile.Profile()
    fn()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    shares = {name: 0.0 for name, _ in _CATEGORIES}
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        category = next(c for c, match in _CATEGORIES if match(filename, name))
        shares[category] += own
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="res2", choices=list(aot.SHAPES))
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--variant", default="full", choices=["full", "no_p", "no_q"])
    parser.add_argument("--dtype", default="float32", choices=list(aot.DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "meta"])
    parser.add_argument(
        "--hw", nargs=2, type=int, default=[1, 1], help="map size on the CPU (meta: the shape's)"
    )
    parser.add_argument("--calls", type=int, default=100, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs (the fastest reported)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    shape, dtype, device = aot.SHAPES[args.shape], aot.DTYPES[args.dtype], args.device
    if device != "meta":
        shape = (*shape[:2], *args.hw)
    rows = {
        "acm_fused_triton": acm_call(shape, args.groups, args.variant, dtype, device=device),
        "acm_fused_torch": acm_call(shape, args.groups, args.variant, dtype, "torch", device),
        "conv1x1_bn": conv_bn_call(shape, dtype, device),
    }
    result = dict(
        shape=list(shape),
        device=device,
        groups=args.groups,
        variant=args.variant,
        dtype=args.dtype,
        torch=torch.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.node()}",
        python=platform.python_version(),
        rows={},
    )
    print(
        f"host time per call, {args.shape} channels on {tuple(shape)} {device} tensors, "
        f"G={args.groups} {args.variant} {args.dtype}; Triton launches recorded, not run"
    )
    print(f"us per call: fastest of {args.repeats} runs of {args.calls} calls (median)\n")
    print(
        f"{'call':<18} {'inference':>16} {'train fwd':>16} {'train fwd+bwd':>16}  launches fwd/bwd"
    )
    with recording():
        for name, call in rows.items():
            runs = {
                phase: host_time_us(fn, args.calls, args.repeats)
                for phase, fn in (
                    ("inference", call.infer),
                    ("forward", call.forward),
                    ("train", _train_step(call)),
                )
            }
            counts = count_launches(call)
            row = result["rows"][name] = dict(
                launches_forward=counts["forward"], launches_backward=counts["backward"]
            )
            for phase, times in runs.items():
                row[f"{phase}_us"] = min(times)
                row[f"{phase}_us_median"] = statistics.median(times)
            print(
                f"{name:<18} "
                + " ".join(f"{_fmt(runs[p]):>16}" for p in ("inference", "forward", "train"))
                + f"  {len(counts['forward']):>8}/{len(counts['backward'])}"
            )
        triton, conv_bn = result["rows"]["acm_fused_triton"], result["rows"]["conv1x1_bn"]
        for phase in ("inference", "train"):
            ratio = result[f"ratio_triton_to_conv_bn_{phase}"] = (
                triton[f"{phase}_us"] / conv_bn[f"{phase}_us"]
            )
            print(
                f"\nACM (Triton path) / Conv2d+BatchNorm2d, {phase} host time: {ratio:.2f}x", end=""
            )
        bind = binder_time_us(rows["acm_fused_triton"], args.calls, args.repeats)
        result["triton_binder_train_us"] = min(bind)
        n = len(triton["launches_forward"]) + len(triton["launches_backward"])
        print(
            f"\nnot in the figures above: Triton's argument binder (sm_90) on the {n} launches of the "
            f"Triton path, {_fmt(bind)} us per fwd+bwd"
        )
        shares = breakdown(_train_step(rows["acm_fused_triton"]), args.calls)
    result["breakdown_triton_train_us"] = {k: v * triton["train_us"] for k, v in shares.items()}
    print("\nwhere the ACM fwd+bwd host time goes (cProfile own-time shares x the figure above):")
    for k, v in shares.items():
        print(f"  {k:<52} {v * triton['train_us']:7.1f} us  {100 * v:5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")


def _fmt(runs: List[float]) -> str:
    return f"{min(runs):.1f} ({statistics.median(runs):.0f})"


if __name__ == "__main__":
    main()
