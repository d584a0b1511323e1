"""Criss-cross attention (CC).

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", Zilong Huang, Xinggang Wang, Lichao
Huang, Chang Huang, Yunchao Wei, Wenyu Liu, ICCV 2019 (https://arxiv.org/abs/1811.11721).

For each position u = (h, w), with Q, K = 1x1 convs C -> C / 8 and V = 1x1 conv C -> C:

    Omega_u = the H + W - 1 positions in row h and column w (u itself once)
    A_u     = softmax over p in Omega_u of Q_u . K_p                  (no 1/sqrt(d) scale, as the paper)
    Y_u     = gamma * sum_p A_up V_p + X_u                            gamma a scalar, initialised to 0

and the block applies this R times with the same weights (recurrent criss-cross attention, paper:
R = 2), which lets every position reach every other. The energies of the column are computed for all
H rows and those of the row for all W columns; u appears in both, so its column entry is masked
(set to -inf before the joint softmax), as in the authors' code.

What differs from the paper: this is the attention only, without the 3x3 convs, BatchNorm and
concatenation of CCNet's segmentation head around it (as the ACM paper uses it inside ResNet
blocks); it is written with einsum, with no custom CUDA op, so it runs on CPU and GPU alike. The
convs keep PyTorch's default initialisation (the authors' code does not set one) and gamma = 0 makes
the block an identity at the start of training.

The energies, the softmax and the weighted sums run in float32 whatever the input dtype (autocast
included); the 1x1 convs follow autocast. The parameters are expected in float32, as autocast keeps them.
"""

import torch
from torch import nn

from ._checks import check_input_channels, reduced_width
from ._precision import at_least_float32

__all__ = ["CrissCrossAttention", "criss_cross_weights"]


def criss_cross_weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention of every position over its column and row, B x H x W x (H + W).

    query, key: B x d x H x W. Entry [b, h, w, i] for i < H weights position (i, w) of the column; for
    i = H + j it weights position (h, j) of the row. The column entry i = h (the position itself,
    already in the row part) is exactly 0, so each position spreads weight 1 over H + W - 1 positions.
    """
    H = query.shape[2]
    column_energy = torch.einsum("bdhw,bdiw->bhwi", query, key)  # B x H x W x H
    row_energy = torch.einsum("bdhw,bdhj->bhwj", query, key)  # B x H x W x W
    self_in_column = torch.eye(H, dtype=torch.bool, device=query.device).view(1, H, 1, H)
    column_energy = column_energy.masked_fill(self_in_column, float("-inf"))
    return torch.cat([column_energy, row_energy], dim=-1).softmax(dim=-1)


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention for a C-channel map; returns a tensor of the input's shape and dtype.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: Q and K have C // reduction channels (paper: 8).
        recurrence: R, how many times the attention is applied with shared weights (paper: 2).
    """

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2):
        super().__init__()
        query_width = reduced_width(
            "CrissCrossAttention", channels, reduction, "the width of Q and K"
        )
        if recurrence < 1:
            raise ValueError(
                f"CrissCrossAttention needs recurrence >= 1 (paper: 2), got {recurrence}"
            )
        self.channels, self.reduction, self.recurrence = channels, reduction, recurrence
        self.query = nn.Conv2d(channels, query_width, 1)
        self.key = nn.Conv2d(channels, query_width, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self):
        """PyTorch's default conv initialisation (as the authors' code) and gamma = 0 (identity at start)."""
        for conv in (self.query, self.key, self.value):
            conv.reset_parameters()
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, recurrence={self.recurrence}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("CrissCrossAttention", self.channels, x)
        for _ in range(self.recurrence):
            x = self._attend(x)
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.query(x), self.key(x), self.value(x)
        # TorchScript needs an autocast region's device type at compile time: a scripted block runs as it is.
        if torch.jit.is_scripting():
            attended = self._aggregate(query, key, value)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                attended = self._aggregate(query, key, value)
        return x + attended.to(x.dtype)

    def _aggregate(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """gamma * the criss-cross weighted sum of value, in float32 (float64 for float64 inputs)."""
        H = query.shape[2]
        weights = criss_cross_weights(at_least_float32(query), at_least_float32(key))
        value = at_least_float32(value)
        from_column = torch.einsum("bhwi,bciw->bchw", weights[..., :H], value)
        from_row = torch.einsum("bhwj,bchj->bchw", weights[..., H:], value)
        return self.gamma * (from_column + from_row)
