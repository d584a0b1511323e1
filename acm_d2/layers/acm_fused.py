"""Fused Attend-and-Compare Module: the forward of `acm.AttendAndCompare` with an analytic backward.

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
elementwise pass writes y. Only x and O(B*C) vectors are saved (mu, p_j, P, and lse_j for Triton).

Backward, from dy and dd. With S1 = sum_n dy_n and S2 = sum_n dy_n * x_n (per channel):

    dP     = S2 + shift * S1,     dshift = P * S1
    dp_K   = dshift + dd Q / C,   dp_Q = -dshift + dd K / C,   dmu = -dd (K + Q) / C     (full, no_p)
    dp_K   = dshift,              dmu = -dshift                                            (no_q)
    dmu   += W1^T [(W2^T (dP P (1 - P))) * (W1 mu + b1 > 0)]   and P's weight grads likewise
    r_jn   = a_jn (dp_j . x_n - dp_j . p_j)            = dL/ds_jn (softmax backward)
    dx_n   = P dy_n + dmu / N + sum_j (a_jn dp_j + r_jn w_j)
    dw_j   = sum_b sum_n r_jn x_n,      db_j = sum_n r_jn = 0 exactly (softmax is shift invariant)

so the backward needs one reduction pass over (x, dy) for S1, S2 and one pass that recomputes a_jn
from x and the saved lse_j, writes dx and accumulates dw_j. Every sum runs in float32 (float64 for
float64 inputs) whatever the input dtype.

Two backends compute this: "torch" (batched matmuls; any device, used on CPU) and "triton" (four
kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests). Both sit behind one
`torch.library.custom_op` pair so that torch.compile keeps ACM as a single graph node.
"""
import functools
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend needs no Triton
    triton = None

__all__ = ["FUSED_VARIANTS", "acm_fused", "triton_available"]

# Variants with attention; "p_only" (P x) has nothing to fuse and runs the reference.
FUSED_VARIANTS = ("full", "no_p", "no_q")
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return triton is not None


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
    Returns y (x's dtype) and, if need_orth, d = sum_c K_c Q_c / C per sample (float32, or float64
    for float64 inputs), else None. backend "auto" picks Triton for CUDA inputs when it is importable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"acm_fused backend must be one of {BACKENDS}, got {backend!r}")
    if need_orth and q_weight is None:
        raise ValueError("the orthogonality term needs both K and Q")
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton is not None and x.dtype != torch.float64 else "torch"
    elif backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs Triton installed")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors only runs under TRITON_INTERPRET=1 (tests)")
    p1w, p1b, p2w, p2b = p_params if p_params is not None else (None,) * 4
    y, d, *_ = _forward_op(x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, num_groups, need_orth, backend)
    return y, (d if need_orth else None)


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
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    impl = _triton_forward if backend == "triton" else _torch_forward
    # The impl's own ops would otherwise see the caller's autocast (it is thread state, not a dispatch
    # decision about this op) and run the matmuls in low precision.
    with torch.autocast(x.device.type, enabled=False):
        return impl(x.contiguous(), k_weight, q_weight, p_params, num_groups, need_orth)


@_forward_op.register_fake
def _(x, k_weight, k_bias, q_weight, q_bias, p1_weight, p1_bias, p2_weight, p2_bias, num_groups, need_orth, backend):
    B, C = x.shape[:2]
    dt = _compute_dtype(x, backend)
    heads = 1 if q_weight is None else 2
    stats = x.new_empty((B, C), dtype=dt)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((B,) if need_orth else (0,), dtype=dt),
        stats,
        x.new_empty((B, num_groups, heads, C // num_groups), dtype=dt),
        x.new_empty((B, num_groups, heads) if backend == "triton" else (0,), dtype=dt),
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
    """dx, and every weight gradient flattened into one vector in _param_slots order (outputs of a
    custom op may not alias each other, so the caller cuts the vector)."""
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    impl = _triton_backward if backend == "triton" else _torch_backward
    # grad_d is often an expanded scalar (d.sum() in the loss): make it a real B-vector for the kernel.
    grad_d = grad_d.contiguous() if grad_d is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return impl(grad_y.contiguous(), grad_d, x.contiguous(), k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups)


@_backward_op.register_fake
def _(grad_y, grad_d, x, k_weight, q_weight, p1_weight, p1_bias, p2_weight, p2_bias, mu, pooled, lse, p, num_groups, backend):
    p_params = None if p1_weight is None else (p1_weight, p1_bias, p2_weight, p2_bias)
    total = sum(t.numel() for t in _param_slots(k_weight, None, q_weight, None, p_params).values())
    return torch.empty_like(x, memory_format=torch.contiguous_format), mu.new_empty(total)


def _param_slots(k_weight, k_bias, q_weight, q_bias, p_params) -> Dict[str, Tensor]:
    """The parameters present, in the order of the flat weight gradient. Callers that only need the
    sizes pass the biases as None: a G-vector view of the weight stands in."""
    slots = {"kw": k_weight, "kb": k_weight[:, 0, 0, 0] if k_bias is None else k_bias}
    if q_weight is not None:
        slots.update(qw=q_weight, qb=q_weight[:, 0, 0, 0] if q_bias is None else q_bias)
    if p_params is not None:
        slots.update(zip(("w1", "b1", "w2", "b2"), p_params))
    return slots


def _setup_context(ctx, inputs, output):
    x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, num_groups, need_orth, backend = inputs
    _, _, mu, pooled, lse, p = output
    ctx.save_for_backward(x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, mu, pooled, lse, p)
    ctx.num_groups, ctx.need_orth, ctx.backend = num_groups, need_orth, backend


def _backward(ctx, grad_y, grad_d, *_):
    x, k_weight, k_bias, q_weight, q_bias, p1w, p1b, p2w, p2b, mu, pooled, lse, p = ctx.saved_tensors
    gx, flat = _backward_op(
        grad_y, grad_d if ctx.need_orth else None, x, k_weight, q_weight, p1w, p1b, p2w, p2b, mu, pooled, lse, p, ctx.num_groups, ctx.backend
    )
    p_params = None if p1w is None else (p1w, p1b, p2w, p2b)
    grads, offset = {}, 0
    for name, t in _param_slots(k_weight, k_bias, q_weight, q_bias, p_params).items():
        grads[name] = flat[offset : offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()
    return (gx, *(grads.get(name) for name in _GRAD_SLOTS), None, None, None)


torch.library.register_autograd("acm_d2::acm_fused_forward", _backward, setup_context=_setup_context)


# The parameter inputs of _forward_op, in order (also the order of the dx kernel's OFF_* arguments).
_GRAD_SLOTS = ("kw", "kb", "qw", "qb", "w1", "b1", "w2", "b2")


def _compute_dtype(x: Tensor, backend: str = "torch") -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 and backend == "torch" else torch.float32


# ----------------------------------------------------------------------------------------------------
# torch backend: batched matmuls over the (B, G) groups.


def _groups(t: Tensor, num_groups: int) -> Tensor:
    B, C, H, W = t.shape
    return t.view(B, num_groups, C // num_groups, H * W)


def _logit_weights(k_weight, q_weight, num_groups, dt) -> Tensor:
    """G x J x Cg, the logits weights of the heads."""
    w = [k_weight] if q_weight is None else [k_weight, q_weight]
    return torch.stack([t.view(num_groups, -1) for t in w], 1).to(dt)


def _p_hidden(mu: Tensor, p_params, num_groups: int):
    """P's first conv on mu (B x G x Cg): the pre-activation B x G x Hg and the grouped weights."""
    w1, b1, w2, b2 = (t.to(mu.dtype) for t in p_params)
    G, Cg = num_groups, mu.shape[-1]
    w1, w2 = w1.view(G, -1, Cg), w2.view(G, Cg, -1)
    return torch.einsum("bgc,ghc->bgh", mu, w1) + b1.view(G, -1), w1, w2, b2.view(G, Cg)


def _p_forward(mu, p_params, num_groups):
    z1, _, w2, b2 = _p_hidden(mu, p_params, num_groups)
    return torch.sigmoid(torch.einsum("bgh,gch->bgc", z1.relu(), w2) + b2)


def _shift(mu: Tensor, pooled: Tensor) -> Tensor:
    return pooled[:, :, 0] - (pooled[:, :, 1] if pooled.shape[2] == 2 else mu)


def _torch_forward(x, k_weight, q_weight, p_params, num_groups, need_orth):
    dt = _compute_dtype(x)
    xg = _groups(x.to(dt), num_groups)
    B, G, Cg, N = xg.shape
    attn = (_logit_weights(k_weight, q_weight, num_groups, dt) @ xg).softmax(-1)  # B x G x J x N
    pooled = attn @ xg.transpose(-1, -2)  # B x G x J x Cg
    mu = xg.mean(-1)
    shift = _shift(mu, pooled)
    if p_params is None:
        p = mu.new_empty(0)
        y = xg + shift[..., None]
    else:
        p = _p_forward(mu, p_params, num_groups)
        # out= keeps y contiguous (TensorIterator would follow the broadcast operand's layout).
        y = torch.addcmul((p * shift)[..., None], xg, p[..., None], out=torch.empty_like(xg))
    d = _orth_term(mu, pooled) if need_orth else mu.new_empty(0)
    # No lse: the backward re-runs the softmax on the recomputed logits, as cheap as exp(logits - lse).
    return y.view_as(x).to(x.dtype), d, mu.reshape(B, G * Cg), pooled, mu.new_empty(0), p.reshape(B, G * Cg) if p_params else p


def _orth_term(mu: Tensor, pooled: Tensor) -> Tensor:
    k, q = (pooled - mu[:, :, None]).unbind(2)
    C = mu.shape[1] * mu.shape[2]
    return torch.einsum("bgc,bgc->b", k, q) / C


def _small_backward(s_gy, s_gyx, grad_d, mu, pooled, p, p_params, num_groups):
    """The per-(b, channel) part of the backward: dp_j (B x G x J x Cg), dmu, and P's weight grads."""
    shift = _shift(mu, pooled)
    p_grads = []
    if p_params is None:
        g_shift, g_mu = s_gy, torch.zeros_like(mu)
    else:
        g_shift = p * s_gy
        z1, w1, w2, _ = _p_hidden(mu, p_params, num_groups)
        g_z2 = (s_gyx + shift * s_gy) * p * (1 - p)
        h = z1.relu()
        g_z1 = torch.einsum("bgc,gch->bgh", g_z2, w2).masked_fill_(z1 <= 0, 0)
        g_mu = torch.einsum("bgh,ghc->bgc", g_z1, w1)
        p_grads = [torch.einsum("bgh,bgc->ghc", g_z1, mu), g_z1.sum(0), torch.einsum("bgc,bgh->gch", g_z2, h), g_z2.sum(0)]
    if pooled.shape[2] == 1:  # no_q: shift = p_K - mu
        return g_shift[:, :, None], g_mu - g_shift, p_grads
    g_pooled = torch.stack([g_shift, -g_shift], 2)
    if grad_d is not None:
        kq = pooled - mu[:, :, None]
        coef = (grad_d / (mu.shape[1] * mu.shape[2]))[:, None, None, None]
        g_pooled = g_pooled + coef * kq.flip(2)
        g_mu = g_mu - coef[..., 0] * kq.sum(2)
    return g_pooled, g_mu, p_grads


def _torch_backward(grad_y, grad_d, x, k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups):
    dt = mu.dtype
    xg, gyg = _groups(x.to(dt), num_groups), _groups(grad_y.to(dt), num_groups)
    B, G, Cg, N = xg.shape
    mu = mu.view(B, G, Cg)
    p = p.view(B, G, Cg) if p_params is not None else None
    s_gy, s_gyx = gyg.sum(-1), torch.einsum("bgcn,bgcn->bgc", gyg, xg)
    g_pooled, g_mu, p_grads = _small_backward(s_gy, s_gyx, grad_d, mu, pooled, p, p_params, num_groups)
    J = pooled.shape[2]
    w = _logit_weights(k_weight, q_weight, num_groups, dt)
    # One matmul recomputes the logits and takes dp_j . x_n for every n; its buffer then holds
    # [a_j; r_j] for the dx matmul below, so no N-long tensor is concatenated.
    v = torch.cat([w.expand(B, G, J, Cg), g_pooled], 2) @ xg  # B x G x 2J x N
    logits, t = v.split(J, 2)
    attn = logits.softmax(-1)
    t.sub_((g_pooled * pooled).sum(-1, keepdim=True)).mul_(attn)  # r_jn = dL/dlogits
    logits.copy_(attn)
    g_w = (t @ xg.transpose(-1, -2)).sum(0).transpose(0, 1)  # J x G x Cg; per-sample matmuls need no copy of x
    g_mu = (g_mu / N)[..., None]
    gx = torch.addcmul(g_mu, gyg, p[..., None], out=torch.empty_like(gyg)) if p is not None else gyg + g_mu
    # dx_n += sum_j a_jn dp_j + r_jn w_j: one batched matmul of rank 2J per group.
    u = torch.cat([g_pooled, w.expand(B, G, J, Cg)], 2).view(B * G, 2 * J, Cg)
    gx.view(B * G, Cg, N).baddbmm_(u.transpose(1, 2), v.view(B * G, 2 * J, N))
    zero_bias = g_w.new_zeros(num_groups)
    flat = [t for g in g_w for t in (g.flatten(), zero_bias)] + [g.flatten() for g in p_grads]
    return gx.view_as(x).to(x.dtype), torch.cat(flat)


# ----------------------------------------------------------------------------------------------------
# triton backend: reduce(x) -> output(x), and reduce(x, dy) -> dx(x, dy). Program (b*G + g, split)
# handles one group over a contiguous chunk of positions; the splits' partial sums are combined at the
# start of the next kernel, so the small per-group maths (softmax combine, P, its backward) runs there
# with no extra launch.


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(x: Tensor, num_groups: int, tile: int):
    B, C, H, W = x.shape
    N, Cg = H * W, C // num_groups
    block_c = triton.next_power_of_2(Cg)
    if x.is_cuda:
        block_n = max(16, min(1024, tile // block_c))
        # Enough programs to fill the GPU a few times over; splits never start past the end.
        target = 4 * _num_sms(x.device)
        splits = max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, B * num_groups)))
    else:  # interpreter (tests): small tiles and two splits exercise the loops and the combine
        block_n, splits = 16, 2
    chunk = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    return N, Cg, block_c, block_n, triton.cdiv(N, chunk), chunk


def _p_meta(p_params, num_groups):
    if p_params is None:
        return (None,) * 4, 1, 1
    hg = p_params[0].shape[0] // num_groups
    return p_params, hg, triton.next_power_of_2(hg)


def _triton_forward(x, k_weight, q_weight, p_params, num_groups, need_orth):
    B, C = x.shape[:2]
    G, J = num_groups, 1 if q_weight is None else 2
    N, Cg, BC, BN, S, chunk = _launch_config(x, G, tile=4096)
    f32 = dict(device=x.device, dtype=torch.float32)
    part_vec, part_ml = torch.empty((B * G, S, J + 1, BC), **f32), torch.empty((B * G, S, J, 2), **f32)
    qw = k_weight if q_weight is None else q_weight
    _fwd_reduce_kernel[(B * G, S)](x, k_weight, qw, part_vec, part_ml, N, Cg, G, chunk, S, J=J, BLOCK_C=BC, BLOCK_N=BN)
    (w1, b1, w2, b2), hg, BH = _p_meta(p_params, G)
    y = torch.empty_like(x)
    mu, pooled, lse = torch.empty((B, C), **f32), torch.empty((B, G, J, Cg), **f32), torch.empty((B, G, J), **f32)
    p = torch.empty((B, C) if p_params is not None else (0,), **f32)
    d_part = torch.empty((B, G) if need_orth else (0,), **f32)
    _fwd_output_kernel[(B * G, S)](
        x, y, part_vec, part_ml, w1 if p_params else x, b1 if p_params else x, w2 if p_params else x, b2 if p_params else x,
        mu, pooled, lse, p, d_part, N, Cg, G, hg, C, chunk, S,
        J=J, USE_P=p_params is not None, NEED_D=need_orth, BLOCK_C=BC, BLOCK_N=BN, BLOCK_H=BH,
    )
    d = d_part.sum(1) if need_orth else d_part
    return y, d, mu, pooled, lse, p


def _triton_backward(grad_y, grad_d, x, k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups):
    B, C = x.shape[:2]
    G, J = num_groups, pooled.shape[2]
    N, Cg, BC, BN, S, chunk = _launch_config(x, G, tile=2048)
    part = torch.empty((B * G, S, 2, BC), device=x.device, dtype=torch.float32)
    _bwd_reduce_kernel[(B * G, S)](x, grad_y, part, N, Cg, chunk, BLOCK_C=BC, BLOCK_N=BN)
    # All weight gradients go to one (B, S, total) buffer that the dx kernel writes in full, so that
    # one sum gives them all; absent parameters get no slot (offset 0, never written).
    offsets, total = {}, 0
    for name, t in _param_slots(k_weight, None, q_weight, None, p_params).items():
        offsets[name], total = total, total + t.numel()
    gw_buf = torch.empty((B, S, total), device=x.device, dtype=torch.float32)
    (w1, b1, w2, _), hg, BH = _p_meta(p_params, G)
    gx = torch.empty_like(x)
    qw = k_weight if q_weight is None else q_weight
    _bwd_dx_kernel[(B * G, S)](
        x, grad_y, gx, part, k_weight, qw, w1 if p_params else x, b1 if p_params else x, w2 if p_params else x,
        mu, pooled, lse, p, grad_d if grad_d is not None else x, gw_buf, *(offsets.get(n, 0) for n in _GRAD_SLOTS),
        N, Cg, G, hg, C, chunk, S, total,
        J=J, USE_P=p_params is not None, HAS_GD=grad_d is not None, BLOCK_C=BC, BLOCK_N=BN, BLOCK_H=BH,
    )
    return gx, gw_buf.sum((0, 1))


if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _softmax_step(xt, w2, n_mask, m, l, acc):
        """Online softmax over one tile, in base 2: logits w2 . x_n, running max m, sum l, acc."""
        s = tl.where(n_mask, tl.sum(xt * w2[:, None], 0), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(s - m_new)
        return m_new, l * alpha + tl.sum(e, 0), acc * alpha + tl.sum(xt * e[None, :], 1)

    @triton.jit
    def _fwd_reduce_kernel(
        x_ptr, kw_ptr, qw_ptr, part_vec_ptr, part_ml_ptr, N, CG, G, CHUNK, S,
        J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        bg, s = tl.program_id(0), tl.program_id(1)
        g = bg % G
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < CG
        x_base = x_ptr + bg.to(tl.int64) * CG * N
        wk = tl.load(kw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32) * LOG2E
        wq = tl.load(qw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32) * LOG2E
        sum_x = tl.zeros([BLOCK_C], tl.float32)
        m_k, l_k, acc_k = tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32), tl.zeros([BLOCK_C], tl.float32)
        m_q, l_q, acc_q = tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32), tl.zeros([BLOCK_C], tl.float32)
        n_end = tl.minimum(s * CHUNK + CHUNK, N)
        for n0 in range(s * CHUNK, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_end
            xt = tl.load(x_base + offs_c[:, None] * N + offs_n[None, :], mask=c_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            sum_x += tl.sum(xt, 1)
            m_k, l_k, acc_k = _softmax_step(xt, wk, n_mask, m_k, l_k, acc_k)
            if J == 2:
                m_q, l_q, acc_q = _softmax_step(xt, wq, n_mask, m_q, l_q, acc_q)
        vec = part_vec_ptr + (bg * S + s) * (J + 1) * BLOCK_C + offs_c
        ml = part_ml_ptr + (bg * S + s) * J * 2
        tl.store(vec, sum_x)
        tl.store(vec + BLOCK_C, acc_k)
        tl.store(ml, m_k)
        tl.store(ml + 1, l_k)
        if J == 2:
            tl.store(vec + 2 * BLOCK_C, acc_q)
            tl.store(ml + 2, m_q)
            tl.store(ml + 3, l_q)

    @triton.jit
    def _combine_head(part_vec_ptr, part_ml_ptr, bg, S, j, J: tl.constexpr, BLOCK_C: tl.constexpr):
        """Merge the splits' online-softmax partials of head j: pooled vector and natural-log lse."""
        offs_c = tl.arange(0, BLOCK_C)
        m, l, acc = tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32), tl.zeros([BLOCK_C], tl.float32)
        for s in range(0, S):
            ml = part_ml_ptr + ((bg * S + s) * J + j) * 2
            m_s, l_s = tl.load(ml), tl.load(ml + 1)
            a_s = tl.load(part_vec_ptr + ((bg * S + s) * (J + 1) + 1 + j) * BLOCK_C + offs_c)
            m_new = tl.maximum(m, m_s)
            alpha, beta = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
            l, acc, m = l * alpha + l_s * beta, acc * alpha + a_s * beta, m_new
        return acc / l, (m + tl.log2(l)) / LOG2E

    @triton.jit
    def _p_hidden_tl(mu, g, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        """P's first conv for group g: pre-activation z1 (BLOCK_H), and the tiles of W1 and W2^T."""
        offs_c, offs_h = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < HG) & (offs_c[None, :] < CG)
        w1 = tl.load(w1_ptr + (g * HG + offs_h[:, None]) * CG + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        w2t = tl.load(w2_ptr + (g * CG + offs_c[None, :]) * HG + offs_h[:, None], mask=mask, other=0.0).to(tl.float32)
        z1 = tl.sum(w1 * mu[None, :], 1) + tl.load(b1_ptr + g * HG + offs_h, mask=offs_h < HG, other=0.0).to(tl.float32)
        return z1, w1, w2t

    @triton.jit
    def _fwd_output_kernel(
        x_ptr, y_ptr, part_vec_ptr, part_ml_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        mu_ptr, pooled_ptr, lse_ptr, p_ptr, d_part_ptr, N, CG, G, HG, C, CHUNK, S,
        J: tl.constexpr, USE_P: tl.constexpr, NEED_D: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        bg, s = tl.program_id(0), tl.program_id(1)
        g = bg % G
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < CG
        first = s == 0  # the program that stores the per-group statistics
        sum_x = tl.zeros([BLOCK_C], tl.float32)
        for t in range(0, S):
            sum_x += tl.load(part_vec_ptr + (bg * S + t) * (J + 1) * BLOCK_C + offs_c)
        mu = sum_x / N
        pk, lse_k = _combine_head(part_vec_ptr, part_ml_ptr, bg, S, 0, J, BLOCK_C)
        tl.store(mu_ptr + bg * CG + offs_c, mu, mask=c_mask & first)
        tl.store(pooled_ptr + bg * J * CG + offs_c, pk, mask=c_mask & first)
        tl.store(lse_ptr + bg * J, lse_k, mask=first)
        if J == 2:
            pq, lse_q = _combine_head(part_vec_ptr, part_ml_ptr, bg, S, 1, J, BLOCK_C)
            tl.store(pooled_ptr + (bg * J + 1) * CG + offs_c, pq, mask=c_mask & first)
            tl.store(lse_ptr + bg * J + 1, lse_q, mask=first)
            shift = pk - pq
            if NEED_D:
                tl.store(d_part_ptr + bg, tl.sum((pk - mu) * (pq - mu), 0) / C, mask=first)
        else:
            shift = pk - mu
        if USE_P:
            z1, w1, w2t = _p_hidden_tl(mu, g, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C, BLOCK_H)
            z2 = tl.sum(w2t * tl.maximum(z1, 0.0)[:, None], 0) + tl.load(b2_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            p = tl.sigmoid(z2)
            tl.store(p_ptr + bg * CG + offs_c, p, mask=c_mask & first)
        else:
            p = tl.full([BLOCK_C], 1.0, tl.float32)
        base = bg.to(tl.int64) * CG * N
        n_end = tl.minimum(s * CHUNK + CHUNK, N)
        for n0 in range(s * CHUNK, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            offs = base + offs_c[:, None] * N + offs_n[None, :]
            mask = c_mask[:, None] & (offs_n < n_end)[None, :]
            xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs, (p[:, None] * (xt + shift[:, None])).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_reduce_kernel(x_ptr, gy_ptr, part_ptr, N, CG, CHUNK, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        bg, s = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < CG
        base = bg.to(tl.int64) * CG * N
        s_gy, s_gyx = tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)
        n_end = tl.minimum(s * CHUNK + CHUNK, N)
        for n0 in range(s * CHUNK, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            offs = base + offs_c[:, None] * N + offs_n[None, :]
            mask = c_mask[:, None] & (offs_n < n_end)[None, :]
            xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gyt = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s_gy += tl.sum(gyt, 1)
            s_gyx += tl.sum(gyt * xt, 1)
        out = part_ptr + (bg * tl.num_programs(1) + s) * 2 * BLOCK_C + offs_c
        tl.store(out, s_gy)
        tl.store(out + BLOCK_C, s_gyx)

    @triton.jit
    def _head_dx(xt, w, w2, gp, c, lse2):
        """One head's share of dx for a tile, and its r_n for dw: a_n dp + r_n w, r_n = a_n (dp.x_n - c)."""
        a = tl.exp2(tl.sum(xt * w2[:, None], 0) - lse2)
        r = a * (tl.sum(xt * gp[:, None], 0) - c)
        return gp[:, None] * a[None, :] + w[:, None] * r[None, :], r

    @triton.jit
    def _bwd_dx_kernel(
        x_ptr, gy_ptr, gx_ptr, part_ptr, kw_ptr, qw_ptr, w1_ptr, b1_ptr, w2_ptr,
        mu_ptr, pooled_ptr, lse_ptr, p_ptr, gd_ptr, gw_ptr,
        OFF_KW, OFF_KB, OFF_QW, OFF_QB, OFF_W1, OFF_B1, OFF_W2, OFF_B2,
        N, CG, G, HG, C, CHUNK, S, GW_STRIDE,
        J: tl.constexpr, USE_P: tl.constexpr, HAS_GD: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        bg, s = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < CG
        s_gy, s_gyx = tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)
        for t in range(0, S):
            s_gy += tl.load(part_ptr + (bg * S + t) * 2 * BLOCK_C + offs_c)
            s_gyx += tl.load(part_ptr + (bg * S + t) * 2 * BLOCK_C + BLOCK_C + offs_c)
        mu = tl.load(mu_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
        pk = tl.load(pooled_ptr + bg * J * CG + offs_c, mask=c_mask, other=0.0)
        pq = tl.load(pooled_ptr + (bg * J + J - 1) * CG + offs_c, mask=c_mask, other=0.0)
        shift = pk - pq if J == 2 else pk - mu
        gw_row = gw_ptr + (b * S + s) * GW_STRIDE
        first = (s == 0).to(tl.float32)  # P's weight grads come from split 0; the others write zeros
        if USE_P:
            p = tl.load(p_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
            g_shift = p * s_gy
            z1, w1, w2t = _p_hidden_tl(mu, g, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C, BLOCK_H)
            g_z2 = (s_gyx + shift * s_gy) * p * (1.0 - p)
            g_z1 = tl.where(z1 > 0, tl.sum(w2t * g_z2[None, :], 1), 0.0)
            g_mu = tl.sum(w1 * g_z1[:, None], 0)
            offs_h = tl.arange(0, BLOCK_H)
            hc_mask = (offs_h[:, None] < HG) & c_mask[None, :]
            tl.store(gw_row + OFF_W1 + (g * HG + offs_h[:, None]) * CG + offs_c[None, :], g_z1[:, None] * mu[None, :] * first, mask=hc_mask)
            tl.store(gw_row + OFF_B1 + g * HG + offs_h, g_z1 * first, mask=offs_h < HG)
            tl.store(gw_row + OFF_W2 + (g * CG + offs_c[None, :]) * HG + offs_h[:, None], g_z2[None, :] * tl.maximum(z1, 0.0)[:, None] * first, mask=hc_mask)
            tl.store(gw_row + OFF_B2 + g * CG + offs_c, g_z2 * first, mask=c_mask)
        else:
            p = tl.full([BLOCK_C], 1.0, tl.float32)
            g_shift = s_gy
            g_mu = tl.zeros([BLOCK_C], tl.float32)
        if J == 2:
            gpk, gpq = g_shift, -g_shift
            if HAS_GD:
                coef = tl.load(gd_ptr + b).to(tl.float32) / C
                gpk += coef * (pq - mu)
                gpq += coef * (pk - mu)
                g_mu -= coef * (pk - mu + pq - mu)
        else:
            gpk, gpq = g_shift, g_shift
            g_mu -= g_shift
        wk = tl.load(kw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        wq = tl.load(qw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        lse_k2 = tl.load(lse_ptr + bg * J) * LOG2E
        lse_q2 = tl.load(lse_ptr + bg * J + J - 1) * LOG2E
        ck, cq = tl.sum(gpk * pk, 0), tl.sum(gpq * pq, 0)
        gwk, gwq = tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)
        base = bg.to(tl.int64) * CG * N
        n_end = tl.minimum(s * CHUNK + CHUNK, N)
        for n0 in range(s * CHUNK, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_end
            offs = base + offs_c[:, None] * N + offs_n[None, :]
            mask = c_mask[:, None] & n_mask[None, :]
            xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gyt = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dk, rk = _head_dx(xt, wk, wk * LOG2E, gpk, ck, lse_k2)
            gx = p[:, None] * gyt + (g_mu / N)[:, None] + dk
            gwk += tl.sum(xt * tl.where(n_mask, rk, 0.0)[None, :], 1)
            if J == 2:
                dq, rq = _head_dx(xt, wq, wq * LOG2E, gpq, cq, lse_q2)
                gx += dq
                gwq += tl.sum(xt * tl.where(n_mask, rq, 0.0)[None, :], 1)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gw_row + OFF_KW + g * CG + offs_c, gwk, mask=c_mask)
        tl.store(gw_row + OFF_KB + g, 0.0)
        if J == 2:
            tl.store(gw_row + OFF_QW + g * CG + offs_c, gwq, mask=c_mask)
            tl.store(gw_row + OFF_QB + g, 0.0)
