"""Config checks that need the model code: which context module names exist, which backbones build
context modules, which meta-architectures add the orthogonal loss. They run wherever a model is built
(the ACM backbones and meta-architectures call `check_model_config`), so `build_model(cfg)` in a
user's own code gets them as tools/train_net.py does.
"""

import logging

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    GeneralizedRCNN,
    PanopticFPN,
    RetinaNet,
    SemanticSegmentor,
)

from ..config import PEER_MODULES, add_acm_config, validate_acm_config
from .context import CONTEXT_BACKBONES, CONTEXT_MODULE_REGISTRY

__all__ = [
    "check_model_config",
    "check_context_module_name",
    "check_context_keys",
    "check_num_classes",
]


def check_model_config(cfg, whole_model: bool = True) -> None:
    """Every check of the context-module keys: their values (acm_d2.config.validate_acm_config), the
    module's name, and keys the chosen model would ignore. A backbone builder passes whole_model=False:
    a backbone may be built on its own (features, or with acm_d2.modeling.meta_arch.OrthogonalLoss added
    by hand), so an orthogonal loss that MODEL.META_ARCHITECTURE would drop is a warning there, and an
    error where the whole model is built (the ACM meta-architectures, tools/train_net.py's Trainer)."""
    validate_acm_config(cfg)
    check_context_module_name(cfg.MODEL.CONTEXT_MODULE)
    check_context_keys(cfg, dropped_orth_loss_is_error=whole_model)


def check_context_module_name(name: str) -> None:
    registered = sorted(n for n, _ in CONTEXT_MODULE_REGISTRY)
    if name not in registered:
        raise ValueError(f"cfg.MODEL.CONTEXT_MODULE = {name!r} is invalid; allowed: {registered}")


def _non_default_keys(cfg, nodes):
    """The keys in `nodes` whose values differ from add_acm_config's: a node name stands for every key
    of cfg.MODEL.<node>, a top-level key (CONTEXT_MODULE, CONTEXT_RECOMPUTE) for itself."""
    default = get_cfg()
    add_acm_config(default)

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    keys = []
    for n in nodes:
        if isinstance(cfg.MODEL[n], type(cfg.MODEL)):
            keys += [
                f"MODEL.{n}.{k}"
                for k in cfg.MODEL[n]
                if norm(cfg.MODEL[n][k]) != norm(default.MODEL[n][k])
            ]
        elif norm(cfg.MODEL[n]) != norm(default.MODEL[n]):
            keys.append(f"MODEL.{n}")
    return keys


def check_context_keys(cfg, dropped_orth_loss_is_error: bool = True) -> None:
    """Refuse context-module keys that the chosen model would silently ignore.

    Errors (ValueError naming the keys), because the run would not be the one the config describes:
      * MODEL.CONTEXT_MODULE, MODEL.CONTEXT_RECOMPUTE, MODEL.ACM.* or a peer's keys changed while MODEL.BACKBONE.NAME is a backbone
        without context modules (e.g. Detectron2's build_resnet_fpn_backbone): nothing reads them.
      * ACMs in the backbone with MODEL.ACM.ORTH_LOSS_WEIGHT > 0 under a meta-architecture that does not
        add `loss_acm_orth` (e.g. plain GeneralizedRCNN): the orthogonal loss would vanish. A plain
        meta-architecture with ORTH_LOSS_WEIGHT 0 is a legitimate "ACM without the loss" run (Table 2c).
    Warnings, because ablation configs inherit them on purpose and the run is still what the active keys say:
      * keys of another context module's node than MODEL.CONTEXT_MODULE (e.g. MODEL.ACM.* while SE is used);
      * an ACM meta-architecture whose backbone has no ACM (its `loss_acm_orth` is simply absent).
    """
    log = logging.getLogger("acm_d2")
    nodes = ("ACM", *PEER_MODULES)  # read here: add_context_module may add one after import
    backbone, module = cfg.MODEL.BACKBONE.NAME, cfg.MODEL.CONTEXT_MODULE
    if backbone not in CONTEXT_BACKBONES:
        keys = _non_default_keys(cfg, ("CONTEXT_MODULE", "CONTEXT_RECOMPUTE", *nodes))
        if keys:
            raise ValueError(
                f"cfg.{', cfg.'.join(keys)} set, but MODEL.BACKBONE.NAME = {backbone!r} builds no context module, "
                f"so nothing would read them; use one of {list(CONTEXT_BACKBONES)} or remove the keys"
            )
    ignored = _non_default_keys(cfg, [n for n in nodes if n != module])
    if backbone in CONTEXT_BACKBONES and ignored:
        log.warning(f"cfg.{', cfg.'.join(ignored)} are ignored: MODEL.CONTEXT_MODULE is {module!r}")
    has_acm = backbone in CONTEXT_BACKBONES and module == "ACM" and len(cfg.MODEL.ACM.STAGES) > 0
    meta = cfg.MODEL.META_ARCHITECTURE
    # The marker that acm_d2.modeling.meta_arch sets on the classes adding the loss (no import of them:
    # they import this module).
    adds_orth_loss = meta in META_ARCH_REGISTRY and getattr(
        META_ARCH_REGISTRY.get(meta), "adds_orth_loss", False
    )
    weight = cfg.MODEL.ACM.ORTH_LOSS_WEIGHT
    if has_acm and not adds_orth_loss and weight > 0:
        message = (
            f"cfg.MODEL.ACM.ORTH_LOSS_WEIGHT = {weight}, but MODEL.META_ARCHITECTURE = {meta!r} does not add the "
            f"orthogonal loss, so it would silently vanish; use 'ACM{meta}' if it exists (see "
            "acm_d2.modeling.meta_arch), or set MODEL.ACM.ORTH_LOSS_WEIGHT 0 to train ACM without it"
        )
        if dropped_orth_loss_is_error:
            raise ValueError(message)
        log.warning(message)
    if adds_orth_loss and not has_acm and weight > 0:
        log.warning(
            f"MODEL.META_ARCHITECTURE = {meta!r} but the backbone has no ACM: there is no loss_acm_orth"
        )


def _class_count_keys(cfg):
    """(config key, its value, the metadata field it must cover) for the heads cfg's meta-architecture builds."""
    meta = cfg.MODEL.META_ARCHITECTURE
    arch = META_ARCH_REGISTRY.get(meta) if meta in META_ARCH_REGISTRY else None
    keys = []
    if arch is not None and issubclass(arch, RetinaNet):
        keys.append(
            ("MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES, "thing_classes")
        )
    if arch is not None and issubclass(arch, GeneralizedRCNN):  # PanopticFPN included
        keys.append(
            ("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "thing_classes")
        )
    if arch is not None and issubclass(arch, (PanopticFPN, SemanticSegmentor)):
        keys.append(
            ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "stuff_classes")
        )
    return keys


def check_num_classes(cfg, dataset_names) -> None:
    """Compare the heads' class counts with the categories of the (loaded) datasets' metadata.

    Fewer classes than categories is a ValueError naming the key, both numbers and the fix: the
    categories past NUM_CLASSES would silently become background (or crash the loss). More is a
    warning: the extra outputs are never trained. Datasets without the metadata field are skipped.
    """
    log = logging.getLogger("acm_d2")
    for key, num_classes, field in _class_count_keys(cfg):
        classes = {n: MetadataCatalog.get(n).get(field, None) for n in dataset_names}
        counts = {n: len(c) for n, c in classes.items() if c}
        if not counts:
            continue
        name, categories = max(counts.items(), key=lambda item: item[1])
        if num_classes < categories:
            raise ValueError(
                f"cfg.{key} = {num_classes}, but dataset {name!r} has {categories} categories ({field}); the "
                f"categories past the first {num_classes} would be trained as background. Set {key} {categories}"
            )
        if num_classes > categories:
            log.warning(
                f"cfg.{key} = {num_classes}, but dataset {name!r} has only {categories} categories "
                f"({field}): {num_classes - categories} outputs are never trained; set {key} {categories}"
            )
