"""ResNet / ResNeXt backbones with a context module (ACM by default) at the end of each block.

Everything but the context modules keeps Detectron2's structure and parameter names, so Detectron2's
ImageNet and COCO checkpoints load with only the context modules' parameters missing.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch.nn import functional as F

from ..config import RESNET_STAGES, validate_acm_config
from .context import build_context_module

__all__ = [
    "ContextBasicBlock",
    "ContextBottleneckBlock",
    "build_acm_resnet_backbone",
    "build_acm_resnet_fpn_backbone",
    "build_acm_retinanet_resnet_fpn_backbone",
]

NUM_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class _ContextMixin:
    """The context module runs on the residual branch, before the add and the final ReLU (the SE
    position). It stays trainable when Detectron2 freezes its block (FREEZE_AT)."""

    def _attach(self, context):
        self.context = context

    def _merge(self, x, out):
        if self.context is not None:
            out = self.context(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)

    def freeze(self):
        super().freeze()
        if self.context is not None:
            self.context.requires_grad_(True)
        return self


class ContextBottleneckBlock(_ContextMixin, BottleneckBlock):
    """Detectron2's BottleneckBlock (ResNet-50+ and ResNeXt) with `context` after conv3."""

    def __init__(self, in_channels, out_channels, *, context=None, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._attach(context)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self._merge(x, self.conv3(out))


class ContextBasicBlock(_ContextMixin, BasicBlock):
    """Detectron2's BasicBlock (ResNet-18/34) with `context` after conv2."""

    def __init__(self, in_channels, out_channels, *, context=None, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._attach(context)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        return self._merge(x, self.conv2(out))


@BACKBONE_REGISTRY.register()
def build_acm_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's build_resnet_backbone with a context module per block (cfg.MODEL.CONTEXT_MODULE).

    Takes every MODEL.RESNETS option but deformable convs: depth, ResNeXt (NUM_GROUPS,
    WIDTH_PER_GROUP), STRIDE_IN_1X1, NORM, RES2_OUT_CHANNELS, RES5_DILATION, OUT_FEATURES, and FREEZE_AT.
    """
    validate_acm_config(cfg)
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(f"cfg.MODEL.RESNETS.DEPTH = {depth} is invalid; allowed: {sorted(NUM_BLOCKS_PER_STAGE)}")
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable blocks are not supported by the ACM backbones")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"cfg.MODEL.RESNETS.RES5_DILATION = {r.RES5_DILATION} is invalid; allowed: 1, 2")
    basic = depth in (18, 34)
    if basic and (r.RES2_OUT_CHANNELS != 64 or r.NUM_GROUPS != 1 or r.RES5_DILATION != 1):
        raise ValueError(
            "R-18/34 need cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64, NUM_GROUPS = 1 and RES5_DILATION = 1"
        )

    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, (stage, num_blocks) in enumerate(zip(RESNET_STAGES, NUM_BLOCKS_PER_STAGE[depth])):
        dilation = r.RES5_DILATION if stage == "res5" else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=r.NORM,
            context_per_block=[
                build_context_module(cfg, stage, i, num_blocks, out_channels) for i in range(num_blocks)
            ],
        )
        if basic:
            kwargs["block_class"] = ContextBasicBlock
        else:
            kwargs.update(
                block_class=ContextBottleneckBlock,
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation,
                num_groups=r.NUM_GROUPS,
            )
        stages.append(ResNet.make_stage(**kwargs))
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _fpn(cfg, bottom_up, top_block):
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_acm_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The ACM ResNet under an FPN with a max-pooled P6, as Detectron2's build_resnet_fpn_backbone."""
    return _fpn(cfg, build_acm_resnet_backbone(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_acm_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The ACM ResNet under an FPN with P6-P7 from res5, as Detectron2's RetinaNet builder."""
    bottom_up = build_acm_resnet_backbone(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return _fpn(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
