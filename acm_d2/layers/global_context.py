"""Global Context block (GC).

Paper: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", Yue Cao, Jiarui Xu,
Stephen Lin, Fangyun Wei, Han Hu, ICCVW 2019 (https://arxiv.org/abs/1904.11492).

    a       = softmax_n(w_k . X_n + b_k)                         one attention map over the H*W positions
    context = sum_n a_n X_n                                      B x C x 1 x 1
    Y       = X + conv2(relu(LayerNorm(conv1(context))))        conv1: C -> C*ratio, conv2: C*ratio -> C

This is the paper's best variant (attention pooling, "add" fusion); the "mul" fusion and average
pooling it ablates are not offered. The hidden width is int(C * ratio) as in mmcv's ContextBlock, and
the initialisation follows it too: the mask conv kaiming normal (fan_in), conv1 and the LayerNorm
PyTorch's defaults, conv2 zero (weight and bias), so the block is an identity at the start of training.

The pooling and the transform run in float32 whatever the input dtype (autocast included): the
softmax over H*W positions and the H*W-long weighted sum lose too much precision in fp16, and the
transform works on B x C x 1 x 1 only, so float32 costs nothing noticeable. The parameters are
expected in float32, as autocast keeps them.
"""

import torch
from torch import nn

from ._checks import check_input_channels
from ._precision import at_least_float32

__all__ = ["GlobalContext"]


class GlobalContext(nn.Module):
    """GC for a C-channel feature map; returns a tensor of the input's shape and dtype.

    Args:
        channels: C, the number of input (and output) channels.
        ratio: the transform's hidden width is int(C * ratio) (paper: 1/16; 1/4 is its larger
            variant). Must be in (0, 1] and leave at least one hidden channel.
    """

    def __init__(self, channels: int, ratio: float = 1.0 / 16):
        super().__init__()
        if channels < 1:
            raise ValueError(f"GlobalContext needs channels >= 1, got {channels}")
        if not 0 < ratio <= 1 or int(channels * ratio) < 1:
            raise ValueError(
                f"GlobalContext needs 0 < ratio <= 1 with int(channels * ratio) >= 1 hidden channels, "
                f"got ratio={ratio} for channels={channels}"
            )
        self.channels, self.ratio = channels, ratio
        hidden = int(channels * ratio)
        self.attention_logits = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.reset_parameters()

    def reset_parameters(self):
        """mmcv's ContextBlock initialisation; the zero last conv makes the block an identity at start."""
        nn.init.kaiming_normal_(self.attention_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.attention_logits.bias)
        self.transform[0].reset_parameters()
        self.transform[1].reset_parameters()
        nn.init.zeros_(self.transform[3].weight)
        nn.init.zeros_(self.transform[3].bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ratio={self.ratio}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("GlobalContext", self.channels, x)
        # TorchScript needs an autocast region's device type at compile time: a scripted block runs as it is.
        if torch.jit.is_scripting():
            return x + self._context(at_least_float32(x)).to(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            added = self._context(at_least_float32(x))
        return x + added.to(x.dtype)

    def _context(self, features: torch.Tensor) -> torch.Tensor:
        """The transformed attention-pooled context of features (float32 or float64): B x C x 1 x 1."""
        B, C, H, W = features.shape
        logits = self.attention_logits(features).view(B, H * W)
        attention = logits.softmax(dim=1)
        context = torch.bmm(features.view(B, C, H * W), attention[:, :, None])  # B x C x 1
        return self.transform(context.view(B, C, 1, 1))
