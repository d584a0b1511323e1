"""Section correctness: the fused op (Triton and torch backends) against the reference AttendAndCompare."""

import contextlib
from typing import Callable, Dict, List

import torch

from ..layers.acm import AttendAndCompare
from ..layers.acm_fused import FUSED_VARIANTS, acm_fused, triton_available
from .common import DTYPE_NAMES, Context, log

_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@contextlib.contextmanager
def _no_tf32():
    """The reference's convolutions and matmuls in true float32 (cuDNN uses TF32 for convolutions by
    default, which is 1e-3 relative): the checks compare float32 maths, not TF32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference_module(
    variant: str, channels: int, groups: int, device, seed: int = 0
) -> AttendAndCompare:
    """A reference ACM in training mode with non-zero biases (so that they matter)."""
    torch.manual_seed(seed)
    ref = (
        AttendAndCompare(channels, num_groups=groups, variant=variant, impl="reference")
        .to(device)
        .train()
    )
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    return ref


def _outputs(
    forward: Callable, params: List[torch.Tensor], names: List[str], x, dy, dd
) -> Dict[str, torch.Tensor]:
    """y, d and the gradients of sum(y * dy) + sum(d * dd) w.r.t. x and params, by name."""
    x = x.detach().requires_grad_()
    y, d = forward(x)
    loss = (y.float() * dy).sum() + ((d * dd).sum() if d is not None else 0)
    grads = torch.autograd.grad(loss, [x] + params)
    out = {"y": y, "d": d, "dx": grads[0]}
    out.update(zip(names, grads[1:]))
    return out


def compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype) -> dict:
    """Max relative error per tensor (|got - want| over the largest |want|; for gradients over the largest
    entry of any gradient, the scale of the float32 tolerance) and pass/fail with the CPU
    tests' tolerances (tests/test_layers_acm_fused.py), with every absolute tolerance scaled by the size
    of what it bounds, since these shapes are larger than the tests' and their sums run over more
    positions: float32 inputs rtol 1e-5 and atol 1e-5 times max(1, the largest |y|) for y (likewise d),
    times max(1, the largest entry of any gradient) for gradients; bf16/fp16 inputs against float32 on
    the same values: y within one output ulp (2^-7 / 2^-10), d 1e-5, dx within an ulp of its largest
    entry, parameter gradients rtol 1e-4 and atol 1e-4 times max(1, the largest entry of any gradient)
    (the logits-bias gradients are exactly 0 in the fused form and rounding noise of that size in the
    reference)."""
    grad_names = [n for n in want if n not in ("y", "d")]
    grad_scale = max([1.0] + [want[n].abs().max().item() for n in grad_names])
    errors, failed = {}, []
    for name, w in want.items():
        g = got[name]
        if (g is None) != (w is None):
            failed.append(name)
            continue
        if w is None:
            continue
        g, w = g.float(), w.float()
        scale = grad_scale if name in grad_names else max(1.0, w.abs().max().item())
        if dtype == torch.float32:
            rtol, atol = 1e-5, 1e-5 * scale
        elif name == "y":
            rtol = atol = _ULP[dtype]
        elif name == "d":
            rtol, atol = 1e-5, 1e-5 * scale
        elif name == "dx":
            rtol, atol = 0.0, _ULP[dtype] * w.abs().max().item()
        else:
            rtol, atol = 1e-4, 1e-4 * grad_scale
        diff = (g - w).abs()
        # The logits-bias gradients are exactly 0 in the fused form and rounding noise in the reference:
        # relative to their own size that noise would read as a 100% error.
        errors[name] = diff.max().item() / max(
            w.abs().max().item(), grad_scale if name in grad_names else 0.0, 1e-30
        )
        if not bool((diff <= atol + rtol * w.abs()).all()) or not bool(torch.isfinite(g).all()):
            failed.append(name)
    return {"max_rel_err": errors, "passed": not failed, "failed": failed}


def _check_fused_op(ref: AttendAndCompare, backend: str, x, dy, dd, want: dict, dtype) -> dict:
    q, p1, p2 = ref.q_logits, ref.p_reduce, ref.p_expand
    names = [n for n, _ in ref.named_parameters()]
    params = list(ref.parameters())

    def forward(x):
        return acm_fused(
            x,
            ref.k_logits.weight,
            ref.k_logits.bias,
            q.weight if q else None,
            q.bias if q else None,
            (p1.weight, p1.bias, p2.weight, p2.bias) if p1 is not None else None,
            ref.num_groups,
            need_orth=ref.has_orth_term,
            backend=backend,
        )

    return compare(_outputs(forward, params, names, x.to(dtype), dy, dd), want, dtype)


def _check_fused_module(ref: AttendAndCompare, x, dy, dd, want: dict) -> dict:
    fused = (
        AttendAndCompare(ref.channels, ref.num_groups, ref.reduction, ref.variant, impl="fused")
        .to(x.device)
        .train()
    )
    fused.load_state_dict(ref.state_dict())
    names = [n for n, _ in fused.named_parameters()]
    return compare(
        _outputs(lambda x: (fused(x), fused.orth_term), list(fused.parameters()), names, x, dy, dd),
        want,
        x.dtype,
    )


def correctness_cases(ctx: Context):
    """(shapes, groups, backends, dtypes per variant) for this device and mode."""
    if not ctx.cuda:
        return (
            [(2, 64, 12, 20), (1, 64, 7, 9)],
            (8, 32),
            ("torch",),
            {v: (torch.float32, torch.bfloat16) for v in FUSED_VARIANTS},
        )
    backends = ("triton", "torch") if triton_available() else ("torch",)
    # 2x256x24x40; N = 143 (not a multiple of 16) with batch 1; full: one more N not a multiple of 16.
    shapes = [(2, 256, 24, 40), (1, 256, 13, 11)] + ([] if ctx.quick else [(2, 512, 17, 23)])
    low = (torch.bfloat16, torch.float16)
    # --quick: the half-precision inputs on the paper's variant only (fewer Triton compilations).
    dtypes = {
        v: (torch.float32,) + (low if not ctx.quick or v == "full" else ()) for v in FUSED_VARIANTS
    }
    return shapes, (8, 32), backends, dtypes


def section_correctness(ctx: Context) -> dict:
    shapes, group_sizes, backends, dtypes = correctness_cases(ctx)
    checks = []
    with _no_tf32():
        for variant in FUSED_VARIANTS:
            for groups in group_sizes:
                for shape in shapes:
                    ref = _reference_module(variant, shape[1], groups, ctx.device)
                    torch.manual_seed(1)
                    x32 = torch.randn(shape, device=ctx.device) * 2 + 0.5
                    dy32, dd = (
                        torch.randn(shape, device=ctx.device),
                        torch.randn(shape[0], device=ctx.device),
                    )
                    for dtype in dtypes[variant]:
                        # Low precision: the float32 reference on the same (rounded) values.
                        x, dy = x32.to(dtype).float(), dy32.to(dtype).float()
                        want = _outputs(
                            lambda x: (ref(x), ref.orth_term),
                            list(ref.parameters()),
                            [n for n, _ in ref.named_parameters()],
                            x,
                            dy,
                            dd,
                        )
                        for backend in backends:
                            result = _check_fused_op(ref, backend, x, dy, dd, want, dtype)
                            checks.append(
                                {
                                    "path": f"acm_fused[{backend}]",
                                    "variant": variant,
                                    "groups": groups,
                                    "shape": list(shape),
                                    "dtype": DTYPE_NAMES[dtype],
                                    **result,
                                }
                            )
                    passed = sum(
                        c["passed"]
                        for c in checks
                        if c["variant"] == variant
                        and c["groups"] == groups
                        and c["shape"] == list(shape)
                    )
                    total = sum(
                        1
                        for c in checks
                        if c["variant"] == variant
                        and c["groups"] == groups
                        and c["shape"] == list(shape)
                    )
                    log(
                        f"correctness {variant} G={groups} {'x'.join(map(str, shape))}: {passed}/{total} passed"
                    )
        # Memory layouts the module must accept: channels_last and a non-contiguous view.
        shape = shapes[0]
        ref = _reference_module("full", shape[1], 32, ctx.device)
        torch.manual_seed(2)
        wide = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], device=ctx.device) * 2 + 0.5
        layouts = {
            "channels_last": wide[..., : shape[3]].contiguous(memory_format=torch.channels_last),
            "non_contiguous": wide[..., ::2],
        }
        dy, dd = torch.randn(shape, device=ctx.device), torch.randn(shape[0], device=ctx.device)
        for layout, x in layouts.items():
            want = _outputs(
                lambda x: (ref(x), ref.orth_term),
                list(ref.parameters()),
                [n for n, _ in ref.named_parameters()],
                x.contiguous(),
                dy,
                dd,
            )
            result = _check_fused_module(ref, x, dy, dd, want)
            checks.append(
                {
                    "path": f"AttendAndCompare(impl='fused'), {layout}",
                    "variant": "full",
                    "groups": 32,
                    "shape": list(shape),
                    "dtype": "fp32",
                    **result,
                }
            )
            log(
                f"correctness {layout}: {'passed' if result['passed'] else 'FAILED ' + ', '.join(result['failed'])}"
            )
    failures = [c for c in checks if not c["passed"]]
    return {
        "passed": len(checks) - len(failures),
        "total": len(checks),
        "backends": list(backends),
        "tf32": False,
        "checks": checks,
        "failures": [
            f"{c['path']} {c['variant']} G={c['groups']} {c['dtype']} {c['shape']}: {c['failed']}"
            for c in failures
        ],
    }
