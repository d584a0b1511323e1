"""Backward kernels of the fused ACM (see op.py for the maths; launched by triton_backend.backward).

    reduce(x, dy) -> stats (per b, g) -> dx(x, dy) -> finalize (per g)

reduce streams (x, dy) for S1 and S2 per split; stats holds the per-(b, g) maths (P's backward,
dp_K, dp_Q, dmu); dx recomputes the attention, writes dx and this split's logits-weight gradients;
finalize sums those over the batch and splits and forms P's weight gradients from (B, C) vectors,
writing every parameter gradient into one flat vector.
"""

import triton
import triton.language as tl

from .kernels_common import LOG2E, _p_hidden_block, _stream_program, _tile


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
    gd_stride,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    mu_ptr,
    pooled_ptr,
    p_ptr,
    coef_ptr,
    cdot_ptr,
    rows_ptr,
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
    rows written here, one record per (b, g)), dp_K, dp_Q, dmu; writes coef = [P, dmu / N, dp_K, dp_Q] and cdot = dp_j . p_j.
    dd is read with its stride: the gradient of d.sum() is an expanded scalar, used without a copy."""
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
        row = rows_ptr + bg * (2 * HG + CG)  # [g_z1 (HG), relu(z1) (HG), g_z2 (CG)]
        tl.store(row + 2 * HG + offs_c, g_z2, mask=c_mask)
        g_mu = tl.zeros([BLOCK_C], tl.float32)
        for h0 in range(0, HG, BLOCK_H):
            z1, w1, w2t = _p_hidden_block(
                mu, g, h0, w1_ptr, b1_ptr, w2_ptr, CG, HG, BLOCK_C, BLOCK_H
            )
            g_z1 = tl.where(z1 > 0, tl.sum(w2t * g_z2[None, :], 1), 0.0)
            g_mu += tl.sum(w1 * g_z1[:, None], 0)
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tl.store(row + offs_h, g_z1, mask=offs_h < HG)
            tl.store(row + HG + offs_h, tl.maximum(z1, 0.0), mask=offs_h < HG)
    else:
        p = tl.full([BLOCK_C], 1.0, tl.float32)
        g_shift = s_gy
        g_mu = tl.zeros([BLOCK_C], tl.float32)
    if J == 2:
        gpk, gpq = g_shift, -g_shift
        if HAS_GD:
            coef = tl.load(gd_ptr + b * gd_stride).to(tl.float32) / C
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


@triton.jit
def _bwd_finalize_kernel(
    gw_part_ptr,
    rows_ptr,
    mu_ptr,
    out_ptr,
    B,
    CG,
    G,
    HG,
    S,
    J: tl.constexpr,
    USE_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (g, h-block): every parameter gradient of group g into the flat vector, laid out as
    per head [w_j (C), b_j (G)], then [W1 (G*HG x CG), b1 (G*HG), W2 (C x HG), b2 (C)].

    dw_j sums the dx kernel's (b, split) partials; b_j is exactly 0 (softmax is shift invariant);
    dW1 = sum_b g_z1 mu^T, dW2 = sum_b g_z2 hidden^T, db1 / db2 = sum_b g_z1 / g_z2, for rows
    h-block of P's hidden layer. Sums over b run in a fixed order: no atomics, deterministic."""
    g, hb = tl.program_id(0), tl.program_id(1)
    C = G * CG
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < CG
    if hb == 0:
        for j in tl.static_range(J):
            acc = tl.zeros([BLOCK_C], tl.float32)
            for b in range(0, B):
                for s in range(0, S):
                    acc += tl.load(gw_part_ptr + (((b * G + g) * S + s) * J + j) * BLOCK_C + offs_c)
            tl.store(out_ptr + j * (C + G) + g * CG + offs_c, acc, mask=c_mask)
            tl.store(out_ptr + j * (C + G) + C + g, 0.0)
    if USE_P:
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HG
        g_w1 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        g_w2t = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        g_b1 = tl.zeros([BLOCK_H], tl.float32)
        g_b2 = tl.zeros([BLOCK_C], tl.float32)
        for b in range(0, B):
            row = rows_ptr + (b * G + g) * (2 * HG + CG)
            g_z1 = tl.load(row + offs_h, mask=h_mask, other=0.0)
            hidden = tl.load(row + HG + offs_h, mask=h_mask, other=0.0)
            mu = tl.load(mu_ptr + (b * G + g) * CG + offs_c, mask=c_mask, other=0.0)
            g_z2 = tl.load(row + 2 * HG + offs_c, mask=c_mask, other=0.0)
            g_w1 += g_z1[:, None] * mu[None, :]
            g_w2t += hidden[:, None] * g_z2[None, :]
            g_b1 += g_z1
            g_b2 += g_z2
        mask = h_mask[:, None] & c_mask[None, :]
        rows = g * HG + offs_h
        off_w1 = J * (C + G)
        off_w2 = off_w1 + G * HG * (CG + 1)
        tl.store(out_ptr + off_w1 + rows[:, None] * CG + offs_c[None, :], g_w1, mask=mask)
        tl.store(out_ptr + off_w1 + G * HG * CG + rows, g_b1, mask=h_mask)
        w2 = out_ptr + off_w2 + (g * CG + offs_c[None, :]) * HG + offs_h[:, None]
        tl.store(w2, g_w2t, mask=mask)
        if hb == 0:
            tl.store(out_ptr + off_w2 + C * HG + g * CG + offs_c, g_b2, mask=c_mask)
