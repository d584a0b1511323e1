"""Context modules that the acm_d2 backbones can put into ResNet blocks, chosen by
cfg.MODEL.CONTEXT_MODULE. A new module needs one file in acm_d2/layers and one entry here."""
from detectron2.utils.registry import Registry

from ..layers.acm import AttendAndCompare

CONTEXT_MODULE_REGISTRY = Registry("CONTEXT_MODULE")
CONTEXT_MODULE_REGISTRY.__doc__ = """
Each entry is registered under the value of cfg.MODEL.CONTEXT_MODULE that selects it and is called as
`entry(cfg, stage, block_index, num_blocks, channels)`; it returns the nn.Module to run after the last
conv of that block (and its norm), or None to leave the block plain. `stage` is "res2".."res5".
"""


# Entries are named after the cfg.MODEL.CONTEXT_MODULE value that selects them.
@CONTEXT_MODULE_REGISTRY.register()
def ACM(cfg, stage, block_index, num_blocks, channels):
    """ACM in every block of cfg.MODEL.ACM.STAGES."""
    acm = cfg.MODEL.ACM
    if stage not in acm.STAGES:
        return None
    return AttendAndCompare(channels, num_groups=acm.NUM_GROUPS, reduction=acm.REDUCTION, variant=acm.VARIANT, impl=acm.IMPL)


def build_context_module(cfg, stage, block_index, num_blocks, channels):
    """The context module for one block, or None (also for cfg.MODEL.CONTEXT_MODULE == "none")."""
    name = cfg.MODEL.CONTEXT_MODULE
    if name == "none":
        return None
    return CONTEXT_MODULE_REGISTRY.get(name)(cfg, stage, block_index, num_blocks, channels)
