"""The config keys of acm_d2, in one place: `add_acm_config(cfg)` adds them, `validate_acm_config(cfg)`
checks the values a user merged in (it runs when a backbone or meta-architecture is built).

PEER_MODULES is the table of context modules other than ACM: each entry's name, builder and keys give
its cfg.MODEL.<name> node (add_acm_config), its checks (validate_acm_config), its
cfg.MODEL.CONTEXT_MODULE name and its registry entry (acm_d2.modeling.context)."""

import copy
from typing import Callable, Dict, NamedTuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers.acm import ACM_IMPLS, ACM_VARIANTS
from .layers.criss_cross import CrissCrossAttention
from .layers.global_context import GlobalContext
from .layers.nonlocal_ import NonLocal2d
from .layers.se import SqueezeExcite
from .utils.device import runnable_device

RESNET_STAGES = ("res2", "res3", "res4", "res5")
ORTH_LOSS_MODES = ("paper", "official")
AMP_PRECISIONS = ("float16", "bfloat16")


def _fail(key, value, allowed):
    raise ValueError(f"cfg.{key} = {value!r} is invalid; allowed: {allowed}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(key, value):
    if not _is_int(value) or value < 1:
        _fail(key, value, "a positive integer")


def _check_stages(key, stages):
    if any(s not in RESNET_STAGES for s in stages) or len(set(stages)) != len(stages):
        _fail(key, list(stages), f"distinct names among {list(RESNET_STAGES)}")


def _check_blocks(key, blocks):
    """Types only: whether an index exists depends on the depth, so the range is checked at build time."""
    if not all(_is_int(i) for i in blocks):
        _fail(
            key,
            list(blocks),
            "a list of block indices (integers, negative from the end; [] = every block)",
        )


def _check_ratio(key, ratio):
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        _fail(key, ratio, "a number in (0, 1], e.g. 0.0625 (1/16) or 0.25 (1/4)")


class ContextModule(NamedTuple):
    """A context module that MODEL.CONTEXT_MODULE = <its name in PEER_MODULES> puts into the blocks.

    build: (the cfg.MODEL.<name> node, channels) -> the nn.Module for one selected block.
    defaults: the keys of cfg.MODEL.<name> and their defaults: STAGES (the stages that get the module)
        and BLOCKS (block indices within each of those stages, negative from the end, [] = every block),
        checked for every module, plus the module's own keys.
    checks: key -> check(full key name, value), raising ValueError (see _fail) for a bad value of one
        of the module's own keys; keys without a check are taken as they are.
    """

    build: Callable
    defaults: Dict
    checks: Dict[str, Callable] = {}


PLACEMENT_KEYS = ("STAGES", "BLOCKS")

# The peer modules the paper compares with; acm_d2/layers documents each one and how it differs from its
# paper. They sit where ACM sits (after conv3 and its norm, before the residual add). A new module: its
# file in acm_d2/layers and one entry here (docs/configs.md, "Adding a context module").
PEER_MODULES: Dict[str, ContextModule] = {
    "SE": ContextModule(
        build=lambda node, channels: SqueezeExcite(channels, reduction=node.REDUCTION),
        defaults=dict(
            # The hidden width of the excitation is C / REDUCTION. Paper (Hu et al. 2018): 16.
            REDUCTION=16,
            # Paper: every block of every stage (16 modules in R-50).
            STAGES=list(RESNET_STAGES),
            BLOCKS=[],
        ),
        checks=dict(REDUCTION=_check_positive_int),
    ),
    "GC": ContextModule(
        build=lambda node, channels: GlobalContext(channels, ratio=node.RATIO),
        defaults=dict(
            # The transform's hidden width is C * RATIO. Paper (Cao et al. 2019): 1/16 (its larger
            # variant: 1/4).
            RATIO=0.0625,
            # Paper's detection setting (mmdetection's c3-c5): every block of res3-res5, 13 modules in R-50.
            STAGES=["res3", "res4", "res5"],
            BLOCKS=[],
        ),
        checks=dict(RATIO=_check_ratio),
    ),
    "NL": ContextModule(
        build=lambda node, channels: NonLocal2d(channels),
        defaults=dict(
            # Its attention is (H*W)^2 per image: in res3 of a 800 x 1333 image that is ~1 GiB in float32
            # for each block, so detection uses res4 only. Paper (Wang et al. 2018, COCO): res4, one
            # block, right before the last res4 block.
            STAGES=["res4"],
            BLOCKS=[-2],
        ),
    ),
    "CC": ContextModule(
        build=lambda node, channels: CrissCrossAttention(
            channels, reduction=node.REDUCTION, recurrence=node.RECURRENCE
        ),
        defaults=dict(
            # Paper (Huang et al. 2019, COCO): after the last conv of res4, i.e. its last block.
            STAGES=["res4"],
            BLOCKS=[-1],
            # How many times the attention runs with shared weights (R). Paper: 2.
            RECURRENCE=2,
            # Q and K have C / REDUCTION channels. Paper: 8.
            REDUCTION=8,
        ),
        checks=dict(RECURRENCE=_check_positive_int, REDUCTION=_check_positive_int),
    ),
}


def check_context_module_entry(name: str, module: ContextModule) -> None:
    """Refuse (ValueError naming it) a PEER_MODULES entry that cannot work: a name that is no config
    node name, no STAGES / BLOCKS default, or a check for a key it does not have."""
    if not (name.isidentifier() and name.isupper()) or name in ("ACM", "none"):
        raise ValueError(
            f"context module name {name!r} is invalid; allowed: an upper-case identifier other than "
            "ACM (it names the cfg.MODEL node)"
        )
    missing = [k for k in PLACEMENT_KEYS if k not in module.defaults]
    unknown = [k for k in module.checks if k not in module.defaults]
    if missing or unknown:
        raise ValueError(
            f"context module {name!r}: its defaults lack {missing} and its checks name keys it does not "
            f"have {unknown}; give defaults for STAGES, BLOCKS and every checked key"
        )


def add_acm_config(cfg):
    """Add the MODEL.CONTEXT_MODULE key, the MODEL.ACM node and the peer modules' nodes (MODEL.SE, GC, NL,
    CC), with the papers' defaults."""
    # Which context module the build_acm_* backbones put into their blocks: "ACM", or "none" for a
    # plain ResNet built by the same code.
    cfg.MODEL.CONTEXT_MODULE = "ACM"
    # Recompute each block's last conv (+ norm) and context module in the backward instead of keeping
    # the conv's output, which the context module's backward needs and a plain block does not keep:
    # about one activation of the block's output size less per block, for one more forward of that
    # conv and module. Training only.
    cfg.MODEL.CONTEXT_RECOMPUTE = False

    cfg.MODEL.ACM = CN()
    # G: attention heads of K and Q, and groups of P's convs. Paper: 32 (Table 2b: 8/32/64/128).
    cfg.MODEL.ACM.NUM_GROUPS = 32
    # P's hidden width is C / REDUCTION. Paper: 2.
    cfg.MODEL.ACM.REDUCTION = 2
    # Stages whose every block gets an ACM after conv3 and its norm (BasicBlock: after conv2).
    # Paper: all four (16 modules in R-50, 33 in R-101). The authors' COCO code: res3-res5.
    cfg.MODEL.ACM.STAGES = list(RESNET_STAGES)
    # Table 2a: "full" = P(X + (K - Q)), "no_p" = X + (K - Q), "p_only" = P X, "no_q" = P(X + K).
    cfg.MODEL.ACM.VARIANT = "full"
    # lambda of the orthogonal loss (paper eq. 6: 0.1; Table 2c: 0 / 0.01 / 0.1 / 1).
    cfg.MODEL.ACM.ORTH_LOSS_WEIGHT = 0.1
    # "paper": lambda * sum over all ACMs of |batch mean of K.Q/C|.
    # "official": the authors' COCO code, lambda * |batch mean of (sum over the res5 ACMs of K.Q/C)|.
    cfg.MODEL.ACM.ORTH_LOSS_MODE = "paper"
    # "reference" (the maths as written), "fused" (same maths, hand-derived backward that recomputes the
    # attention; Triton kernels on CUDA with Triton installed, batched matmuls otherwise), or "auto": the
    # fused op on CUDA with Triton installed and on the CPU, the reference elsewhere (e.g. CUDA without
    # Triton). docs/performance.md compares their speed.
    cfg.MODEL.ACM.IMPL = "auto"

    # The peer modules, selected by MODEL.CONTEXT_MODULE = "SE" / "GC" / "NL" / "CC" (PEER_MODULES
    # holds each node's keys, with their meaning and the papers' defaults).
    for name, module in PEER_MODULES.items():
        cfg.MODEL[name] = CN(copy.deepcopy(module.defaults))
    # A full config (not context_builder's MODEL-only one) also gets the trainer's key.
    if "SOLVER" in cfg:
        add_trainer_config(cfg)


def add_trainer_config(cfg):
    """Add acm_d2's trainer key: SOLVER.AMP.PRECISION."""
    # Detectron2's AMPTrainer takes a precision, but its config has no key for it. "float16" (with a
    # grad scaler, Detectron2's behaviour) or "bfloat16". Used when SOLVER.AMP.ENABLED is True.
    cfg.SOLVER.AMP.PRECISION = "float16"


def amp_precision(cfg):
    """The torch dtype of cfg.SOLVER.AMP.PRECISION (ValueError naming the key if it is not one of them)."""
    if cfg.SOLVER.AMP.PRECISION not in AMP_PRECISIONS:
        _fail("SOLVER.AMP.PRECISION", cfg.SOLVER.AMP.PRECISION, list(AMP_PRECISIONS))
    return getattr(torch, cfg.SOLVER.AMP.PRECISION)


def validate_acm_config(cfg):
    """Raise ValueError naming the key, the bad value and the allowed values."""
    if "ACM" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.ACM is missing: call acm_d2.add_acm_config(cfg) before merging a config file"
        )
    if not isinstance(cfg.MODEL.CONTEXT_RECOMPUTE, bool):
        _fail("MODEL.CONTEXT_RECOMPUTE", cfg.MODEL.CONTEXT_RECOMPUTE, "True or False")
    acm = cfg.MODEL.ACM
    if not isinstance(acm.NUM_GROUPS, int) or acm.NUM_GROUPS < 1:
        _fail(
            "MODEL.ACM.NUM_GROUPS",
            acm.NUM_GROUPS,
            "a positive integer dividing every ACM stage's channels",
        )
    _check_positive_int("MODEL.ACM.REDUCTION", acm.REDUCTION)
    _check_stages("MODEL.ACM.STAGES", acm.STAGES)
    if acm.VARIANT not in ACM_VARIANTS:
        _fail("MODEL.ACM.VARIANT", acm.VARIANT, sorted(ACM_VARIANTS))
    if not isinstance(acm.ORTH_LOSS_WEIGHT, (int, float)) or acm.ORTH_LOSS_WEIGHT < 0:
        _fail("MODEL.ACM.ORTH_LOSS_WEIGHT", acm.ORTH_LOSS_WEIGHT, "a number >= 0")
    if acm.IMPL not in ACM_IMPLS:
        _fail("MODEL.ACM.IMPL", acm.IMPL, list(ACM_IMPLS))
    if acm.ORTH_LOSS_MODE not in ORTH_LOSS_MODES:
        _fail("MODEL.ACM.ORTH_LOSS_MODE", acm.ORTH_LOSS_MODE, list(ORTH_LOSS_MODES))
    if (
        acm.ORTH_LOSS_MODE == "official"
        and "res5" not in acm.STAGES
        and cfg.MODEL.CONTEXT_MODULE == "ACM"
    ):
        _fail(
            "MODEL.ACM.ORTH_LOSS_MODE",
            "official",
            "'paper', or add res5 to MODEL.ACM.STAGES ('official' sums the res5 ACMs only)",
        )
    for name, module in PEER_MODULES.items():
        node = cfg.MODEL[name]
        _check_stages(f"MODEL.{name}.STAGES", node.STAGES)
        _check_blocks(f"MODEL.{name}.BLOCKS", node.BLOCKS)
        for key, check in module.checks.items():
            check(f"MODEL.{name}.{key}", node[key])


def load_config(config_file: str, opts=()):
    """The one way every tool and the trainer build a yacs config: Detectron2's defaults, acm_d2's keys,
    the file, then the `KEY VALUE` overrides, with MODEL.DEVICE made runnable (a CUDA device on a machine
    without CUDA falls back to the CPU, with a warning: utils.device.runnable_device). Not frozen."""
    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = runnable_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    return cfg
