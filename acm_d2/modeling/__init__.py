"""Detectron2 glue: backbones, context-module registry, C4 ROI head and meta-architectures (registered on import)."""

from .backbone import *  # noqa: F401,F403
from .checks import check_context_keys, check_model_config  # noqa: F401
from .context import (  # noqa: F401
    CONTEXT_BACKBONES,
    CONTEXT_MODULE_REGISTRY,
    add_context_module,
    build_context_module,
    context_builder,
    is_block_selected,
)
from .meta_arch import *  # noqa: F401,F403
from .roi_heads import ACMRes5ROIHeads  # noqa: F401
