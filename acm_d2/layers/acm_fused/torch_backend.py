"""Torch backend of the fused ACM (see op.py for the maths): batched matmuls over the (B, G) groups.

Runs on any device; the CPU default and the fallback where Triton cannot run. Channels-last inputs
are read through one NCHW copy and y / dx are returned channels-last, as the op promises.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["forward", "backward", "grad_layout", "forward_for_export"]


def grad_layout(C: int, G: int, J: int, hidden: int) -> Tuple[Tuple[int, ...], int]:
    """Sizes of the parameter gradients in the flat vector both backends return, in order, and their
    total: per head (K, then Q) its logits weight (C) and bias (G); then, with P (hidden > 0), W1
    (hidden x C/G), b1 (hidden), W2 (C x hidden/G) and b2 (C)."""
    sizes = (C, G) * J
    if hidden:
        sizes += (hidden * (C // G), hidden, C * (hidden // G), C)
    return sizes, sum(sizes)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _groups(t: Tensor, num_groups: int) -> Tensor:
    """B x G x Cg x N; a channels-last t is copied to NCHW here (reshape), once per pass."""
    B, C, H, W = t.shape
    return t.reshape(B, num_groups, C // num_groups, H * W)


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t (B x G x Cg x N, NCHW) as a tensor of x's shape, dtype and memory format."""
    return t.view(x.shape).to(x.dtype).contiguous(memory_format=_format_of(x))


def _format_of(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


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


def forward(x, k_weight, q_weight, p_params, num_groups, need_orth):
    dt = _compute_dtype(x)
    xg = _groups(x.to(dt), num_groups)
    B, G, Cg, N = xg.shape
    logits = _logit_weights(k_weight, q_weight, num_groups, dt) @ xg  # B x G x J x N
    lse = logits.logsumexp(
        -1
    )  # saved like the Triton backend's, so either backward can follow either forward
    attn = (logits - lse[..., None]).exp_()
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
    return (
        _like(y, x),
        d,
        mu.reshape(B, G * Cg),
        pooled,
        lse,
        p.reshape(B, G * Cg) if p_params else p,
    )


def forward_for_export(
    x: Tensor,
    k_weight: Tensor,
    q_weight: Optional[Tensor],
    p_params: Optional[List[Tensor]],
    num_groups: int,
) -> Tensor:
    """y of `forward`, from the same operators in the same order, written for graph capture: it
    scripts, traces and exports to ONNX at opset 11 (no einsum, no out=, no in-place op), so an
    exported ACM computes what the eager fused op computes on the CPU. P's grouped products are
    written as the batched matmuls that `forward`'s einsums dispatch to, which give the same bits
    (tests/test_export.py compares a traced Mask R-CNN with its eager self)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, H, W = x.shape
    xg = x.to(dt).reshape(B, num_groups, C // num_groups, H * W)
    w = [k_weight] if q_weight is None else [k_weight, q_weight]
    w = torch.stack([t.view(num_groups, -1) for t in w], 1).to(dt)  # G x J x Cg
    # Expanded as matmul's broadcast does, so that fvcore's FLOP counter sees the batch too.
    logits = w.expand(B, -1, -1, -1) @ xg  # B x G x J x N
    attn = (logits - logits.logsumexp(-1)[..., None]).exp()
    pooled = attn @ xg.transpose(-1, -2)  # B x G x J x Cg
    mu = xg.mean(-1)
    shift = pooled[:, :, 0] - (pooled[:, :, 1] if q_weight is not None else mu)
    if p_params is None:
        y = xg + shift[..., None]
    else:
        w1, b1, w2, b2 = [t.to(dt) for t in p_params]
        Cg = C // num_groups
        # G-batched products over the B samples: G x B x Cg @ G x Cg x Hg, then G x B x Hg @ G x Hg x Cg.
        z1 = (mu.transpose(0, 1) @ w1.view(num_groups, -1, Cg).transpose(1, 2)).transpose(0, 1)
        h = (z1 + b1.view(num_groups, -1)).relu()
        z2 = (h.transpose(0, 1) @ w2.view(num_groups, Cg, -1).transpose(1, 2)).transpose(0, 1)
        p = torch.sigmoid(z2 + b2.view(num_groups, Cg))
        y = torch.addcmul((p * shift)[..., None], xg, p[..., None])
    return y.reshape(x.shape).to(x.dtype)


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
        p_grads = [
            torch.einsum("bgh,bgc->ghc", g_z1, mu),
            g_z1.sum(0),
            torch.einsum("bgc,bgh->gch", g_z2, h),
            g_z2.sum(0),
        ]
    if pooled.shape[2] == 1:  # no_q: shift = p_K - mu
        return g_shift[:, :, None], g_mu - g_shift, p_grads
    g_pooled = torch.stack([g_shift, -g_shift], 2)
    if grad_d is not None:
        kq = pooled - mu[:, :, None]
        coef = (grad_d / (mu.shape[1] * mu.shape[2]))[:, None, None, None]
        g_pooled = g_pooled + coef * kq.flip(2)
        g_mu = g_mu - coef[..., 0] * kq.sum(2)
    return g_pooled, g_mu, p_grads


def backward(grad_y, grad_d, x, k_weight, q_weight, p_params, mu, pooled, lse, p, num_groups):
    dt = mu.dtype
    xg, gyg = _groups(x.to(dt), num_groups), _groups(grad_y.to(dt), num_groups)
    B, G, Cg, N = xg.shape
    mu = mu.view(B, G, Cg)
    p = p.view(B, G, Cg) if p_params is not None else None
    s_gy, s_gyx = gyg.sum(-1), torch.einsum("bgcn,bgcn->bgc", gyg, xg)
    g_pooled, g_mu, p_grads = _small_backward(
        s_gy, s_gyx, grad_d, mu, pooled, p, p_params, num_groups
    )
    J = pooled.shape[2]
    w = _logit_weights(k_weight, q_weight, num_groups, dt)
    # One matmul recomputes the logits and takes dp_j . x_n for every n; its buffer then holds
    # [a_j; r_j] for the dx matmul below, so no N-long tensor is concatenated.
    v = torch.cat([w.expand(B, G, J, Cg), g_pooled], 2) @ xg  # B x G x 2J x N
    logits, t = v.split(J, 2)
    attn = logits.sub_(lse.to(dt)[..., None]).exp_()
    t.sub_((g_pooled * pooled).sum(-1, keepdim=True)).mul_(attn)  # r_jn = dL/dlogits
    g_w = (
        (t @ xg.transpose(-1, -2)).sum(0).transpose(0, 1)
    )  # J x G x Cg; per-sample matmuls need no copy of x
    g_mu = (g_mu / N)[..., None]
    # A new NCHW buffer (gyg may be a strided view of a channels-last dy) that baddbmm_ can view per group.
    gx = gyg.new_empty(gyg.shape)
    if p is not None:
        torch.addcmul(g_mu, gyg, p[..., None], out=gx)
    else:
        torch.add(gyg, g_mu, out=gx)
    # dx_n += sum_j a_jn dp_j + r_jn w_j: one batched matmul of rank 2J per group.
    u = torch.cat([g_pooled, w.expand(B, G, J, Cg)], 2).view(B * G, 2 * J, Cg)
    gx.view(B * G, Cg, N).baddbmm_(u.transpose(1, 2), v.view(B * G, 2 * J, N))
    zero_bias = g_w.new_zeros(num_groups)
    flat = [t for g in g_w for t in (g.flatten(), zero_bias)] + [g.flatten() for g in p_grads]
    return _like(gx, x), torch.cat(flat)
