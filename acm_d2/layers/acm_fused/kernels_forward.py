"""Forward kernels of the fused ACM (see op.py for the maths; launched by triton_backend.forward).

    reduce(x) -> stats (per b, g) -> output(x)            y = P x + P shift

reduce streams x once for mu, both heads' online softmax and pooled vectors per split; stats merges
the splits and computes P; output writes y and sums the orthogonality term's per-group parts.
"""

import triton
import triton.language as tl

from .kernels_common import LOG2E, _p_hidden_block, _stream_program, _tile


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
def _record(J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Floats per (b, g, split) record of the reduce kernel's partials: sum_x and each head's pooled
    vector (BLOCK_C each), then each head's running max and sum, padded to 4 floats (16 B aligned)."""
    return (J + 1) * BLOCK_C + 4


@triton.jit
def _fwd_reduce_kernel(
    x_ptr,
    kw_ptr,
    qw_ptr,
    part_ptr,
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
    vec = part_ptr + (bg * S + s) * _record(J, BLOCK_C) + offs_c
    ml = part_ptr + (bg * S + s) * _record(J, BLOCK_C) + (J + 1) * BLOCK_C
    tl.store(vec, sum_x)
    tl.store(vec + BLOCK_C, acc_k)
    tl.store(ml, m_k)
    tl.store(ml + 1, l_k)
    if J == 2:
        tl.store(vec + 2 * BLOCK_C, acc_q)
        tl.store(ml + 2, m_q)
        tl.store(ml + 3, l_q)


@triton.jit
def _combine_head(part_ptr, bg, S, j, J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits' online-softmax partials of head j: pooled vector and natural-log lse."""
    offs_c = tl.arange(0, BLOCK_C)
    m, denom, acc = (
        tl.full([], float("-inf"), tl.float32),
        tl.full([], 0.0, tl.float32),
        tl.zeros([BLOCK_C], tl.float32),
    )
    for s in range(0, S):
        rec = part_ptr + (bg * S + s) * _record(J, BLOCK_C)
        m_s, denom_s = (
            tl.load(rec + (J + 1) * BLOCK_C + 2 * j),
            tl.load(rec + (J + 1) * BLOCK_C + 2 * j + 1),
        )
        a_s = tl.load(rec + (1 + j) * BLOCK_C + offs_c)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        denom, acc, m = denom * alpha + denom_s * beta, acc * alpha + a_s * beta, m_new
    return acc / denom, (m + tl.log2(denom)) / LOG2E


@triton.jit
def _fwd_stats_kernel(
    part_ptr,
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
            part_ptr + (bg * S + t) * _record(J, BLOCK_C) + offs_c, mask=c_mask, other=0.0
        )
    mu = sum_x / N
    pk, lse_k = _combine_head(part_ptr, bg, S, 0, J, BLOCK_C)
    tl.store(mu_ptr + bg * CG + offs_c, mu, mask=c_mask)
    tl.store(pooled_ptr + bg * J * CG + offs_c, pk, mask=c_mask)
    tl.store(lse_ptr + bg * J, lse_k)
    if J == 2:
        pq, lse_q = _combine_head(part_ptr, bg, S, 1, J, BLOCK_C)
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
    d_part_ptr,
    d_ptr,
    N,
    CG,
    G,
    stride_b,
    stride_c,
    stride_n,
    CHUNK,
    USE_P: tl.constexpr,
    NEED_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """y = P x + P shift, elementwise with per-channel P and P shift; d[b] = the sum of the stats
    kernel's per-group parts (complete once this launch starts), so that d costs no launch of its own."""
    bg, s, g, offs_c, c_mask, base, start, n_end = _stream_program(
        N, CG, G, stride_b, stride_c, CHUNK, BLOCK_C
    )
    if NEED_D:
        if (g == 0) & (s == 0):
            offs_g = tl.arange(0, BLOCK_G)
            b = bg // G
            part = tl.load(d_part_ptr + b * G + offs_g, mask=offs_g < G, other=0.0)
            tl.store(d_ptr + b, tl.sum(part, 0))
    offset = tl.load(offset_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
    if USE_P:
        p = tl.load(p_ptr + bg * CG + offs_c, mask=c_mask, other=0.0)
    for n0 in range(start, n_end, BLOCK_N):
        offs, mask, _ = _tile(base, n0, n_end, offs_c, c_mask, stride_c, stride_n, BLOCK_N)
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if USE_P:
            xt = xt * p[:, None]
        tl.store(y_ptr + offs, (xt + offset[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
