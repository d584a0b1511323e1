"""Non-local block, embedded Gaussian form (NL).

Paper: "Non-local Neural Networks", Xiaolong Wang, Ross Girshick, Abhinav Gupta, Kaiming He, CVPR 2018
(https://arxiv.org/abs/1711.07971).

    theta, phi, g = 1x1 convs C -> C / 2                    (the paper's halved embedding width)
    A  = softmax_m(theta_n . phi_m / sqrt(C / 2))           N x M attention, N = H*W query positions
    Z  = sum_m A_nm g_m
    Y  = X + W Z                                            W: 1x1 conv C / 2 -> C, zero-initialised

What differs from the paper's equations: the logits are scaled by 1/sqrt(C/2), as in the authors'
released code (USE_SCALE) and mmcv (`use_scale`); W is a plain conv initialised to
zero instead of a conv followed by a BatchNorm whose gamma starts at zero (the same identity at
start, and no BatchNorm statistics to freeze in detection); theta, phi and g start from a normal
with std 0.01 and zero bias, as in the paper's code. `sub_sample=True` max-pools phi and g by 2 (the
paper's cheaper variant, M = N / 4); it is off by default.

Cost: the attention is N x M per image. On a 800 x 1333 COCO image res4 (stride 16) has N = 4200
(70 MB in float32) but res3 (stride 8) has N = 16800, about 1.1 GB, which is why detection puts NL
in a few res4 blocks only.

The logits, the softmax and the weighted sum run in float32 whatever the input dtype (autocast
included); the 1x1 convs follow autocast. The parameters are expected in float32, as autocast keeps them.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import check_input_channels, reduced_width
from ._precision import at_least_float32

__all__ = ["NonLocal2d"]


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block for a C-channel map; returns a tensor of the input's shape and dtype.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: the embedding width is C // reduction (paper: 2).
        sub_sample: max-pool phi and g by 2 before the attention (paper's cheaper variant; default off).
    """

    def __init__(self, channels: int, reduction: int = 2, sub_sample: bool = False):
        super().__init__()
        embed = reduced_width("NonLocal2d", channels, reduction, "the embedding width")
        self.channels, self.reduction, self.sub_sample = channels, reduction, sub_sample
        self.theta = nn.Conv2d(channels, embed, 1)
        self.phi = nn.Conv2d(channels, embed, 1)
        self.g = nn.Conv2d(channels, embed, 1)
        self.out = nn.Conv2d(embed, channels, 1)
        self.reset_parameters()

    def reset_parameters(self):
        """Embeddings normal(0, 0.01) with zero bias; the output conv zero, so the block starts as an identity."""
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, sub_sample={self.sub_sample}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("NonLocal2d", self.channels, x)
        theta, phi, g = self.theta(x), self.phi(x), self.g(x)
        if self.sub_sample:
            phi, g = F.max_pool2d(phi, 2), F.max_pool2d(g, 2)
        # TorchScript needs an autocast region's device type at compile time: a scripted block runs as it is.
        if torch.jit.is_scripting():
            z = self._attend(theta, phi, g)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                z = self._attend(theta, phi, g)
        return x + self.out(z.to(theta.dtype))

    def _attend(self, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Z for the embeddings theta (B x embed x H x W) and phi, g (B x embed x M positions), in float32 or float64."""
        B, embed, H, W = theta.shape
        queries = at_least_float32(theta).flatten(2).transpose(1, 2)  # B x N x embed
        keys = at_least_float32(phi).flatten(2)  # B x embed x M
        values = at_least_float32(g).flatten(2).transpose(1, 2)  # B x M x embed
        attention = torch.bmm(queries, keys).mul_(embed**-0.5).softmax(dim=-1)  # B x N x M
        return torch.bmm(attention, values).transpose(1, 2).reshape(B, embed, H, W)
