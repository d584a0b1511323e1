"""Precision helper shared by the layers whose softmax must not run in half precision."""

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32, or unchanged when it is already float32 or float64 (float64 tests keep their precision)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
