"""acm_d2: the Attend-and-Compare Module (ACM, ECCV 2020) for Detectron2.

With Detectron2 installed, importing the package registers the backbones (build_acm_resnet_backbone,
build_acm_resnet_fpn_backbone, build_acm_retinanet_resnet_fpn_backbone), the context modules and the ACM
meta-architectures. Without it, the layers (`from acm_d2.layers import AttendAndCompare`) still work:
they are pure PyTorch.
"""

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError:
    _DETECTRON2_MISSING = True
else:
    _DETECTRON2_MISSING = False
    from . import modeling  # noqa: F401  (registers)
    from .config import add_acm_config, validate_acm_config  # noqa: F401


def __getattr__(name):
    if _DETECTRON2_MISSING and name in ("add_acm_config", "validate_acm_config", "modeling"):
        raise ImportError(
            f"acm_d2.{name} needs Detectron2, which is not installed (see docs/install.md); acm_d2.layers works without it"
        )
    raise AttributeError(f"module 'acm_d2' has no attribute {name!r}")
