"""The fused ACM op: `acm_fused`, its custom-op pair and autograd, and the choice of backend.

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
warning, and stays there: see `triton_failures`.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import torch_backend

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
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors only runs under TRITON_INTERPRET=1 (tests)"
            )
    # The one copy a strided input costs, here rather than in each backend's forward and backward.
    x = x.contiguous(memory_format=_memory_format(x))
    p1w, p1b, p2w, p2b = p_params if p_params is not None else (None,) * 4
    y, d, *_ = _forward_op(
        x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, num_groups, need_orth, backend
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


def _triton_device(x: Tensor) -> bool:
    """Whether "auto" would run x on Triton: a CUDA tensor in a dtype the kernels take, Triton installed."""
    return x.is_cuda and triton_backend is not None and x.dtype != torch.float64


def _use_triton(backend: str, x: Tensor) -> bool:
    if backend == "triton":
        return True
    return backend == "auto" and _triton_device(x) and str(x.device) not in _TRITON_FAILURES


def _run_backend(backend: str, x: Tensor, triton_fn, torch_fn, *args):
    """triton_fn(*args) where Triton is chosen, else torch_fn(*args); under "auto" a Triton error
    (compile or launch) disables Triton on x's device for the rest of the process."""
    if not _use_triton(backend, x):
        return torch_fn(*args)
    if backend == "triton":
        return triton_fn(*args)
    try:
        return triton_fn(*args)
    except torch.cuda.OutOfMemoryError:
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
        return torch_fn(*args)


# ----------------------------------------------------------------------------------------------------
# custom op pair: forward returns y, d and the saved statistics; backward is its own op.


@torch.library.custom_op("acm_d2::acm_fused_forward", mutates_args=())
def _forward_op(
    x: Tensor,
    k_weight: Tensor,
    k_bias: Tensor,
    q_weight: Optional[Tensor],
    q_bias: Optional[Tensor],
    p1_weight: Optional[Tensor],
    p1_bias: Optional[Tensor],
    p2_weight: Optional[Tensor],
    p2_bias: Optional[Tensor],
    num_groups: int,
    need_orth: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, d (B, or empty), and for the backward mu (B x C), pooled (B x G x J x Cg), lse (B x G x J), P (B x C, or empty)."""
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    fwd = triton_backend.forward if triton_backend is not None else None
    # The backends' own ops would otherwise see the caller's autocast (it is thread state, not a
    # dispatch decision about this op) and run the matmuls in low precision.
    with torch.autocast(x.device.type, enabled=False):
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


@_forward_op.register_fake
def _(
    x,
    k_weight,
    k_bias,
    q_weight,
    q_bias,
    p1_weight,
    p1_bias,
    p2_weight,
    p2_bias,
    num_groups,
    need_orth,
    backend,
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


@torch.library.custom_op("acm_d2::acm_fused_backward", mutates_args=())
def _backward_op(
    grad_y: Tensor,
    grad_d: Optional[Tensor],
    x: Tensor,
    k_weight: Tensor,
    q_weight: Optional[Tensor],
    p1_weight: Optional[Tensor],
    p1_bias: Optional[Tensor],
    p2_weight: Optional[Tensor],
    p2_bias: Optional[Tensor],
    mu: Tensor,
    pooled: Tensor,
    lse: Tensor,
    p: Tensor,
    num_groups: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """dx, and every weight gradient flattened into one vector in param_slots order (outputs of a
    custom op may not alias each other, so the caller cuts the vector)."""
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    # dy in x's layout, so that both stream with the same strides; grad_d is often an expanded scalar
    # (d.sum() in the loss): a real B-vector for the kernels.
    grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    grad_d = grad_d.contiguous() if grad_d is not None else None
    bwd = triton_backend.backward if triton_backend is not None else None
    with torch.autocast(x.device.type, enabled=False):
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


@_backward_op.register_fake
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
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    total = sum(t.numel() for t in param_slots(k_weight, None, q_weight, None, p_params).values())
    return torch.empty_like(x), mu.new_empty(total)


def param_slots(k_weight, k_bias, q_weight, q_bias, p_params) -> Dict[str, Tensor]:
    """The parameters present, in the order of the flat weight gradient. Callers that only need the
    sizes pass the biases as None: a G-vector view of the weight stands in."""
    slots = {"kw": k_weight, "kb": k_weight[:, 0, 0, 0] if k_bias is None else k_bias}
    if q_weight is not None:
        slots.update(qw=q_weight, qb=q_weight[:, 0, 0, 0] if q_bias is None else q_bias)
    if p_params is not None:
        slots.update(zip(("w1", "b1", "w2", "b2"), p_params))
    return slots


def _setup_context(ctx, inputs, output):
    x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, num_groups, need_orth, backend = (
        inputs
    )
    _, _, mu, pooled, lse, p = output
    ctx.save_for_backward(
        x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, mu, pooled, lse, p
    )
    ctx.num_groups, ctx.need_orth, ctx.backend = num_groups, need_orth, backend


def _backward(ctx, grad_y, grad_d, *_):
    x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, mu, pooled, lse, p = (
        ctx.saved_tensors
    )
    gx, flat = _backward_op(
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
    p_params = None if p1w is None else (p1w, p1b, p2w, p2b)
    grads, offset = {}, 0
    for name, t in param_slots(k_weight, k_bias, q_weight, q_bias, p_params).items():
        grads[name] = flat[offset : offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()
    return (gx, *(grads.get(name) for name in _GRAD_SLOTS), None, None, None)


torch.library.register_autograd(
    "acm_d2::acm_fused_forward", _backward, setup_context=_setup_context
)

# The parameter inputs of _forward_op, in order.
_GRAD_SLOTS = ("kw", "kb", "qw", "qb", "w1", "b1", "w2", "b2")


def _compute_dtype(x: Tensor, backend: str) -> torch.dtype:
    """float64 statistics for float64 inputs (the torch backend; Triton computes in float32)."""
    return torch.float64 if x.dtype == torch.float64 and backend != "triton" else torch.float32
