"""Pure PyTorch context modules (no Detectron2 import)."""
from .acm import ACM_VARIANTS, AttendAndCompare  # noqa: F401
