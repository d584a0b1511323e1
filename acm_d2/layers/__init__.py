"""Pure PyTorch context modules (no Detectron2 import)."""
from .acm import ACM_VARIANTS, AttendAndCompare  # noqa: F401
from .criss_cross import CrissCrossAttention, criss_cross_weights  # noqa: F401
from .gc import GlobalContext  # noqa: F401
from .nonlocal_ import NonLocal2d  # noqa: F401
from .se import SqueezeExcite  # noqa: F401
