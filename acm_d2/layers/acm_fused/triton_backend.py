"""Triton backend of the fused ACM (see op.py for the maths): six kernels, no host syncs, no atomics.

    forward:  reduce(x) -> stats (per b, g) -> output(x)            y = P x + P shift
    backward: reduce(x, dy) -> stats (per b, g) -> dx(x, dy)       + P's weight grads from (B, C) sums

The streaming kernels (reduce, output, dx) run one program per (b*G + g, split) over a contiguous chunk
of positions, reading x as a [Cg, BLOCK_N] tile per step with x's own strides (NCHW or channels-last).
The stats kernels run one program per (b, g) and hold the per-group maths: combining the splits'
partial sums (online softmax), P and its backward, in BLOCK_H-row tiles of P's weights so that no
program keeps a whole weight matrix in registers. The weights of P get their gradients from the
(B, C) vectors the stats kernel writes, with two batched matmuls over the batch.

Launch parameters come from `stream_config` / `stats_config`, pure functions of the shape and the SM
count, so that tests compile exactly what would launch (acm_d2/layers/acm_fused/aot.py).
"""

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["forward", "backward", "stream_config", "stats_config"]

LOG2E = tl.constexpr(1.4426950408889634)


class StreamConfig(NamedTuple):
    """Launch parameters of a kernel that streams over x: [block_c, block_n] tiles, `splits` programs
    per (b, g), each over `chunk` positions."""

    block_c: int
    block_n: int
    splits: int
    chunk: int
    num_warps: int


class StatsConfig(NamedTuple):
    block_c: int
    block_h: int
    num_warps: int


# x elements each thread holds per tile, per kernel. The compile check (aot.py, ptxas -v) showed why:
# a tile element costs its 64-bit address, its value and temporaries, about 10 registers in the
# reductions and 20 in dx, which recomputes both heads' attention (16 elements: 175 registers in
# fwd_reduce; 8: 173 in dx). 32 per thread spilled at res5 (fwd_reduce at 255 registers with 236 B of
# spills, dx at 255); 16 (8 in dx) leaves every kernel of the R50-FPN / C4 matrix spill-free while a
# tile is still 2048-4096 elements (8-16 KB of fp32 in flight).
_ELEMENTS_PER_THREAD = {"fwd_reduce": 16, "fwd_output": 16, "bwd_reduce": 16, "bwd_dx": 8}
# Programs the splits aim for per SM: enough resident CTAs to keep loads in flight on every SM
# while each program still streams a long chunk (the partial sums cost one B x G x S row each).
_PROGRAMS_PER_SM = 8
# Interpreter (CPU tests): tiny tiles and two splits exercise the loops, masks and the combine.
_INTERPRETER = dict(block_n=16, splits=2)


def stream_config(
    kind: str, B: int, C: int, N: int, num_groups: int, num_sms: Optional[int]
) -> StreamConfig:
    """Launch parameters of streaming kernel `kind` for x of B x C x N; num_sms None = interpreter."""
    block_c = _next_power_of_2(C // num_groups)
    # Wide groups (Cg >= 64: res5 at G <= 32, res4 at G <= 16) get 8 warps, so that the per-channel
    # vectors (P, dmu, dp_K, dp_Q, w_K, w_Q, dw_K, dw_Q in dx) are spread over more threads.
    num_warps = 8 if block_c >= 64 else 4
    if num_sms is None:
        block_n, splits = _INTERPRETER["block_n"], _INTERPRETER["splits"]
    else:
        # Rows of at least 8 positions (32 B of fp32 in NCHW, one sector); 16 unless the group is 256 wide.
        min_n = 8 if block_c >= 256 else 16
        block_n = max(min_n, min(1024, _ELEMENTS_PER_THREAD[kind] * 32 * num_warps // block_c))
        splits = max(1, min(_cdiv(N, block_n), _cdiv(_PROGRAMS_PER_SM * num_sms, B * num_groups)))
    chunk = _cdiv(_cdiv(N, splits), block_n) * block_n
    return StreamConfig(block_c, block_n, _cdiv(N, chunk), chunk, num_warps)


def stats_config(C: int, hidden: int, num_groups: int) -> StatsConfig:
    """Launch parameters of the per-(b, g) kernels: P's weights in [block_h, block_c] tiles of at
    most 2048 elements (16 registers per thread and tile at 4 warps), looped over the hidden rows."""
    block_c = _next_power_of_2(C // num_groups)
    block_h = max(1, min(_next_power_of_2(max(1, hidden // num_groups)), 2048 // block_c))
    return StatsConfig(block_c, block_h, 4)


def _cdiv(a: int, b: int) -> int:
    # Plain integer maths: triton.cdiv / next_power_of_2 are jit helpers whose Python wrappers cost
    # ~5 us per call, which added up to ~50 us of host time per ACM call (cProfile, Triton 3.8).
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(x: Tensor) -> Optional[int]:
    """The SM count of x's GPU; None on the interpreter (CPU tensors under TRITON_INTERPRET=1)."""
    return (
        _cuda_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        if x.is_cuda
        else None
    )


def _device_guard(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device and its current stream)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch(kernel, grid, *args, **meta):
    """The one place kernels are launched; aot.py replaces it to record launches instead."""
    kernel[grid](*args, **meta)


def _real(t: Tensor, stand_in: Tensor) -> Tensor:
    """t, or a real buffer in place of an empty one (a kernel never reads an absent input, but an
    empty CUDA tensor has a null pointer that a launcher may refuse)."""
    return t if t.numel() else stand_in


def _x_strides(x: Tensor):
    """(batch, channel, position) strides of x, NCHW or channels-last (stride_h = W * stride_w in both)."""
    return x.stride(0), x.stride(1), x.stride(3)


def forward(x, k_weight, q_weight, p_params, num_groups, need_orth):
    B, C, H, W = x.shape
    G, J, N, Cg = num_groups, 1 if q_weight is None else 2, H * W, C // num_groups
    use_p = p_params is not None
    f32 = dict(device=x.device, dtype=torch.float32)
    sc = stream_config("fwd_reduce", B, C, N, G, _num_sms(x))
    st = stats_config(C, p_params[0].shape[0] if use_p else G, G)
    w1, b1, w2, b2 = p_params if use_p else (x,) * 4  # never read without USE_P
    qw = k_weight if q_weight is None else q_weight
    part, part_ml = (
        torch.empty((B * G, sc.splits, J + 1, sc.block_c), **f32),
        torch.empty((B * G, sc.splits, J, 2), **f32),
    )
    mu, pooled, lse = (
        torch.empty((B, C), **f32),
        torch.empty((B, G, J, Cg), **f32),
        torch.empty((B, G, J), **f32),
    )
    p, offset = torch.empty((B, C) if use_p else (0,), **f32), torch.empty((B, C), **f32)
    d_part = torch.empty((B, G) if need_orth else (0,), **f32)
    y = torch.empty_like(x)
    with _device_guard(x):
        _launch(
            _fwd_reduce_kernel,
            (B * G, sc.splits),
            x,
            k_weight,
            qw,
            part,
            part_ml,
            N,
            Cg,
            G,
            *_x_strides(x),
            sc.chunk,
            sc.splits,
            J=J,
            BLOCK_C=sc.block_c,
            BLOCK_N=sc.block_n,
            num_warps=sc.num_warps,
        )
        _launch(
            _fwd_stats_kernel,
            (B * G,),
            part,
            part_ml,
            w1,
            b1,
            w2,
            b2,
            mu,
            pooled,
            lse,
            _real(p, mu),
            offset,
            _real(d_part, mu),
            N,
            Cg,
            G,
            w1.shape[0] // G if use_p else 1,
            C,
            sc.splits,
            J=J,
            USE_P=use_p,
            NEED_D=need_orth,
            BLOCK_C=st.block_c,
            BLOCK_H=st.block_h,
            num_warps=st.num_warps,
        )
        so = stream_config("fwd_output", B, C, N, G, _num_sms(x))
        _launch(
            _fwd_output_kernel,
            (B * G, so.splits),
            x,
            y,
            _real(p, offset),
            offset,
            N,
            Cg,
            G,
            *_x_strides(x),
            so.chunk,
            USE_P=use_p,
            BLOCK_C=so.block_c,
            BLOCK_N=so.block_n,
            num_warps=so.num_warps,
        )
    d = d_part.sum(1) if need_orth else d_part
    return y, d, mu, pooled, lse, p


def backward(grad_y, grad_d, x, k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups):
    B, C, H, W = x.shape
    G, J, N, Cg = num_groups, pooled.shape[2], H * W, C // num_groups
    use_p = p_params is not None
    hg = p_params[0].shape[0] // G if use_p else 1
    f32 = dict(device=x.device, dtype=torch.float32)
    sr = stream_config("bwd_reduce", B, C, N, G, _num_sms(x))
    sd = stream_config("bwd_dx", B, C, N, G, _num_sms(x))
    st = stats_config(C, hg * G, G)
    w1, b1, w2, _ = p_params if use_p else (x,) * 4
    qw = k_weight if q_weight is None else q_weight
    part = torch.empty((B * G, sr.splits, 2, sr.block_c), **f32)
    coef, cdot = torch.empty((B * G, 4, st.block_c), **f32), torch.empty((B * G, J), **f32)
    g_z1, hidden, g_z2 = (
        torch.empty((B, n) if use_p else (0,), **f32) for n in (hg * G, hg * G, C)
    )
    gw_part = torch.empty((B * G, sd.splits, J, sd.block_c), **f32)
    gx = torch.empty_like(x)
    with _device_guard(x):
        _launch(
            _bwd_reduce_kernel,
            (B * G, sr.splits),
            x,
            grad_y,
            part,
            N,
            Cg,
            G,
            *_x_strides(x),
            sr.chunk,
            BLOCK_C=sr.block_c,
            BLOCK_N=sr.block_n,
            num_warps=sr.num_warps,
        )
        _launch(
            _bwd_stats_kernel,
            (B * G,),
            part,
            grad_d if grad_d is not None else mu,
            w1,
            b1,
            w2,
            mu,
            pooled,
            _real(p, mu),
            coef,
            cdot,
            _real(g_z1, coef),
            _real(hidden, coef),
            _real(g_z2, coef),
            N,
            Cg,
            G,
            hg,
            C,
            sr.splits,
            J=J,
            USE_P=use_p,
            HAS_GD=grad_d is not None,
            BLOCK_C=st.block_c,
            BLOCK_H=st.block_h,
            num_warps=st.num_warps,
        )
        _launch(
            _bwd_dx_kernel,
            (B * G, sd.splits),
            x,
            grad_y,
            gx,
            k_weight,
            qw,
            lse,
            coef,
            cdot,
            gw_part,
            N,
            Cg,
            G,
            *_x_strides(x),
            sd.chunk,
            sd.splits,
            J=J,
            BLOCK_C=sd.block_c,
            BLOCK_N=sd.block_n,
            num_warps=sd.num_warps,
        )
    g_w = gw_part.view(B, G, sd.splits, J, sd.block_c).sum((0, 2))[..., :Cg]  # G x J x Cg
    zero_bias = g_w.new_zeros(G)
    flat = [t for j in range(J) for t in (g_w[:, j].flatten(), zero_bias)]
    if use_p:
        # P's weight gradients are sums over the batch of outer products of (B, C) vectors.
        g_z1, hidden, g_z2, mu_g = (
            g_z1.view(B, G, hg),
            hidden.view(B, G, hg),
            g_z2.view(B, G, Cg),
            mu.view(B, G, Cg),
        )
        flat += [
            torch.bmm(g_z1.permute(1, 2, 0), mu_g.transpose(0, 1)).flatten(),  # W1: G*Hg x Cg
            g_z1.sum(0).flatten(),
            torch.bmm(g_z2.permute(1, 2, 0), hidden.transpose(0, 1)).flatten(),  # W2: G*Cg x Hg
            g_z2.sum(0).flatten(),
        ]
    return gx, torch.cat(flat)


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _stream_program(N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C: tl.constexpr):
    """A streaming kernel's program (b*G + g, split): its ids, the group's channel offsets and mask,
    the group's int64 offset in x, and the positions [start, end) it streams over."""
    bg, s = tl.program_id(0), tl.program_id(1)
    b, g = bg // G, bg % G
    offs_c = tl.arange(0, BLOCK_C)
    base = b.to(tl.int64) * stride_b + (g * CG).to(tl.int64) * stride_c
    return bg, s, g, offs_c, offs_c < CG, base, s * CHUNK, tl.minimum(s * CHUNK + CHUNK, N)


@triton.jit
def _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N: tl.constexpr):
    """Offsets in x and mask of the [BLOCK_C, BLOCK_N] tile at positions n0.., and its positions' mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end
    offs = base + offs_c[:, None] * stride_c + offs_n[None, :] * stride_n
    return offs, c_mask[:, None] & n_mask[None, :], n_mask


@triton.jit
def _softmax_start(BLOCK_C: tl.constexpr):
    """An empty online softmax: running max -inf, sum 0, pooled vector 0."""
    return (
        tl.full([], float("-inf"), tl.float32),
        tl.full([], 0.0, tl.float32),
        tl.zeros([BLOCK_C], tl.float32),
    )


@triton.jit
def _softmax_step(xt, w2, n_mask, m, denom, acc):
    """Online softmax over one tile, in base 2: logits w2 . x_n, running max m, sum `denom`, acc."""
    s = tl.where(n_mask, tl.sum(xt * w2[:, None], 0), float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 0))
    alpha = tl.exp2(m - m_new)
    e = tl.exp2(s - m_new)
    return m_new, denom * alpha + tl.sum(e, 0), acc * alpha + tl.sum(xt * e[None, :], 1)


@triton.jit
def _fwd_reduce_kernel(
    x_ptr,
    kw_ptr,
    qw_ptr,
    part_ptr,
    ml_ptr,
    N,
    CG,
    G,
    stride_b,
    stride_c,
    stride_n,
    CHUNK,
    S,
    J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bg, s, g, offs_c, c_mask, base, start, n_end = _stream_program(
        N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C
    )
    wk = tl.load(kw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32) * LOG2E
    wq = tl.load(qw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32) * LOG2E
    sum_x = tl.zeros([BLOCK_C], tl.float32)
    m_k, l_k, acc_k = _softmax_start(BLOCK_C)
    m_q, l_q, acc_q = _softmax_start(BLOCK_C)
    for n0 in range(start, n_end, BLOCK_N):
        offs, mask, n_mask = _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N)
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_x += tl.sum(xt, 1)
        m_k, l_k, acc_k = _softmax_step(xt, wk, n_mask, m_k, l_k, acc_k)
        if J == 2:
            m_q, l_q, acc_q = _softmax_step(xt, wq, n_mask, m_q, l_q, acc_q)
    vec = part_ptr + (bg * S + s) * (J + 1) * BLOCK_C + offs_c
    ml = ml_ptr + (bg * S + s) * J * 2
    tl.store(vec, sum_x)
    tl.store(vec + BLOCK_C, acc_k)
    tl.store(ml, m_k)
    tl.store(ml + 1, l_k)
    if J == 2:
        tl.store(vec + 2 * BLOCK_C, acc_q)
        tl.store(ml + 2, m_q)
        tl.store(ml + 3, l_q)


@triton.jit
def _combine_head(part_ptr, ml_ptr, bg, S, j, J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits' online-softmax partials of head j: pooled vector and natural-log lse."""
    offs_c = tl.arange(0, BLOCK_C)
    m, denom, acc = (
        tl.full([], float("-inf"), tl.float32),
        tl.full([], 0.0, tl.float32),
        tl.zeros([BLOCK_C], tl.float32),
    )
    for s in range(0, S):
        ml = ml_ptr + ((bg * S + s) * J + j) * 2
        m_s, denom_s = tl.load(ml), tl.load(ml + 1)
        a_s = tl.load(part_ptr + ((bg * S + s) * (J + 1) + 1 + j) * BLOCK_C + offs_c)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        denom, acc, m = denom * alpha + denom_s * beta, acc * alpha + a_s * beta, m_new
    return acc / denom, (m + tl.log2(denom)) / LOG2E


@triton.jit
def _p_hidden_block(
    mu, g, h0, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr
):
    """Rows h0 .. h0 + BLOCK_H of P's first conv for group g: pre-activation z1, the W1 and W2^T tiles."""
    offs_c, offs_h = tl.arange(0, BLOCK_C), h0 + tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < HG) & (offs_c[None, :] < CG)
    w1 = tl.load(
        w1_ptr + (g * HG + offs_h[:, None]) * CG + offs_c[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    w2t = tl.load(
        w2_ptr + (g * CG + offs_c[None, :]) * HG + offs_h[:, None], mask=mask, other=0.0
    ).to(tl.float32)
    z1 = tl.sum(w1 * mu[None, :], 1) + tl.load(
        b1_ptr + g * HG + offs_h, mask=offs_h < HG, other=0.0
    ).to(tl.float32)
    return z1, w1, w2t


@triton.jit
def _fwd_stats_kernel(
    part_ptr,
    ml_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    mu_ptr,
    pooled_ptr,
    lse_ptr,
    p_ptr,
    offset_ptr,
    d_part_ptr,
    N,
    CG,
    G,
    HG,
    C,
    S,
    J: tl.constexpr,
    USE_P: tl.constexpr,
    NEED_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    bg = tl.program_id(0)
    g = bg % G
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < CG
    sum_x = tl.zeros([BLOCK_C], tl.float32)
    for t in range(0, S):
        sum_x += tl.load(
            part_ptr + (bg * S + t) * (J + 1) * BLOCK_C + offs_c, mask=c_mask, other=0.0
        )
    mu = sum_x / N
    pk, lse_k = _combine_head(part_ptr, ml_ptr, bg, S, 0, J, BLOCK_C)
    tl.store(mu_ptr + bg * CG + offs_c, mu, mask=c_mask)
    tl.store(pooled_ptr + bg * J * CG + offs_c, pk, mask=c_mask)
    tl.store(lse_ptr + bg * J, lse_k)
    if J == 2:
        pq, lse_q = _combine_head(part_ptr, ml_ptr, bg, S, 1, J, BLOCK_C)
        tl.store(pooled_ptr + (bg * J + 1) * CG + offs_c, pq, mask=c_mask)
        tl.store(lse_ptr + bg * J + 1, lse_q)
        shift = pk - pq
        if NEED_D:
            tl.store(d_part_ptr + bg, tl.sum(tl.where(c_mask, (pk - mu) * (pq - mu), 0.0), 0) / C)
    else:
        shift = pk - mu
    if USE_P:
        z2 = tl.load(b2_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        for h0 in range(0, HG, BLOCK_H):
            z1, _, w2t = _p_hidden_block(
                mu, g, h0, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C, BLOCK_H
            )
            z2 += tl.sum(w2t * tl.maximum(z1, 0.0)[:, None], 0)
        p = tl.sigmoid(z2)
        tl.store(p_ptr + bg * CG + offs_c, p, mask=c_mask)
        shift = p * shift
    tl.store(offset_ptr + bg * CG + offs_c, shift, mask=c_mask)


@triton.jit
def _fwd_output_kernel(
    x_ptr,
    y_ptr,
    p_ptr,
    offset_ptr,
    N,
    CG,
    G,
    stride_b,
    stride_c,
    stride_n,
    CHUNK,
    USE_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = P x + P shift, elementwise with per-channel P and P shift."""
    bg, s, g, offs_c, c_mask, base, start, n_end = _stream_program(
        N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C
    )
    offset = tl.load(offset_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
    if USE_P:
        p = tl.load(p_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
    for n0 in range(start, n_end, BLOCK_N):
        offs, mask, _ = _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N)
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if USE_P:
            xt = xt * p[:, None]
        tl.store(y_ptr + offs, (xt + offset[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(
    x_ptr,
    gy_ptr,
    part_ptr,
    N,
    CG,
    G,
    stride_b,
    stride_c,
    stride_n,
    CHUNK,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per channel: S1 = sum_n dy_n and S2 = sum_n dy_n x_n over this program's chunk."""
    bg, s, g, offs_c, c_mask, base, start, n_end = _stream_program(
        N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C
    )
    s_gy, s_gyx = tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(start, n_end, BLOCK_N):
        offs, mask, _ = _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N)
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gyt = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s_gy += tl.sum(gyt, 1)
        s_gyx += tl.sum(gyt * xt, 1)
    out = part_ptr + (bg * tl.num_programs(1) + s) * 2 * BLOCK_C + offs_c
    tl.store(out, s_gy)
    tl.store(out + BLOCK_C, s_gyx)


@triton.jit
def _bwd_stats_kernel(
    part_ptr,
    gd_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    mu_ptr,
    pooled_ptr,
    p_ptr,
    coef_ptr,
    cdot_ptr,
    g_z1_ptr,
    hidden_ptr,
    g_z2_ptr,
    N,
    CG,
    G,
    HG,
    C,
    S,
    J: tl.constexpr,
    USE_P: tl.constexpr,
    HAS_GD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The per-(b, g) backward: dP through P's MLP (P's weight grads come from the g_z1, hidden, g_z2
    rows written here), dp_K, dp_Q, dmu; writes coef = [P, dmu / N, dp_K, dp_Q] and cdot = dp_j . p_j."""
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < CG
    s_gy, s_gyx = tl.zeros([BLOCK_C], tl.float32), tl.zeros([BLOCK_C], tl.float32)
    for t in range(0, S):
        s_gy += tl.load(part_ptr + (bg * S + t) * 2 * BLOCK_C + offs_c, mask=c_mask, other=0.0)
        s_gyx += tl.load(
            part_ptr + (bg * S + t) * 2 * BLOCK_C + BLOCK_C + offs_c, mask=c_mask, other=0.0
        )
    mu = tl.load(mu_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
    pk = tl.load(pooled_ptr + bg * J * CG + offs_c, mask=c_mask, other=0.0)
    pq = tl.load(pooled_ptr + (bg * J + J - 1) * CG + offs_c, mask=c_mask, other=0.0)
    shift = pk - pq if J == 2 else pk - mu
    if USE_P:
        p = tl.load(p_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
        g_shift = p * s_gy
        g_z2 = (s_gyx + shift * s_gy) * p * (1.0 - p)
        tl.store(g_z2_ptr + bg * CG + offs_c, g_z2, mask=c_mask)
        g_mu = tl.zeros([BLOCK_C], tl.float32)
        for h0 in range(0, HG, BLOCK_H):
            z1, w1, w2t = _p_hidden_block(
                mu, g, h0, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C, BLOCK_H
            )
            g_z1 = tl.where(z1 > 0, tl.sum(w2t * g_z2[None, :], 1), 0.0)
            g_mu += tl.sum(w1 * g_z1[:, None], 0)
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tl.store(g_z1_ptr + bg * HG + offs_h, g_z1, mask=offs_h < HG)
            tl.store(hidden_ptr + bg * HG + offs_h, tl.maximum(z1, 0.0), mask=offs_h < HG)
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
    out = coef_ptr + bg * 4 * BLOCK_C + offs_c
    tl.store(out, p)
    tl.store(out + BLOCK_C, g_mu / N)
    tl.store(out + 2 * BLOCK_C, gpk)
    tl.store(out + 3 * BLOCK_C, gpq)
    tl.store(cdot_ptr + bg * J, tl.sum(tl.where(c_mask, gpk * pk, 0.0), 0))
    if J == 2:
        tl.store(cdot_ptr + bg * J + 1, tl.sum(tl.where(c_mask, gpq * pq, 0.0), 0))


@triton.jit
def _head_dx(xt, w, w2, gp, c, lse2):
    """One head's share of dx for a tile, and its r_n for dw: a_n dp + r_n w, r_n = a_n (dp.x_n - c)."""
    a = tl.exp2(tl.sum(xt * w2[:, None], 0) - lse2)
    r = a * (tl.sum(xt * gp[:, None], 0) - c)
    return gp[:, None] * a[None, :] + w[:, None] * r[None, :], r


@triton.jit
def _bwd_dx_kernel(
    x_ptr,
    gy_ptr,
    gx_ptr,
    kw_ptr,
    qw_ptr,
    lse_ptr,
    coef_ptr,
    cdot_ptr,
    gw_ptr,
    N,
    CG,
    G,
    stride_b,
    stride_c,
    stride_n,
    CHUNK,
    S,
    J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx_n = P dy_n + dmu / N + sum_j (a_jn dp_j + r_jn w_j); this chunk's dw_j = sum_n r_jn x_n."""
    bg, s, g, offs_c, c_mask, base, start, n_end = _stream_program(
        N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C
    )
    coef = coef_ptr + bg * 4 * BLOCK_C + offs_c
    p = tl.load(coef, mask=c_mask, other=0.0)
    g_mu_n = tl.load(coef + BLOCK_C, mask=c_mask, other=0.0)
    gpk = tl.load(coef + 2 * BLOCK_C, mask=c_mask, other=0.0)
    wk = tl.load(kw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    lse_k2 = tl.load(lse_ptr + bg * J) * LOG2E
    ck = tl.load(cdot_ptr + bg * J)
    gwk = tl.zeros([BLOCK_C], tl.float32)
    if J == 2:
        gpq = tl.load(coef + 3 * BLOCK_C, mask=c_mask, other=0.0)
        wq = tl.load(qw_ptr + g * CG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        lse_q2 = tl.load(lse_ptr + bg * J + 1) * LOG2E
        cq = tl.load(cdot_ptr + bg * J + 1)
        gwq = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(start, n_end, BLOCK_N):
        offs, mask, n_mask = _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N)
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gyt = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dk, rk = _head_dx(xt, wk, wk * LOG2E, gpk, ck, lse_k2)
        gx = p[:, None] * gyt + g_mu_n[:, None] + dk
        gwk += tl.sum(xt * tl.where(n_mask, rk, 0.0)[None, :], 1)
        if J == 2:
            dq, rq = _head_dx(xt, wq, wq * LOG2E, gpq, cq, lse_q2)
            gx += dq
            gwq += tl.sum(xt * tl.where(n_mask, rq, 0.0)[None, :], 1)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    out = gw_ptr + (bg * S + s) * J * BLOCK_C + offs_c
    tl.store(out, gwk)
    if J == 2:
        tl.store(out + BLOCK_C, gwq)
