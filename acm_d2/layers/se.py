"""Squeeze-and-Excitation (SE).

Paper: "Squeeze-and-Excitation Networks", Jie Hu, Li Shen, Gang Sun, CVPR 2018
(https://arxiv.org/abs/1709.01507).

    s = sigmoid(fc2(relu(fc1(mean_HW(X)))))      fc1: C -> C // r, fc2: C // r -> C, with bias
    Y = s * X

The two fully connected layers are 1x1 convs on the pooled B x C x 1 x 1 map (the same function).
What differs from the paper: the hidden width is C // r rounded down (the paper only uses widths that
r divides), and the convs take the same initialisation as ACM (kaiming normal, fan_out, zero bias),
so that the one-key comparison with ACM starts from the same kind of weights; the paper's Caffe code
used MSRA initialisation as well.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import check_input_channels, reduced_width

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """SE for a C-channel feature map; returns a tensor of the input's shape and dtype.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: r, the hidden width is C // r (paper: 16). Must leave at least one hidden channel.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = reduced_width("SqueezeExcite", channels, reduction, "the hidden width")
        self.channels, self.reduction = channels, reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.reset_parameters()

    def reset_parameters(self):
        """Kaiming normal (fan_out, relu) weights and zero biases, as ACM's convs."""
        for conv in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("SqueezeExcite", self.channels, x)
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed))))
        return x * scale
