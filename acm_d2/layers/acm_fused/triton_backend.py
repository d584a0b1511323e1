"""Triton backend of the fused ACM (see op.py for the maths): launch code and launch parameters of
seven kernels (kernels_forward.py, kernels_backward.py), no host syncs, no atomics, no torch ops but
allocations (which launch nothing).

    forward:  reduce(x) -> stats (per b, g) -> output(x)                      y = P x + P shift, d
    backward: reduce(x, dy) -> stats (per b, g) -> dx(x, dy) -> finalize (per g)  dx, weight grads

The stats kernels run one program per (b, g) and hold the per-group maths: combining the splits'
partial sums (online softmax), P and its backward, in BLOCK_H-row tiles of P's weights so that no
program keeps a whole weight matrix in registers. The finalize kernel writes every weight gradient
into the flat vector the op returns, from the (B, C) vectors the stats kernel wrote.

Launch parameters come from `stream_config` / `stats_config`, pure functions of the shape and the SM
count (cached per shape), so that tests compile exactly what would launch (acm_d2/layers/acm_fused/aot.py).
"""

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .kernels_backward import (
    _bwd_dx_kernel,
    _bwd_finalize_kernel,
    _bwd_reduce_kernel,
    _bwd_stats_kernel,
)
from .kernels_forward import _fwd_output_kernel, _fwd_reduce_kernel, _fwd_stats_kernel
from .torch_backend import grad_layout

__all__ = ["forward", "backward", "stream_config", "stats_config"]

F32 = torch.float32
# How Triton's launcher reports a failed allocation (its CUDA driver call), unlike torch's allocator.
_TRITON_CUDA_OOM = "Triton Error [CUDA]: out of memory"


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


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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
    """The one place kernels are launched; aot.py replaces it to record launches instead.

    A failed allocation in Triton's launcher is an out-of-memory like torch's, not a broken Triton:
    raised as torch.OutOfMemoryError, it propagates (op.py falls back to torch only on other errors)."""
    try:
        kernel[grid](*args, **meta)
    except RuntimeError as e:
        if _TRITON_CUDA_OOM in str(e):
            raise torch.OutOfMemoryError(str(e)) from e
        raise


def _x_strides(x: Tensor):
    """(batch, channel, position) strides of x, NCHW or channels-last (stride_h = W * stride_w in both)."""
    stride = x.stride()
    return stride[0], stride[1], stride[3]


def forward(x, k_weight, q_weight, p_params, num_groups, need_orth):
    B, C, H, W = x.shape
    G, J, N, Cg = num_groups, 1 if q_weight is None else 2, H * W, C // num_groups
    use_p = p_params is not None
    dev, num_sms = x.device, _num_sms(x)
    sc = stream_config("fwd_reduce", B, C, N, G, num_sms)
    so = stream_config("fwd_output", B, C, N, G, num_sms)
    hg = p_params[0].shape[0] // G if use_p else 1
    st = stats_config(C, hg * G, G)
    w1, b1, w2, b2 = p_params if use_p else (x,) * 4  # never read without USE_P
    qw = k_weight if q_weight is None else q_weight
    # Per (b, g, split): the partial sums and online-softmax state (kernels_forward._record).
    part = torch.empty((B * G, sc.splits, (J + 1) * sc.block_c + 4), device=dev, dtype=F32)
    mu = torch.empty((B, C), device=dev, dtype=F32)
    pooled = torch.empty((B, G, J, Cg), device=dev, dtype=F32)
    lse = torch.empty((B, G, J), device=dev, dtype=F32)
    p = torch.empty((B, C) if use_p else (0,), device=dev, dtype=F32)
    offset = torch.empty((B, C), device=dev, dtype=F32)
    d_part = torch.empty((B, G), device=dev, dtype=F32) if need_orth else mu
    d = torch.empty((B,) if need_orth else (0,), device=dev, dtype=F32)
    y = torch.empty_like(x)
    strides = _x_strides(x)
    with _device_guard(x):
        _launch(
            _fwd_reduce_kernel,
            (B * G, sc.splits),
            x,
            k_weight,
            qw,
            part,
            N,
            Cg,
            G,
            *strides,
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
            w1,
            b1,
            w2,
            b2,
            mu,
            pooled,
            lse,
            p if use_p else mu,
            offset,
            d_part,
            N,
            Cg,
            G,
            hg,
            C,
            sc.splits,
            J=J,
            USE_P=use_p,
            NEED_D=need_orth,
            BLOCK_C=st.block_c,
            BLOCK_H=st.block_h,
            num_warps=st.num_warps,
        )
        _launch(
            _fwd_output_kernel,
            (B * G, so.splits),
            x,
            y,
            p if use_p else offset,
            offset,
            d_part,
            d if need_orth else mu,
            N,
            Cg,
            G,
            *strides,
            so.chunk,
            USE_P=use_p,
            NEED_D=need_orth,
            BLOCK_C=so.block_c,
            BLOCK_N=so.block_n,
            BLOCK_G=_next_power_of_2(G),
            num_warps=so.num_warps,
        )
    return y, d, mu, pooled, lse, p


def backward(grad_y, grad_d, x, k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups):
    B, C, H, W = x.shape
    G, J, N, Cg = num_groups, pooled.shape[2], H * W, C // num_groups
    use_p = p_params is not None
    hg = p_params[0].shape[0] // G if use_p else 1
    dev, num_sms = x.device, _num_sms(x)
    sr = stream_config("bwd_reduce", B, C, N, G, num_sms)
    sd = stream_config("bwd_dx", B, C, N, G, num_sms)
    st = stats_config(C, hg * G, G)
    w1, b1, w2, _ = p_params if use_p else (x,) * 4
    qw = k_weight if q_weight is None else q_weight
    part = torch.empty((B * G, sr.splits, 2, sr.block_c), device=dev, dtype=F32)
    coef = torch.empty((B * G, 4, st.block_c), device=dev, dtype=F32)
    cdot = torch.empty((B * G, J), device=dev, dtype=F32)
    # Per (b, g): P's hidden layer, its gradient and dP's pre-sigmoid, for P's weight gradients.
    rows = torch.empty((B * G, 2 * hg + Cg), device=dev, dtype=F32) if use_p else coef
    gw_part = torch.empty((B * G, sd.splits, J, sd.block_c), device=dev, dtype=F32)
    flat = torch.empty(grad_layout(C, G, J, hg * G if use_p else 0)[1], device=dev, dtype=F32)
    gx = torch.empty_like(x)
    strides = _x_strides(x)
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
            *strides,
            sr.chunk,
            BLOCK_C=sr.block_c,
            BLOCK_N=sr.block_n,
            num_warps=sr.num_warps,
        )
        _launch(
            _bwd_stats_kernel,
            (B * G,),
            part,
            mu if grad_d is None else grad_d,
            0 if grad_d is None else grad_d.stride(0),
            w1,
            b1,
            w2,
            mu,
            pooled,
            p if use_p else mu,
            coef,
            cdot,
            rows,
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
            *strides,
            sd.chunk,
            sd.splits,
            J=J,
            BLOCK_C=sd.block_c,
            BLOCK_N=sd.block_n,
            num_warps=sd.num_warps,
        )
        _launch(
            _bwd_finalize_kernel,
            (G, _cdiv(hg, st.block_h) if use_p else 1),
            gw_part,
            rows,
            mu,
            flat,
            B,
            Cg,
            G,
            hg,
            sd.splits,
            J=J,
            USE_P=use_p,
            BLOCK_C=sd.block_c,
            BLOCK_H=st.block_h,
            num_warps=st.num_warps,
        )
    return gx, flat
