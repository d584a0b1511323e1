"""Triton helpers shared by the fused ACM's forward and backward kernels (see op.py for the maths).

The streaming kernels run one program per (b*G + g, split) over a contiguous chunk of positions,
reading x as a [Cg, BLOCK_N] tile per step with x's own strides (NCHW or channels-last).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


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
