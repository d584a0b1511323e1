"""acm_d2: the Attend-and-Compare Module (ACM, ECCV 2020) for Detectron2.

Importing the package registers the backbones (build_acm_resnet_backbone, build_acm_resnet_fpn_backbone,
build_acm_retinanet_resnet_fpn_backbone), the context modules and the ACM meta-architectures.
"""
from . import modeling  # noqa: F401  (registers)
from .config import add_acm_config, validate_acm_config  # noqa: F401

__version__ = "0.1.0"
