"""ResNet / ResNeXt backbones with a context module (ACM by default) at the end of each block.

Everything but the context modules keeps Detectron2's structure and parameter names, so Detectron2's
ImageNet and COCO checkpoints load with only the context modules' parameters missing.
"""

import functools

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..config import RESNET_STAGES
from .checks import check_model_config
from .context import CONTEXT_BACKBONES, build_context_module

__all__ = [
    "ContextBasicBlock",
    "ContextBottleneckBlock",
    "build_acm_resnet_backbone",
    "build_acm_resnet_fpn_backbone",
    "build_acm_retinanet_resnet_fpn_backbone",
    "make_context_stages",
    "make_context_stages_from_config",
]

NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


class _ContextMixin:
    """The context module runs on the residual branch, before the add and the final ReLU (the SE
    position). It stays trainable when Detectron2 freezes its block (FREEZE_AT).

    With `recompute`, training recomputes the last conv (and its norm) and the context module in the
    backward instead of keeping the conv's output, which the context module needs for its backward and
    a plain block does not keep: one activation of the block's output size less per block, for one more
    forward of the last conv and the context module (torch.utils.checkpoint, non-reentrant).
    """

    def _attach(self, context, recompute):
        self.context = context
        self.recompute = recompute

    def _last_conv_and_context(self, out):
        out = self._last_conv(out)
        if self.context is not None:
            out = self.context(out)
        return out

    @torch.jit.unused
    def _recomputed(self, out: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._last_conv_and_context, out, use_reentrant=False)

    def _merge(self, x, out):
        """Last conv, context module, residual add and ReLU, from the input of the last conv."""
        if (
            self.recompute
            and self.context is not None
            and self.training
            and torch.is_grad_enabled()
        ):
            out = self._recomputed(out)
        else:
            out = self._last_conv_and_context(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)

    def freeze(self):
        super().freeze()
        if self.context is not None:
            self.context.requires_grad_(True)
        return self


class ContextBottleneckBlock(_ContextMixin, BottleneckBlock):
    """Detectron2's BottleneckBlock (ResNet-50+ and ResNeXt) with `context` after conv3."""

    def __init__(self, in_channels, out_channels, *, context=None, recompute=False, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._attach(context, recompute)

    def _last_conv(self, out):
        return self.conv3(out)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self._merge(x, out)


class ContextBasicBlock(_ContextMixin, BasicBlock):
    """Detectron2's BasicBlock (ResNet-18/34) with `context` after conv2."""

    def __init__(self, in_channels, out_channels, *, context=None, recompute=False, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._attach(context, recompute)

    def _last_conv(self, out):
        return self.conv2(out)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        return self._merge(x, out)


def make_context_stages(
    depth,
    context=None,
    *,
    stages=RESNET_STAGES,
    stem_out_channels=64,
    res2_out_channels=None,
    num_groups=1,
    width_per_group=64,
    stride_in_1x1=True,
    norm="FrozenBN",
    res5_dilation=1,
    recompute=False,
):
    """The stages of a ResNet / ResNeXt with a context module per block: Detectron2's
    ResNet.make_default_stages, plus `context`, for ResNet(stem, stages) and for Python (LazyConfig) configs.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (BottleneckBlock).
        context: callable(stage, block_index, num_blocks, channels) -> nn.Module or None, the module that
            goes after the last conv (and its norm) of that block; None builds plain blocks.
            `functools.partial(build_context_module, cfg)` for a yaml config, `context_builder(...)` otherwise.
        stages: which of "res2".."res5" to build, in order (a C4 model's ROI head builds ("res5",) alone).
        stem_out_channels, res2_out_channels (default 64 for depth < 50, else 256), num_groups,
        width_per_group, stride_in_1x1, norm, res5_dilation (1 or 2): as cfg.MODEL.RESNETS.*.
        recompute: recompute the last conv and the context module in the backward instead of keeping
            the conv's output (cfg.MODEL.CONTEXT_RECOMPUTE; see _ContextMixin).

    Returns:
        one list of blocks per stage in `stages`.
    """
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"ResNet depth {depth} is invalid; allowed: {sorted(NUM_BLOCKS_PER_STAGE)}"
        )
    basic = depth < 50
    if res2_out_channels is None:
        res2_out_channels = 64 if basic else 256
    context = context or (lambda *args: None)
    built = []
    for stage in stages:
        idx = RESNET_STAGES.index(stage)
        num_blocks = NUM_BLOCKS_PER_STAGE[depth][idx]
        out_channels = res2_out_channels * 2**idx
        dilation = res5_dilation if stage == "res5" else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=stem_out_channels if idx == 0 else out_channels // 2,
            out_channels=out_channels,
            norm=norm,
            recompute=recompute,
            context_per_block=[
                context(stage, i, num_blocks, out_channels) for i in range(num_blocks)
            ],
        )
        if basic:
            kwargs["block_class"] = ContextBasicBlock
        else:
            kwargs.update(
                block_class=ContextBottleneckBlock,
                bottleneck_channels=num_groups * width_per_group * 2**idx,
                stride_in_1x1=stride_in_1x1,
                dilation=dilation,
                num_groups=num_groups,
            )
        built.append(ResNet.make_stage(**kwargs))
    return built


def _context_backbone(builder):
    """Register a backbone builder that puts context modules into its blocks."""
    BACKBONE_REGISTRY.register(builder)
    CONTEXT_BACKBONES.append(builder.__name__)
    return builder


def make_context_stages_from_config(cfg, stages):
    """make_context_stages with every argument from cfg.MODEL.RESNETS and the context module of
    cfg.MODEL.CONTEXT_MODULE; raises ValueError naming the cfg key for what the blocks cannot do."""
    check_model_config(cfg, whole_model=False)
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"cfg.MODEL.RESNETS.DEPTH = {r.DEPTH} is invalid; allowed: {sorted(NUM_BLOCKS_PER_STAGE)}"
        )
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable blocks are not supported by the ACM backbones"
        )
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(
            f"cfg.MODEL.RESNETS.RES5_DILATION = {r.RES5_DILATION} is invalid; allowed: 1, 2"
        )
    if r.DEPTH in (18, 34) and (
        r.RES2_OUT_CHANNELS != 64 or r.NUM_GROUPS != 1 or r.RES5_DILATION != 1
    ):
        raise ValueError(
            "R-18/34 need cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64, NUM_GROUPS = 1 and RES5_DILATION = 1"
        )
    return make_context_stages(
        r.DEPTH,
        functools.partial(build_context_module, cfg),
        stages=stages,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        stride_in_1x1=r.STRIDE_IN_1X1,
        norm=r.NORM,
        res5_dilation=r.RES5_DILATION,
        recompute=cfg.MODEL.CONTEXT_RECOMPUTE,
    )


@_context_backbone
def build_acm_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's build_resnet_backbone with a context module per block (cfg.MODEL.CONTEXT_MODULE).

    Takes every MODEL.RESNETS option but deformable convs: depth, ResNeXt (NUM_GROUPS,
    WIDTH_PER_GROUP), STRIDE_IN_1X1, NORM, RES2_OUT_CHANNELS, RES5_DILATION, OUT_FEATURES, and FREEZE_AT.
    As Detectron2's, it builds the stages up to the last one in OUT_FEATURES (a C4 backbone stops at
    res4; its res5 is the ROI head's, see ACMRes5ROIHeads).
    """
    r = cfg.MODEL.RESNETS
    last = max(RESNET_STAGES.index(f) for f in r.OUT_FEATURES if f in RESNET_STAGES)
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    stages = make_context_stages_from_config(cfg, RESNET_STAGES[: last + 1])
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


@_context_backbone
def build_acm_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The ACM ResNet under an FPN with a max-pooled P6, as Detectron2's build_resnet_fpn_backbone."""
    return _fpn(cfg, build_acm_resnet_backbone(cfg, input_shape), LastLevelMaxPool())


@_context_backbone
def build_acm_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The ACM ResNet under an FPN with P6-P7 from res5, as Detectron2's RetinaNet builder."""
    bottom_up = build_acm_resnet_backbone(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return _fpn(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
