"""A C4 model's ROI head with context modules in its res5 stage.

Detectron2's C4 models (Faster / Mask R-CNN R50-C4) run res5 in the ROI head (Res5ROIHeads), on each
pooled 14 x 14 region, and build it from plain BottleneckBlocks. The paper places ACM in every
bottleneck and the authors' "official" loss sums the res5 ACMs, so a C4 model with the ACM backbone
alone would miss 3 of R-50's 16 modules. ACMRes5ROIHeads builds that res5 with the same stage builder
and context registry as the backbones (so it takes any cfg.MODEL.CONTEXT_MODULE and its STAGES /
BLOCKS: res5 is in the default MODEL.ACM.STAGES). Its parameter names are Detectron2's plus `.context.`,
so Detectron2 C4 checkpoints load with only the context modules missing.

In the head, a module's batch is the sampled regions (512 per image in training), not the images: an
ACM's orthogonality term there is per region, and the loss takes its mean over the regions.
"""

from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn

from .backbone import make_context_stages_from_config

__all__ = ["ACMRes5ROIHeads"]


@ROI_HEADS_REGISTRY.register()
class ACMRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads whose res5 blocks carry the context module of cfg.MODEL.CONTEXT_MODULE."""

    # Detectron2 has no public hook for the res5 builder: listed in acm_d2.compat.OVERRIDDEN.
    @classmethod
    def _build_res5_block(cls, cfg):
        if cfg.MODEL.RESNETS.RES5_DILATION != 1:
            raise ValueError(
                f"cfg.MODEL.RESNETS.RES5_DILATION = {cfg.MODEL.RESNETS.RES5_DILATION} is invalid with "
                "ACMRes5ROIHeads; allowed: 1 (a dilated res5 belongs to the backbone: use a DC5 config)"
            )
        (blocks,) = make_context_stages_from_config(cfg, ("res5",))
        return nn.Sequential(*blocks), blocks[-1].out_channels
