"""The fused ACM op: `acm_fused`, its autograd, its `torch.library` op pair and the choice of backend.

Paper: "Learning Visual Context by Comparison", Kim et al., ECCV 2020 (https://arxiv.org/abs/2007.07506).

Per sample b and group g (Cg = C / G channels, N = H * W positions, x_n the Cg-vector at position n),
with heads j in {K, Q} (no_q: K only):

    mu    = 1/N sum_n x_n
    s_jn  = w_j . x_n,   a_jn = softmax_n(s_jn)       the logits bias and mu shift every s_jn equally
    p_j   = sum_n a_jn x_n                            so K = p_K - mu, Q = p_Q - mu
    P     = sigmoid(W2 relu(W1 mu + b1) + b2)         P's grouped convs only mix channels of group g
    shift = p_K - p_Q  (full, no_p)  |  p_K - mu  (no_q)
    y_n   = P * (x_n + shift)                          (no_p: P = 1)
    d     = sum_c K_c Q_c / C                          summed over all groups

Forward: one pass over x gives mu, p_j and the softmax normaliser lse_j (online softmax), then one
elementwise pass writes y. Only x and O(B*C) vectors are saved (mu, p_j, P, lse_j).

Backward, from dy and dd. With S1 = sum_n dy_n and S2 = sum_n dy_n * x_n (per channel):

    dP     = S2 + shift * S1,     dshift = P * S1
    dp_K   = dshift + dd Q / C,   dp_Q = -dshift + dd K / C,   dmu = -dd (K + Q) / C     (full, no_p)
    dp_K   = dshift,              dmu = -dshift                                            (no_q)
    dmu   += W1^T [(W2^T (dP P (1 - P))) * (W1 mu + b1 > 0)]   and P's weight grads, sums over b
    r_jn   = a_jn (dp_j . x_n - dp_j . p_j)            = dL/ds_jn (softmax backward)
    dx_n   = P dy_n + dmu / N + sum_j (a_jn dp_j + r_jn w_j)
    dw_j   = sum_b sum_n r_jn x_n,      db_j = sum_n r_jn = 0 exactly (softmax is shift invariant)

so the backward needs one reduction pass over (x, dy) for S1, S2, the small per-(b, channel) maths,
and one pass that recomputes a_jn from x and the saved lse_j, writes dx and accumulates dw_j. Every
sum runs in float32 (float64 for float64 inputs on the torch backend) whatever the input dtype.

Both backends return the same tensors, so a device whose Triton fails (no C compiler for Triton's
launcher, an unsupported GPU, a Triton change) falls back to the torch backend inside the op, with one
warning, and stays there: see `triton_failures`. An out-of-memory is not such a failure: it is raised.

Host cost: in eager mode a plain `torch.autograd.Function` (none under no_grad) calls the backends
directly, cheaper per call than `torch.library.custom_op` + `register_autograd` (measure with
`python -m acm_d2.benchmark.host`). Under torch.compile the Function calls the
`acm_d2::acm_fused_forward` / `acm_fused_backward` ops instead (define/impl, with fake kernels), so
that ACM stays one opaque graph node whose body Dynamo does not trace.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import torch_backend
from .torch_backend import grad_layout

try:
    from . import triton_backend
except ImportError:  # CPU-only installs: the torch backend needs no Triton
    triton_backend = None

__all__ = ["BACKENDS", "FUSED_VARIANTS", "acm_fused", "triton_available", "triton_failures"]

# Variants with attention; "p_only" (P x) has nothing to fuse and runs the reference.
FUSED_VARIANTS = ("full", "no_p", "no_q")
# "auto": Triton for CUDA inputs (falling back to torch if Triton fails there), torch elsewhere.
# "triton" is strict: a Triton failure raises (tests, the self-test).
BACKENDS = ("auto", "torch", "triton")

logger = logging.getLogger(__name__)
# device -> the error that made the Triton backend unusable there; those devices use the torch backend.
_TRITON_FAILURES: Dict[str, str] = {}


def triton_available() -> bool:
    return triton_backend is not None


def triton_failures() -> Dict[str, str]:
    """The devices on which Triton failed in this process and now run the torch backend, with the error."""
    return dict(_TRITON_FAILURES)


def acm_fused(
    x: Tensor,
    k_weight: Tensor,
    k_bias: Tensor,
    q_weight: Optional[Tensor],
    q_bias: Optional[Tensor],
    p_params: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]],
    num_groups: int,
    need_orth: bool,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """ACM on x (B x C x H x W) with the weights of the K/Q logits convs and P's two convs.

    q_weight None gives the "no_q" variant, p_params None the "no_p" one. The biases of the logits
    convs do not change the result; they are inputs so that they get their (zero) gradient.
    Returns y (x's dtype and memory format: channels_last stays channels_last) and, if need_orth,
    d = sum_c K_c Q_c / C per sample (float32, or float64 for float64 inputs), else None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"acm_fused backend must be one of {BACKENDS}, got {backend!r}")
    if need_orth and q_weight is None:
        raise ValueError("the orthogonality term needs both K and Q")
    if backend == "triton":
        if triton_backend is None:
            raise RuntimeError("backend='triton' needs Triton installed")
        # meta tensors: launches recorded instead of run (aot.py, acm_d2.benchmark.host).
        if not (x.is_cuda or x.is_meta) and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors only runs under TRITON_INTERPRET=1 (tests)"
            )
    # The one copy a strided input costs, here rather than in each backend's forward and backward.
    x = x.contiguous(memory_format=_memory_format(x))
    p1w, p1b, p2w, p2b = p_params if p_params is not None else (None,) * 4
    if torch.is_grad_enabled():
        y, d = _FusedACM.apply(
            x,
            k_weight,
            k_bias,
            q_weight,
            q_bias,
            p1w,
            p1b,
            p2w,
            p2b,
            num_groups,
            need_orth,
            backend,
        )
    else:  # inference: no graph to record, so not the autograd Function's per-call cost either
        y, d, *_ = _forward(
            x, k_weight, q_weight, p1w, p1b, p2w, p2b, num_groups, need_orth, backend
        )
    return y, (d if need_orth else None)


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for inputs already laid out so (both backends read either layout), else NCHW."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


class _FusedACM(torch.autograd.Function):
    """Autograd of the fused op: saves x and the O(B*C) statistics, not the attention."""

    @staticmethod
    def forward(
        ctx,
        x,
        k_weight,
        k_bias,
        q_weight,
        q_bias,
        p1w,
        p1b,
        p2w,
        p2b,
        num_groups,
        need_orth,
        backend,
    ):
        y, d, mu, pooled, lse, p = _forward(
            x, k_weight, q_weight, p1w, p1b, p2w, p2b, num_groups, need_orth, backend
        )
        ctx.save_for_backward(x, k_weight, q_weight, p1w, p1b, p2w, p2b, mu, pooled, lse, p)
        ctx.num_groups, ctx.need_orth, ctx.backend = num_groups, need_orth, backend
        # An unused d (or y) gets None, not a zero-filled gradient that would cost a launch.
        ctx.set_materialize_grads(False)
        if not need_orth:
            ctx.mark_non_differentiable(d)
        return y, d

    @staticmethod
    def backward(ctx, grad_y, grad_d):
        x, k_weight, q_weight, p1w, p1b, p2w, p2b, mu, pooled, lse, p = ctx.saved_tensors
        if grad_y is None:  # only d is in the loss
            grad_y = torch.zeros_like(x)
        gx, flat = _backward(
            grad_y,
            grad_d if ctx.need_orth else None,
            x,
            k_weight,
            q_weight,
            p1w,
            p1b,
            p2w,
            p2b,
            mu,
            pooled,
            lse,
            p,
            ctx.num_groups,
            ctx.backend,
        )
        # Views of the flat vector, in grad_layout's order; the autograd engine casts a gradient to
        # its parameter's dtype where they differ. A bias passed as None gets None.
        J = 1 if q_weight is None else 2
        hidden = 0 if p1w is None else p1w.shape[0]
        parts = flat.split(grad_layout(x.shape[1], ctx.num_groups, J, hidden)[0])
        needs = ctx.needs_input_grad
        grads = [parts[0].view(k_weight.shape), parts[1] if needs[2] else None] + [None] * 6
        if q_weight is not None:
            grads[2:4] = parts[2].view(q_weight.shape), parts[3] if needs[4] else None
        if p1w is not None:
            w1, b1, w2, b2 = parts[2 * J :]
            grads[4:] = w1.view(p1w.shape), b1, w2.view(p2w.shape), b2
        return (gx, *grads, None, None, None)


def _forward(*args):
    # Eager: the backend directly. Under torch.compile: the opaque op (Dynamo does not trace Triton's
    # launcher or the fallback), so that ACM is one graph node.
    if torch.compiler.is_compiling():
        return torch.ops.acm_d2.acm_fused_forward(*args)
    return _forward_impl(*args)


def _backward(*args):
    if torch.compiler.is_compiling():
        return torch.ops.acm_d2.acm_fused_backward(*args)
    return _backward_impl(*args)


def _forward_impl(x, k_weight, q_weight, p1w, p1b, p2w, p2b, num_groups, need_orth, backend):
    """y, d (B, or empty), and for the backward mu (B x C), pooled (B x G x J x Cg), lse (B x G x J),
    P (B x C, or empty)."""
    p_params = None if p1w is None else (p1w, p1b, p2w, p2b)
    fwd = triton_backend.forward if triton_backend is not None else None
    return _run_backend(
        backend,
        x,
        fwd,
        torch_backend.forward,
        x,
        k_weight,
        q_weight,
        p_params,
        num_groups,
        need_orth,
    )


def _backward_impl(
    grad_y,
    grad_d,
    x,
    k_weight,
    q_weight,
    p1w,
    p1b,
    p2w,
    p2b,
    mu,
    pooled,
    lse,
    p,
    num_groups,
    backend,
):
    """dx, and every weight gradient in one flat vector in grad_layout's order (outputs of an op may
    not alias each other, so the caller cuts the vector)."""
    p_params = None if p1w is None else (p1w, p1b, p2w, p2b)
    # dy in x's layout, so that both stream with the same strides. dd (often the expanded scalar
    # gradient of d.sum()) is read with its stride by both backends: no copy.
    grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    bwd = triton_backend.backward if triton_backend is not None else None
    return _run_backend(
        backend,
        x,
        bwd,
        torch_backend.backward,
        grad_y,
        grad_d,
        x,
        k_weight,
        q_weight,
        p_params,
        mu,
        pooled,
        lse,
        p,
        num_groups,
    )


def _triton_device(x: Tensor) -> bool:
    """Whether "auto" would run x on Triton: a CUDA tensor in a dtype the kernels take, Triton installed."""
    return x.is_cuda and triton_backend is not None and x.dtype != torch.float64


def _use_triton(backend: str, x: Tensor) -> bool:
    if backend == "triton":
        return True
    return backend == "auto" and _triton_device(x) and str(x.device) not in _TRITON_FAILURES


def _run_backend(backend: str, x: Tensor, triton_fn, torch_fn, *args):
    """triton_fn(*args) where Triton is chosen, else torch_fn(*args); under "auto" a Triton error
    (compile or launch, not an out-of-memory) disables Triton on x's device for the rest of the process."""
    if not _use_triton(backend, x):
        return _run_torch(x, torch_fn, *args)
    if backend == "triton":
        return triton_fn(*args)
    try:
        return triton_fn(*args)
    except torch.OutOfMemoryError:
        raise  # the torch backend would need more memory, not less
    except Exception as e:  # noqa: BLE001 - any Triton failure: the torch backend computes the same
        device = str(x.device)
        _TRITON_FAILURES[device] = f"{type(e).__name__}: {e}"
        logger.warning(
            "acm_d2: the fused ACM's Triton kernels failed on %s (%s: %s); ACM on %s uses the torch "
            "backend (same results, slower) for the rest of this process. Set MODEL.ACM.IMPL reference "
            "or fix the Triton install (python -m acm_d2.selftest) to silence this.",
            device,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
            device,
        )
        return _run_torch(x, torch_fn, *args)


def _run_torch(x: Tensor, torch_fn, *args):
    # The torch backend's matmuls would otherwise follow the caller's autocast (thread state, not a
    # dispatch decision about this op) and run in low precision; the Triton kernels compute in float32.
    if not torch.amp.is_autocast_available(x.device.type):  # meta tensors
        return torch_fn(*args)
    with torch.autocast(x.device.type, enabled=False):
        return torch_fn(*args)


# ----------------------------------------------------------------------------------------------------
# The op pair torch.compile sees, with the kernels above and fake (shape-only) kernels.

_LIB = torch.library.Library("acm_d2", "FRAGMENT")
_LIB.define(
    "acm_fused_forward(Tensor x, Tensor k_weight, Tensor? q_weight, Tensor? p1_weight, "
    "Tensor? p1_bias, Tensor? p2_weight, Tensor? p2_bias, int num_groups, bool need_orth, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "acm_fused_backward(Tensor grad_y, Tensor? grad_d, Tensor x, Tensor k_weight, Tensor? q_weight, "
    "Tensor? p1_weight, Tensor? p1_bias, Tensor? p2_weight, Tensor? p2_bias, Tensor mu, "
    "Tensor pooled, Tensor lse, Tensor p, int num_groups, str backend) -> (Tensor, Tensor)"
)
_LIB.impl("acm_fused_forward", _forward_impl, "CompositeExplicitAutograd")
_LIB.impl("acm_fused_backward", _backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("acm_d2::acm_fused_forward", lib=_LIB)
def _(
    x, k_weight, q_weight, p1_weight, p1_bias, p2_weight, p2_bias, num_groups, need_orth, backend
):
    B, C = x.shape[:2]
    dt = _compute_dtype(x, backend)
    heads = 1 if q_weight is None else 2
    stats = x.new_empty((B, C), dtype=dt)
    return (
        torch.empty_like(x),
        x.new_empty((B,) if need_orth else (0,), dtype=dt),
        stats,
        x.new_empty((B, num_groups, heads, C // num_groups), dtype=dt),
        x.new_empty((B, num_groups, heads), dtype=dt),
        stats.new_empty((B, C) if p1_weight is not None else (0,)),
    )


@torch.library.register_fake("acm_d2::acm_fused_backward", lib=_LIB)
def _(
    grad_y,
    grad_d,
    x,
    k_weight,
    q_weight,
    p1_weight,
    p1_bias,
    p2_weight,
    p2_bias,
    mu,
    pooled,
    lse,
    p,
    num_groups,
    backend,
):
    hidden = 0 if p1_weight is None else p1_weight.shape[0]
    total = grad_layout(x.shape[1], num_groups, pooled.shape[2], hidden)[1]
    return torch.empty_like(x), mu.new_empty(total)


def _compute_dtype(x: Tensor, backend: str) -> torch.dtype:
    """float64 statistics for float64 inputs (the torch backend; Triton computes in float32)."""
    return torch.float64 if x.dtype == torch.float64 and backend != "triton" else torch.float32
