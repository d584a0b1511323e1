"""Pure PyTorch context modules: nothing here imports Detectron2, and `acm_d2` imports it only when it
is installed, so `from acm_d2.layers import AttendAndCompare` works without it."""

from .acm import ACM_VARIANTS, AttendAndCompare  # noqa: F401
from .criss_cross import CrissCrossAttention, criss_cross_weights  # noqa: F401
from .global_context import GlobalContext  # noqa: F401
from .nonlocal_ import NonLocal2d  # noqa: F401
from .se import SqueezeExcite  # noqa: F401
