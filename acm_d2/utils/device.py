"""Device choice shared by the trainer and the tools: the one CPU fallback."""

import logging

import torch

__all__ = ["resolve_device", "runnable_device"]

logger = logging.getLogger("acm_d2")


def runnable_device(device: str, key: str = "device") -> str:
    """`device`, or "cpu" (with a warning naming `key`) for a CUDA device on a machine without CUDA, so
    that the shipped configs, which ask for CUDA, run anywhere."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"CUDA is not available: running on the CPU ({key} cpu)")
        return "cpu"
    return device


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; other values as runnable_device makes them."""
    return (
        ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else runnable_device(device)
    )
