"""Ahead-of-time checks of the fused ACM's Triton kernels, without a GPU: compile and resources, and
the scratch memory of a backward.

The compile check compiles exactly what `triton_backend.forward` / `backward` would launch for a given input shape on
a given GPU: the launches are recorded from the real launch code run on `meta` tensors (with the SM
count of the target), specialised by Triton's own argument binder, compiled for the target with
`triton.compile`, and the PTX is assembled by the ptxas that Triton bundles with `-v` for registers,
spills, stack and shared memory.

This relies on Triton's internal compile API (3.x: `ASTSource`, `JITFunction._pack_args`, the
binder of `triton.runtime.jit`); `check_triton_api` fails with a clear message if an upgrade moved
them. It is a check of resources, not of results: only a GPU run says the kernels compute right.

    python -m acm_d2.layers.acm_fused.aot --arch 90 --dtype bfloat16 --groups 32
"""

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from typing import Dict, List, NamedTuple, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import triton_backend

# Targets: (compute capability, SM count) of an A100 and an H100.
TARGETS = {80: 108, 90: 132}
# Mask R-CNN R50-FPN on 2 x 800 x 1216 images (res2..res5 of the backbone, batch 2), Faster R-CNN
# C4's ROI head res5 (512 regions per image x 2 images, 7 x 7 after its stride), and batch 1.
SHAPES = {
    "res2": (2, 256, 200, 304),
    "res3": (2, 512, 100, 152),
    "res4": (2, 1024, 50, 76),
    "res5": (2, 2048, 25, 38),
    "c4_roi_res5": (1024, 2048, 7, 7),
    "res2_b1": (1, 256, 200, 304),
    "res5_b1": (1, 2048, 25, 38),
}
GROUPS = (8, 16, 32, 64, 128)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Launch(NamedTuple):
    kernel: object  # triton JITFunction
    grid: tuple
    args: tuple
    meta: dict


class KernelReport(NamedTuple):
    kernel: str
    arch: int
    dtype: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int


def check_triton_api():
    """The Triton internals this module uses, or an error naming what moved."""
    import triton
    from triton.compiler import ASTSource  # noqa: F401
    from triton.runtime import jit

    missing = [n for n in ("create_function_from_signature",) if not hasattr(jit, n)]
    missing += [
        n
        for n in ("_pack_args", "signature", "params")
        if not hasattr(triton_backend._fwd_reduce_kernel, n)
    ]
    if missing:
        raise RuntimeError(
            f"acm_d2's ahead-of-time kernel check uses Triton internals that Triton {triton.__version__} "
            f"does not have: {missing}; update acm_d2/layers/acm_fused/aot.py for this Triton"
        )


def meta_inputs(
    shape,
    groups: int,
    variant: str = "full",
    dtype: torch.dtype = torch.float32,
    reduction: int = 2,
):
    """x and the ACM weights of one layer as `meta` tensors (shapes only): (x, k_weight, q_weight, p_params)."""
    C = shape[1]
    meta = dict(device="meta")
    x = torch.empty(shape, dtype=dtype, **meta)
    cg, hidden = C // groups, C // reduction
    kw = torch.empty((groups, cg, 1, 1), **meta)
    qw = None if variant == "no_q" else torch.empty_like(kw)
    p_params = None
    if variant != "no_p":
        p_params = tuple(
            torch.empty(s, **meta)
            for s in [(hidden, cg, 1, 1), (hidden,), (C, hidden // groups, 1, 1), (C,)]
        )
    return x, kw, qw, p_params


@contextlib.contextmanager
def recorded_launches(launch, num_sms: int):
    """While active, the Triton backend calls launch(kernel, grid, *args, **meta) instead of launching,
    and sizes its launches for a GPU with num_sms SMs: it runs on `meta` tensors, no GPU needed."""
    with (
        mock.patch.object(triton_backend, "_launch", launch),
        mock.patch.object(triton_backend, "_num_sms", lambda t: num_sms),
    ):
        yield


def _dry_run(shape, groups, variant, dtype, num_sms, launch, backward_mode=contextlib.nullcontext):
    """One training forward + backward of the Triton backend on meta tensors, `launch` standing in for
    the kernel launches; the backward runs inside backward_mode()."""
    x, kw, qw, p_params = meta_inputs(shape, groups, variant, dtype)
    need_orth = qw is not None
    with recorded_launches(launch, num_sms):
        _, _, mu, pooled, lse, p = triton_backend.forward(x, kw, qw, p_params, groups, need_orth)
        grad_d = torch.empty((shape[0],), device="meta") if need_orth else None
        grad_y = torch.empty_like(x)
        with backward_mode():
            triton_backend.backward(grad_y, grad_d, x, kw, qw, p_params, mu, pooled, lse, p, groups)


def record_launches(
    shape, groups: int, variant: str, dtype: torch.dtype, num_sms: int
) -> List[Launch]:
    """The launches of one training forward + backward (orth term included where the variant has it)."""
    launches: List[Launch] = []
    _dry_run(
        shape,
        groups,
        variant,
        dtype,
        num_sms,
        lambda k, grid, *a, **m: launches.append(Launch(k, grid, a, m)),
    )
    return launches


class _Allocations(TorchDispatchMode):
    """Bytes of the tensors created (empty/empty_like/new_empty and ops' outputs) while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and func not in _VIEWS:
                self.bytes += t.numel() * t.element_size()
        return out


_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
}


def backward_scratch_bytes(
    shape,
    groups: int = 32,
    variant: str = "full",
    dtype: torch.dtype = torch.float32,
    num_sms: int = 132,
) -> int:
    """Bytes the Triton backward allocates besides dx (the x-sized gradient it must return), for an
    input of `shape` on a GPU with num_sms SMs; computed on meta tensors, no GPU needed."""
    alloc = _Allocations()
    _dry_run(shape, groups, variant, dtype, num_sms, lambda *a, **m: None, lambda: alloc)
    return alloc.bytes - torch.empty(shape, dtype=dtype, device="meta").nbytes


def binder(kernel, target):
    """(backend, bind) for kernel on target: bind(*args, **meta) is the argument binder and specialiser
    Triton's JIT launcher runs on every launch (the Python part of a launch)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(launch: Launch, arch: int):
    """(target, ASTSource, options) of a recorded launch, as Triton's launcher would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend, bind = binder(launch.kernel, target)
    bound_args, specialization, options = bind(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.meta, bound_args, specialization, options
    )
    return target, ASTSource(launch.kernel, signature, constexprs, attrs), options


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_LINE = re.compile(r"Used (\d+) registers")


def ptxas_resources(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spill stores/loads and stack bytes of the (single) kernel in ptx, from `ptxas -v`."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = _PTXAS_LINE.search(out)
    frame = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out
    )
    if regs is None or frame is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{out}")
    return dict(
        registers=int(regs.group(1)),
        stack=int(frame.group(1)),
        spill_stores=int(frame.group(2)),
        spill_loads=int(frame.group(3)),
    )


def compile_launches(launches: List[Launch], arch: int, cache: Dict = None) -> List[KernelReport]:
    """Compile each distinct specialisation once (cache: key -> report, shared across calls)."""
    import triton

    cache = {} if cache is None else cache
    reports = []
    for launch in launches:
        target, src, options = specialise(launch, arch)
        key = (
            launch.kernel.fn.__name__,
            arch,
            repr(sorted(src.signature.items())),
            repr(sorted(src.constants.items())),
            repr(src.attrs),
            options.num_warps,
        )
        if key not in cache:
            compiled = triton.compile(src, target=target, options=options.__dict__)
            res = ptxas_resources(compiled.asm["ptx"], arch)
            x_dtype = next(
                str(a.dtype).replace("torch.", "")
                for a in launch.args
                if isinstance(a, torch.Tensor)
            )
            cache[key] = KernelReport(
                launch.kernel.fn.__name__,
                arch,
                x_dtype,
                res["registers"],
                res["spill_stores"],
                res["spill_loads"],
                res["stack"],
                compiled.metadata.shared,
                compiled.metadata.num_warps,
            )
        reports.append(cache[key])
    return reports


def check_matrix(
    shapes, groups, dtypes, archs, variants=("full",), cache=None
) -> List[Tuple[str, int, KernelReport]]:
    """(shape name, G, report) for every launch of every combination; shapes where G does not divide
    the channels (or the hidden width) are skipped."""
    check_triton_api()
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        for g in groups:
            if shape[1] % g or (shape[1] // 2) % g:
                continue
            for dtype in dtypes:
                for arch in archs:
                    for variant in variants:
                        launches = record_launches(shape, g, variant, DTYPES[dtype], TARGETS[arch])
                        rows += [(name, g, r) for r in compile_launches(launches, arch, cache)]
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--groups", nargs="+", type=int, default=list(GROUPS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--archs", nargs="+", type=int, default=list(TARGETS), choices=list(TARGETS)
    )
    parser.add_argument("--variants", nargs="+", default=["full"], choices=["full", "no_p", "no_q"])
    args = parser.parse_args()
    rows = check_matrix(args.shapes, args.groups, args.dtypes, args.archs, args.variants)
    print(
        f"{'shape':<12} {'G':>4} {'kernel':<20} {'sm':>3} {'dtype':<9} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>6} {'warps':>5}"
    )
    seen = set()
    for name, g, r in rows:
        if (name, g, r) in seen:
            continue
        seen.add((name, g, r))
        print(
            f"{name:<12} {g:>4} {r.kernel:<20} {r.arch:>3} {r.dtype:<9} {r.registers:>5} {r.spill_stores:>5}/{r.spill_loads:<6} {r.stack:>6} {r.shared:>6} {r.num_warps:>5}"
        )
    spilling = {(name, g, r) for name, g, r in rows if r.spill_stores or r.spill_loads}
    print(f"{len(seen)} kernel compilations listed, {len(spilling)} with spills")


if __name__ == "__main__":
    main()
