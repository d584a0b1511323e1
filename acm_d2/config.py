"""The config keys of acm_d2, in one place: `add_acm_config(cfg)` adds them, `validate_acm_config(cfg)`
checks the values a user merged in (it runs when a backbone or meta-architecture is built)."""
from detectron2.config import CfgNode as CN

from .layers.acm import ACM_IMPLS, ACM_VARIANTS

RESNET_STAGES = ("res2", "res3", "res4", "res5")
ORTH_LOSS_MODES = ("paper", "official")


def add_acm_config(cfg):
    """Add the MODEL.CONTEXT_MODULE key and the MODEL.ACM node, with the paper's defaults."""
    # Which context module the build_acm_* backbones put into their blocks: "ACM", or "none" for a
    # plain ResNet built by the same code.
    cfg.MODEL.CONTEXT_MODULE = "ACM"

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
    # "reference", "fused" (same maths, recompute backward, Triton on CUDA), or "auto" (fused where faster).
    cfg.MODEL.ACM.IMPL = "auto"


def _fail(key, value, allowed):
    raise ValueError(f"cfg.{key} = {value!r} is invalid; allowed: {allowed}")


def validate_acm_config(cfg):
    """Raise ValueError naming the key, the bad value and the allowed values."""
    if "ACM" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.ACM is missing: call acm_d2.add_acm_config(cfg) before merging a config file")
    acm = cfg.MODEL.ACM
    if not isinstance(acm.NUM_GROUPS, int) or acm.NUM_GROUPS < 1:
        _fail("MODEL.ACM.NUM_GROUPS", acm.NUM_GROUPS, "a positive integer dividing every ACM stage's channels")
    if not isinstance(acm.REDUCTION, int) or acm.REDUCTION < 1:
        _fail("MODEL.ACM.REDUCTION", acm.REDUCTION, "a positive integer")
    bad_stages = [s for s in acm.STAGES if s not in RESNET_STAGES]
    if bad_stages or len(set(acm.STAGES)) != len(acm.STAGES):
        _fail("MODEL.ACM.STAGES", list(acm.STAGES), f"distinct names among {list(RESNET_STAGES)}")
    if acm.VARIANT not in ACM_VARIANTS:
        _fail("MODEL.ACM.VARIANT", acm.VARIANT, sorted(ACM_VARIANTS))
    if not isinstance(acm.ORTH_LOSS_WEIGHT, (int, float)) or acm.ORTH_LOSS_WEIGHT < 0:
        _fail("MODEL.ACM.ORTH_LOSS_WEIGHT", acm.ORTH_LOSS_WEIGHT, "a number >= 0")
    if acm.IMPL not in ACM_IMPLS:
        _fail("MODEL.ACM.IMPL", acm.IMPL, list(ACM_IMPLS))
    if acm.ORTH_LOSS_MODE not in ORTH_LOSS_MODES:
        _fail("MODEL.ACM.ORTH_LOSS_MODE", acm.ORTH_LOSS_MODE, list(ORTH_LOSS_MODES))
    if acm.ORTH_LOSS_MODE == "official" and "res5" not in acm.STAGES and cfg.MODEL.CONTEXT_MODULE == "ACM":
        _fail("MODEL.ACM.ORTH_LOSS_MODE", "official", "'paper', or add res5 to MODEL.ACM.STAGES ('official' sums the res5 ACMs only)")
    from .modeling.context import CONTEXT_MODULE_REGISTRY

    names = ["none"] + sorted(CONTEXT_MODULE_REGISTRY._obj_map)
    if cfg.MODEL.CONTEXT_MODULE not in names:
        _fail("MODEL.CONTEXT_MODULE", cfg.MODEL.CONTEXT_MODULE, names)
