"""Attend-and-Compare Module (ACM).

Paper: "Learning Visual Context by Comparison", Minchul Kim, Jongchan Park, Seil Na, Chang Min Park,
Donggeun Yoo, ECCV 2020 (https://arxiv.org/abs/2007.07506).

For a feature map X (B x C x H x W) split into G channel groups:

    mu = mean_HW(X)
    K  = sum_n softmax_n(w_K^g . (X - mu)_n + b_K^g) (X - mu)_n      per group g, an attention-weighted mean
    Q  = the same with w_Q, b_Q
    P  = sigmoid(conv(relu(conv(mu))))                                grouped 1x1 convs, C -> C/r -> C
    Y  = P * (X + (K - Q))
    d  = sum_c K_c Q_c / C                                            the orthogonality term, per sample

The authors' code (and this module) initialise every conv with kaiming_normal_(fan_out, relu) and zero
bias, so ACM is not an identity at the start of training. Two identities are used: inside the softmax
the bias and mu shift every logit of a group equally and cancel, so the logits are taken on X itself;
and K - Q = sum_n a^K_n X_n - sum_n a^Q_n X_n, so mu cancels in Y (it still enters P and d).
The bias is kept in the logits although it cancels, so that it takes part in autograd and DDP sees
every parameter used.

The pooling, softmax and P run in float32 (float64 for float64 inputs) whatever the input dtype,
autocast included: under fp16 the logits and the HW-long sums overflow or lose too much precision.

`impl` picks the reference below or the fused form of acm_fused/ (same function, analytic backward
that recomputes the attention instead of storing it; Triton kernels on CUDA). The fused op is a
training and eager-speed device, not a deployment format: while a graph is captured for deployment
(TorchScript scripting or tracing, ONNX export, torch.export) the module writes standard operators
only, so the saved graph runs where acm_d2 is not installed (libtorch, onnxruntime) and counts in
fvcore's FLOP counter. In eval mode those are the operators of the fused op's torch backend
(`torch_backend.forward_for_export`) wherever eager would run the fused op, so that an exported
model computes what its eager self computes on the CPU bit for bit: ACM's untrained attention logits
reach the hundreds, the softmax is then nearly an argmax, and the rounding difference between the
two forms would change which detections a random-weight detector keeps. Elsewhere (impl
"reference", "p_only", training mode) the graph holds the reference. torch.compile still gets the
fused op, as one node. Both are written with matmul rather than einsum because ONNX has no einsum
before opset 12 and Detectron2 exports at opset 11.
"""

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ._precision import at_least_float32
from .acm_fused import FUSED_VARIANTS, acm_fused, triton_available
from .acm_fused.torch_backend import forward_for_export

__all__ = ["AttendAndCompare", "ACM_VARIANTS", "ACM_IMPLS"]

# The four rows of the paper's Table 2(a): name -> (uses K, uses Q, uses P).
ACM_VARIANTS = {
    "full": (True, True, True),  # P(X + (K - Q)), the paper's ACM
    "no_p": (True, True, False),  # X + (K - Q)
    "p_only": (False, False, True),  # P X
    "no_q": (True, False, True),  # P(X + K)
}
ACM_IMPLS = ("auto", "reference", "fused")
# Measured with tools/benchmark_acm_layer.py on CPU: the fused torch form beats the reference there.
_FUSED_FASTER_ON_CPU = True


def _capturing_graph() -> bool:
    """Whether forward runs under TorchScript tracing, an ONNX export or torch.export, which all record
    the operators they see into a graph meant to run without acm_d2 (scripting is told apart in forward).
    torch < 2.3 has no torch.compiler.is_exporting: there torch.export keeps the fused op."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or (is_exporting is not None and is_exporting())
    )


class AttendAndCompare(nn.Module):
    """ACM for a C-channel feature map; returns a tensor of the input's shape and dtype.

    Args:
        channels: C, the number of input (and output) channels.
        num_groups: G, attention heads for K and Q and groups of P's convs (paper: 32). C and
            C // reduction must both be divisible by it.
        reduction: P's hidden width is C // reduction (paper: 2).
        variant: one of ACM_VARIANTS (paper's default "full").
        impl: "reference" (the code below), "fused" (acm_fused/), or "auto": fused on CUDA when
            Triton is importable and on CPU, reference elsewhere. "p_only" has no attention to fuse
            and always runs the reference.

    In training mode, when the variant has both K and Q, forward stores the per-sample orthogonality
    term d (float32, float64 for float64 inputs; shape B) in `self.orth_term` for the model's loss to read; in eval mode it
    computes nothing for the loss and `self.orth_term` is None.
    """

    # Declared for TorchScript, which would otherwise type the attribute from its first value, None.
    orth_term: Optional[torch.Tensor]

    def __init__(
        self,
        channels: int,
        num_groups: int = 32,
        reduction: int = 2,
        variant: str = "full",
        impl: str = "auto",
    ):
        super().__init__()
        if variant not in ACM_VARIANTS:
            raise ValueError(f"ACM variant must be one of {sorted(ACM_VARIANTS)}, got {variant!r}")
        if impl not in ACM_IMPLS:
            raise ValueError(f"ACM impl must be one of {list(ACM_IMPLS)}, got {impl!r}")
        if num_groups < 1 or channels % num_groups != 0:
            raise ValueError(
                f"ACM needs channels ({channels}) divisible by num_groups ({num_groups}); "
                f"choose num_groups among the divisors of {channels}"
            )
        if reduction < 1 or channels % reduction != 0 or (channels // reduction) % num_groups != 0:
            raise ValueError(
                f"ACM needs channels // reduction ({channels} // {reduction}) to be a whole multiple "
                f"of num_groups ({num_groups}); choose a reduction that divides {channels // num_groups}"
            )
        self.channels, self.num_groups, self.reduction, self.variant, self.impl = (
            channels,
            num_groups,
            reduction,
            variant,
            impl,
        )
        self.use_k, self.use_q, self.use_p = ACM_VARIANTS[variant]
        # Parameter names mirror the roles (k/q logits, P's two convs); see
        # acm_d2/checkpoint for the mapping to the authors' add_mod/sub_mod/mul_mod names.
        self.k_logits = (
            nn.Conv2d(channels, num_groups, 1, groups=num_groups) if self.use_k else None
        )
        self.q_logits = (
            nn.Conv2d(channels, num_groups, 1, groups=num_groups) if self.use_q else None
        )
        hidden = channels // reduction
        self.p_reduce = nn.Conv2d(channels, hidden, 1, groups=num_groups) if self.use_p else None
        self.p_expand = nn.Conv2d(hidden, channels, 1, groups=num_groups) if self.use_p else None
        self.orth_term: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self):
        """The authors' initialisation: kaiming normal (fan_out, relu) weights, zero biases."""
        for conv in (self.k_logits, self.q_logits, self.p_reduce, self.p_expand):
            if conv is not None:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict:
        """The softmax attention that forward pools K and Q with, for input x (B x C x H x W):
        {"K": B x G x H x W, "Q": ...}, float32 (float64 for float64 x), each map summing to 1.
        Only the heads this variant has ("p_only": none, {})."""
        if not self.use_k:
            return {}
        with torch.autocast(device_type=x.device.type, enabled=False):
            attn = (
                self._attention(at_least_float32(x)).permute(0, 3, 1, 2).unflatten(-1, x.shape[2:])
            )  # B x heads x G x H x W
        return dict(zip("KQ", attn.unbind(1)))

    @property
    def has_orth_term(self) -> bool:
        return self.use_k and self.use_q

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_groups={self.num_groups}, reduction={self.reduction}, variant={self.variant!r}, impl={self.impl!r}"

    def uses_fused(self, x: torch.Tensor) -> bool:
        """Whether forward(x) computes the fused op's maths: eagerly with the op, while a graph is
        captured for deployment (eval mode) with the standard operators of its torch backend."""
        if self.impl == "reference" or self.variant not in FUSED_VARIANTS:
            return False
        if self.impl == "fused":
            return True
        return (x.is_cuda and triton_available()) or (
            x.device.type == "cpu" and _FUSED_FASTER_ON_CPU
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(
                f"ACM built for {self.channels} channels got an input with {x.shape[1]}"
            )
        # TorchScript compiles only this branch: the fused op is no deployment format, and an autocast
        # region needs a device type known at compile time. Whether Triton is installed is no question a
        # scripted model can ask, so in eval mode it computes the fused maths whenever the impl allows it.
        if torch.jit.is_scripting():
            if not self.training and self.impl != "reference":
                return self._forward_for_export(x)
            return self._forward_reference(x)
        if self.uses_fused(x):
            if not _capturing_graph():
                return self._forward_fused(x)
            if not self.training:
                return self._forward_for_export(x)
        with torch.autocast(
            device_type=x.device.type, enabled=False
        ):  # float32 whatever autocast says
            return self._forward_reference(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # The fused op computes in float32 itself (autocast does not touch it) and stores y in x's dtype.
        q, p1, p2 = self.q_logits, self.p_reduce, self.p_expand
        y, self.orth_term = acm_fused(
            x,
            self.k_logits.weight,
            self.k_logits.bias,
            q.weight if q else None,
            q.bias if q else None,
            (p1.weight, p1.bias, p2.weight, p2.bias) if self.use_p else None,
            self.num_groups,
            need_orth=self.training and self.has_orth_term,
        )
        return y

    def _forward_for_export(self, x: torch.Tensor) -> torch.Tensor:
        """The fused op's y in standard operators (no orthogonality term: eval mode only)."""
        k, q, p1, p2 = self.k_logits, self.q_logits, self.p_reduce, self.p_expand
        if k is None:  # "p_only" has no attention to fuse
            return self._forward_reference(x)
        p_params: Optional[List[torch.Tensor]] = None
        if p1 is not None and p2 is not None:
            b1, b2 = p1.bias, p2.bias
            assert (
                b1 is not None and b2 is not None
            )  # built with biases; refines the types for TorchScript
            p_params = [p1.weight, b1, p2.weight, b2]
        self.orth_term = None
        return forward_for_export(
            x, k.weight, q.weight if q is not None else None, p_params, self.num_groups
        )

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        in_dtype = x.dtype
        orth_term: Optional[torch.Tensor] = None
        x = at_least_float32(x)
        mu = x.mean(dim=(2, 3))  # B x C
        y = x
        if self.k_logits is not None:
            xg = x.reshape(B, self.num_groups, C // self.num_groups, H * W)
            # Per group, channels x positions @ positions x heads: the attention-weighted means.
            pooled = torch.matmul(xg, self._attention(x))  # B x G x C/G x heads
            pooled = pooled.permute(0, 3, 1, 2).reshape(B, -1, C)  # B x heads x C
            k = pooled[:, 0] - mu
            shift = k
            if self.q_logits is not None:
                q = pooled[:, 1] - mu
                shift = k - q
                if self.training:
                    orth_term = (k * q).sum(dim=1) / C
            y = y + shift[:, :, None, None]
        if self.p_reduce is not None and self.p_expand is not None:
            p = _conv1x1(
                mu[:, :, None, None], self.p_reduce.weight, self.p_reduce.bias, self.num_groups
            )
            p = _conv1x1(F.relu(p), self.p_expand.weight, self.p_expand.bias, self.num_groups)
            y = y * torch.sigmoid(p)
        self.orth_term = orth_term
        return y.to(in_dtype)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over the H*W positions of each head's logits, per group: B x G x H*W x heads (K, then Q).
        x: float32 or float64."""
        logits: List[torch.Tensor] = []
        if self.k_logits is not None:
            logits.append(_conv1x1(x, self.k_logits.weight, self.k_logits.bias, self.num_groups))
        if self.q_logits is not None:
            logits.append(_conv1x1(x, self.q_logits.weight, self.q_logits.bias, self.num_groups))
        return (
            torch.stack(logits, dim=-1).flatten(2, 3).softmax(dim=2)
        )  # B x G x H x W x heads -> B x G x HW x heads


def _conv1x1(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int
) -> torch.Tensor:
    """A grouped 1x1 conv computed in x's dtype (float32 or float64) whatever the parameters' dtype."""
    if bias is not None:
        bias = bias.to(x.dtype)
    return F.conv2d(x, weight.to(x.dtype), bias, groups=groups)
