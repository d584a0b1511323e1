"""Device choice shared by the tools."""

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; other values unchanged."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
