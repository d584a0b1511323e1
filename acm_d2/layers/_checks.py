"""Argument checks shared by the peer layers, so that their errors read the same."""

import torch


def reduced_width(layer: str, channels: int, reduction: int, width: str) -> int:
    """channels // reduction, after checking that both make sense; `width` names what it is for the error."""
    if channels < 1:
        raise ValueError(f"{layer} needs channels >= 1, got {channels}")
    if reduction < 1 or channels // reduction < 1:
        raise ValueError(
            f"{layer} needs 1 <= reduction <= channels ({channels}) so that {width} (channels // reduction) "
            f"is at least 1, got reduction={reduction}"
        )
    return channels // reduction


def check_input_channels(layer: str, expected: int, x: torch.Tensor):
    if x.shape[1] != expected:
        raise ValueError(f"{layer} built for {expected} channels got an input with {x.shape[1]}")
