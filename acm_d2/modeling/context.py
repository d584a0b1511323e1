"""Context modules that the acm_d2 backbones can put into ResNet blocks, chosen by
cfg.MODEL.CONTEXT_MODULE. A new module needs one file in acm_d2/layers and one entry in
acm_d2.config.PEER_MODULES (its registry entry here, its config node and its name all come from it);
code outside the repository calls add_context_module instead (docs/configs.md)."""

import functools

from detectron2.config import CfgNode
from detectron2.utils.registry import Registry

from ..config import PEER_MODULES, ContextModule, check_context_module_entry
from ..layers.acm import AttendAndCompare

CONTEXT_MODULE_REGISTRY = Registry("CONTEXT_MODULE")
CONTEXT_MODULE_REGISTRY.__doc__ = """
Each entry is registered under the value of cfg.MODEL.CONTEXT_MODULE that selects it and is called as
`entry(cfg, stage, block_index, num_blocks, channels)`; it returns the nn.Module to run after the last
conv of that block (and its norm), or None to leave the block plain. `stage` is "res2".."res5".
"""
# The names of the BACKBONE_REGISTRY builders that put context modules into their blocks
# (acm_d2.modeling.backbone adds its builders here as it registers them).
CONTEXT_BACKBONES = []


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
def none(cfg, stage, block_index, num_blocks, channels):
    """No context module: the backbones build a plain ResNet."""
    return None


@CONTEXT_MODULE_REGISTRY.register()
def ACM(cfg, stage, block_index, num_blocks, channels):
    """ACM in every block of cfg.MODEL.ACM.STAGES (ACM has no BLOCKS key)."""
    acm = cfg.MODEL.ACM
    if not is_block_selected("MODEL.ACM", acm.STAGES, [], stage, block_index, num_blocks):
        return None
    return AttendAndCompare(
        channels,
        num_groups=acm.NUM_GROUPS,
        reduction=acm.REDUCTION,
        variant=acm.VARIANT,
        impl=acm.IMPL,
    )


def _register_peer(name, module: ContextModule):
    """Register entry `name`: module.build(cfg.MODEL.<name>, channels) in the blocks chosen by that
    node's STAGES and BLOCKS, None elsewhere."""
    check_context_module_entry(name, module)

    def entry(cfg, stage, block_index, num_blocks, channels):
        node = cfg.MODEL[name]
        if not is_block_selected(
            f"MODEL.{name}", node.STAGES, node.BLOCKS, stage, block_index, num_blocks
        ):
            return None
        return module.build(node, channels)

    entry.__name__ = entry.__qualname__ = name
    CONTEXT_MODULE_REGISTRY.register(entry)


for _name, _module in PEER_MODULES.items():
    _register_peer(_name, _module)


def add_context_module(name: str, module: ContextModule) -> None:
    """Add a context module from outside the repository (inside it, add its entry to
    acm_d2.config.PEER_MODULES): add_acm_config then adds cfg.MODEL.<name> with module.defaults, and
    MODEL.CONTEXT_MODULE = name places module.build's modules. Call it before building configs."""
    if name in PEER_MODULES:
        raise ValueError(f"context module {name!r} exists already; choose another name")
    _register_peer(name, module)
    PEER_MODULES[name] = module


def build_context_module(cfg, stage, block_index, num_blocks, channels):
    """The context module for one block, or None (also for cfg.MODEL.CONTEXT_MODULE == "none")."""
    name = cfg.MODEL.CONTEXT_MODULE
    try:
        return CONTEXT_MODULE_REGISTRY.get(name)(cfg, stage, block_index, num_blocks, channels)
    except ValueError as error:
        # The layers know the channels but not the config keys: say which block and node to look at.
        raise ValueError(
            f"cannot build context module {name!r} for {stage} block {block_index} ({channels} channels) "
            f"from cfg.MODEL.{name}: {error}"
        ) from error


def context_builder(name="ACM", **nodes):
    """build_context_module without a yaml config, for Python (LazyConfig) configs and plain PyTorch:
    returns callable(stage, block_index, num_blocks, channels) for make_context_stages.

    `name` is what cfg.MODEL.CONTEXT_MODULE holds in a yaml config ("ACM", "none" or a name in
    acm_d2.config.PEER_MODULES: "SE", "GC", "NL", "CC"); each keyword overrides keys of the cfg.MODEL node of that name, the rest keep
    add_acm_config's defaults: context_builder("ACM", ACM=dict(NUM_GROUPS=64, STAGES=["res3", "res4", "res5"])).
    The values are validated as a yaml config's are.
    """
    from omegaconf import DictConfig, OmegaConf

    from ..config import add_acm_config, validate_acm_config

    cfg = CfgNode({"MODEL": CfgNode()})  # the node add_acm_config extends
    add_acm_config(cfg)
    cfg.MODEL.CONTEXT_MODULE = name
    for node, values in nodes.items():
        if isinstance(values, DictConfig):  # a LazyConfig passes its dicts as they are
            values = OmegaConf.to_container(values, resolve=True)
        if node not in cfg.MODEL or not isinstance(cfg.MODEL[node], CfgNode):
            raise KeyError(
                f"context_builder({node}=...): no such node; allowed: {', '.join(['ACM', *PEER_MODULES])}"
            )
        cfg.MODEL[node].merge_from_other_cfg(CfgNode(dict(values)))
    validate_acm_config(cfg)
    cfg.freeze()
    return functools.partial(build_context_module, cfg)
