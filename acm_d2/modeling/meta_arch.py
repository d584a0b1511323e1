"""Meta-architectures that add ACM's orthogonal loss, `loss_acm_orth`, to a Detectron2 model's losses.

One mixin serves every Detectron2 meta-architecture: `ACM<Name>` is `<Name>` plus the loss
(ACMGeneralizedRCNN for Mask/Faster/Cascade R-CNN, FPN or C4, ACMRetinaNet, ACMPanopticFPN, ...). Inference is
the base class's, unchanged; torch.jit.script compiles the base class (see __prepare_scriptable__).
"""

import copy
import re
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    GeneralizedRCNN,
    PanopticFPN,
    RetinaNet,
    SemanticSegmentor,
)
from detectron2.modeling.meta_arch import FCOS
from torch import nn

from ..layers.acm import AttendAndCompare
from .checks import check_model_config

__all__ = [
    "OrthogonalLoss",
    "ACMGeneralizedRCNN",
    "ACMRetinaNet",
    "ACMFCOS",
    "ACMPanopticFPN",
    "ACMSemanticSegmentor",
]

_LAST_STAGE = re.compile(r"(^|\.)res5\.")


class OrthogonalLoss:
    """lambda * the ACMs' orthogonality terms d = K.Q / C (each ACM stores d per sample in training).

    mode "paper" (eq. 5-6): lambda * sum over ACMs m of |mean over the batch of d_m|.
    mode "official" (the authors' COCO code): lambda * |mean over the batch of sum over the res5 ACMs of d_m|.

    `model` is any nn.Module holding ACMs: a meta-architecture, or a backbone used from plain PyTorch:

        orth = OrthogonalLoss(backbone, weight=0.1, mode="paper")
        features = backbone(images)                 # in training mode: each ACM stores its term
        loss = task_loss(features) + orth().get("loss_acm_orth", 0)

    Calling it returns {"loss_acm_orth": loss} ({} when the model has no ACM with K and Q) and
    releases the stored terms, so call it once per forward.
    """

    def __init__(self, model: nn.Module, weight: float, mode: str):
        self.weight, self.mode = weight, mode
        named = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, AttendAndCompare) and m.has_orth_term
        ]
        if mode == "official":
            in_res5 = [(n, m) for n, m in named if _LAST_STAGE.search(n)]
            if named and not in_res5:
                raise ValueError(
                    "ORTH_LOSS_MODE 'official' sums the res5 ACMs, and this model has ACMs but none in res5 "
                    "(a C4 model needs ROI_HEADS.NAME 'ACMRes5ROIHeads'); use 'paper' or put ACMs in res5"
                )
            named = in_res5
        # A plain list: the modules are the model's own, not extra submodules.
        self.modules: List[Tuple[str, AttendAndCompare]] = named

    def __call__(self) -> Dict[str, torch.Tensor]:
        terms = []
        for name, module in self.modules:
            if module.orth_term is None:
                raise RuntimeError(
                    f"ACM {name} has no orthogonality term: was the model run in training mode?"
                )
            terms.append(module.orth_term)
            module.orth_term = None  # release the graph it holds
        if not terms:
            return {}
        if self.mode == "paper":
            # Per module: in a C4 model the res5 ACMs (in the ROI head) see regions, not images.
            loss = torch.stack([d.mean() for d in terms]).abs().sum()
        else:
            if len({d.shape for d in terms}) > 1:
                raise RuntimeError(
                    f"ORTH_LOSS_MODE 'official' sums the res5 ACMs per sample, but they saw different batch "
                    f"sizes {[tuple(d.shape) for d in terms]}; use ORTH_LOSS_MODE 'paper'"
                )
            loss = torch.stack(terms).sum(dim=0).mean().abs()  # modules x batch -> batch -> scalar
        return {"loss_acm_orth": self.weight * loss}


class _OrthLossMixin:
    adds_orth_loss = True  # read by acm_d2.modeling.checks.check_context_keys

    @configurable
    def __init__(self, *, orth_loss_weight: float, orth_loss_mode: str, **kwargs):
        """
        Args:
            orth_loss_weight, orth_loss_mode: see OrthogonalLoss.
            kwargs: the base meta-architecture's arguments.
        """
        super().__init__(**kwargs)
        self.orth_loss = OrthogonalLoss(self, orth_loss_weight, orth_loss_mode)

    @classmethod
    def from_config(cls, cfg):
        check_model_config(cfg)
        ret = super().from_config(cfg)
        ret.update(
            orth_loss_weight=cfg.MODEL.ACM.ORTH_LOSS_WEIGHT,
            orth_loss_mode=cfg.MODEL.ACM.ORTH_LOSS_MODE,
        )
        return ret

    def forward(self, batched_inputs):
        out = super().forward(batched_inputs)
        if self.training:
            out.update(self.orth_loss())
        return out

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in place of this model: the same modules as an instance of the
        base meta-architecture (under this class's name). TorchScript cannot compile super() in forward,
        and the loss it adds exists only in training, which scripting does not export
        (detectron2.export.scripting_with_instances takes models in eval mode)."""
        scriptable = copy.copy(
            self
        )  # a new __dict__ sharing the submodules, parameters and buffers
        scriptable.__class__ = self._scriptable_class
        del scriptable.orth_loss
        return scriptable


def with_orth_loss(base: type) -> type:
    """Register and return `ACM<base>`: the meta-architecture `base` with `loss_acm_orth` in training."""
    name = f"ACM{base.__name__}"
    # The two classes share one annotations dict: detectron2.export.freeze_training_mode marks `training`
    # constant there for the classes of the model's modules, and the scripted class must see it too.
    annotations = {}
    cls = type(
        name, (_OrthLossMixin, base), {"__module__": __name__, "__annotations__": annotations}
    )
    cls._scriptable_class = type(
        name, (base,), {"__module__": __name__, "__annotations__": annotations}
    )
    cls.__doc__ = (
        f"Detectron2's {base.__name__} plus ACM's orthogonal loss (`loss_acm_orth`) in training."
    )
    META_ARCH_REGISTRY.register(
        cls
    )  # returns None when given the class (only the decorator form returns it)
    return cls


ACMGeneralizedRCNN = with_orth_loss(GeneralizedRCNN)
ACMRetinaNet = with_orth_loss(RetinaNet)
ACMFCOS = with_orth_loss(FCOS)
ACMPanopticFPN = with_orth_loss(PanopticFPN)
ACMSemanticSegmentor = with_orth_loss(SemanticSegmentor)
