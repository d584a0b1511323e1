"""Fused Attend-and-Compare Module: the forward of `acm.AttendAndCompare` with an analytic backward.

`op.py` holds the maths, the public `acm_fused`, its autograd and its `torch.library` op pair;
`torch_backend.py` computes it with batched matmuls (any device), `triton_backend.py` launches the
Triton kernels of `kernels_forward.py` / `kernels_backward.py` (CUDA); `aot.py` compiles them without
a GPU.
"""

from .op import BACKENDS, FUSED_VARIANTS, acm_fused, triton_available, triton_failures  # noqa: F401

__all__ = ["BACKENDS", "FUSED_VARIANTS", "acm_fused", "triton_available", "triton_failures"]
