"""Context modules that the acm_d2 backbones can put into ResNet blocks, chosen by
cfg.MODEL.CONTEXT_MODULE. A new module needs one file in acm_d2/layers and one entry here."""
from detectron2.utils.registry import Registry

from ..layers.acm import AttendAndCompare
from ..layers.criss_cross import CrissCrossAttention
from ..layers.gc import GlobalContext
from ..layers.nonlocal_ import NonLocal2d
from ..layers.se import SqueezeExcite

CONTEXT_MODULE_REGISTRY = Registry("CONTEXT_MODULE")
CONTEXT_MODULE_REGISTRY.__doc__ = """
Each entry is registered under the value of cfg.MODEL.CONTEXT_MODULE that selects it and is called as
`entry(cfg, stage, block_index, num_blocks, channels)`; it returns the nn.Module to run after the last
conv of that block (and its norm), or None to leave the block plain. `stage` is "res2".."res5".
"""


def is_block_selected(key, stages, blocks, stage, block_index, num_blocks):
    """Whether block `block_index` of `stage` (which has `num_blocks` blocks) gets the module of cfg node `key`.

    stages: the node's STAGES. blocks: its BLOCKS, indices within each selected stage, negative counting
    from the end; empty selects every block. An index that the stage does not have is a ValueError
    naming cfg.<key>.BLOCKS, since the range depends on the depth and is only known here.
    """
    if stage not in stages:
        return False
    if not blocks:
        return True
    if any(not -num_blocks <= i < num_blocks for i in blocks):
        raise ValueError(
            f"cfg.{key}.BLOCKS = {list(blocks)} is invalid for {stage}, which has {num_blocks} blocks; "
            f"allowed: indices from {-num_blocks} to {num_blocks - 1}"
        )
    return block_index in {i % num_blocks for i in blocks}


# Entries are named after the cfg.MODEL.CONTEXT_MODULE value that selects them.
@CONTEXT_MODULE_REGISTRY.register()
def ACM(cfg, stage, block_index, num_blocks, channels):
    """ACM in every block of cfg.MODEL.ACM.STAGES (ACM has no BLOCKS key)."""
    acm = cfg.MODEL.ACM
    if not is_block_selected("MODEL.ACM", acm.STAGES, [], stage, block_index, num_blocks):
        return None
    return AttendAndCompare(channels, num_groups=acm.NUM_GROUPS, reduction=acm.REDUCTION, variant=acm.VARIANT)


@CONTEXT_MODULE_REGISTRY.register()
def SE(cfg, stage, block_index, num_blocks, channels):
    """Squeeze-and-excitation in the blocks chosen by cfg.MODEL.SE.STAGES and BLOCKS."""
    se = cfg.MODEL.SE
    if not is_block_selected("MODEL.SE", se.STAGES, se.BLOCKS, stage, block_index, num_blocks):
        return None
    return SqueezeExcite(channels, reduction=se.REDUCTION)


@CONTEXT_MODULE_REGISTRY.register()
def GC(cfg, stage, block_index, num_blocks, channels):
    """Global context block in the blocks chosen by cfg.MODEL.GC.STAGES and BLOCKS."""
    gc = cfg.MODEL.GC
    if not is_block_selected("MODEL.GC", gc.STAGES, gc.BLOCKS, stage, block_index, num_blocks):
        return None
    return GlobalContext(channels, ratio=gc.RATIO)


@CONTEXT_MODULE_REGISTRY.register()
def NL(cfg, stage, block_index, num_blocks, channels):
    """Non-local block (embedded Gaussian) in the blocks chosen by cfg.MODEL.NL.STAGES and BLOCKS."""
    nl = cfg.MODEL.NL
    if not is_block_selected("MODEL.NL", nl.STAGES, nl.BLOCKS, stage, block_index, num_blocks):
        return None
    return NonLocal2d(channels)


@CONTEXT_MODULE_REGISTRY.register()
def CC(cfg, stage, block_index, num_blocks, channels):
    """Recurrent criss-cross attention in the blocks chosen by cfg.MODEL.CC.STAGES and BLOCKS."""
    cc = cfg.MODEL.CC
    if not is_block_selected("MODEL.CC", cc.STAGES, cc.BLOCKS, stage, block_index, num_blocks):
        return None
    return CrissCrossAttention(channels, reduction=cc.REDUCTION, recurrence=cc.RECURRENCE)


def build_context_module(cfg, stage, block_index, num_blocks, channels):
    """The context module for one block, or None (also for cfg.MODEL.CONTEXT_MODULE == "none")."""
    name = cfg.MODEL.CONTEXT_MODULE
    if name == "none":
        return None
    try:
        return CONTEXT_MODULE_REGISTRY.get(name)(cfg, stage, block_index, num_blocks, channels)
    except ValueError as error:
        # The layers know the channels but not the config keys: say which block and node to look at.
        raise ValueError(
            f"cannot build context module {name!r} for {stage} block {block_index} ({channels} channels) "
            f"from cfg.MODEL.{name}: {error}"
        ) from error
