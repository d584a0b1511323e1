"""Mask R-CNN R50-FPN 1x with ACM in every bottleneck of res2-res5 (the paper's placement) and the
orthogonal loss (lambda 0.1): the twin of configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml.

The yaml keys map to:  MODEL.CONTEXT_MODULE and MODEL.<node>.*  ->  model.backbone.bottom_up.stages.context
(context_builder(name, <node>=dict(...))), MODEL.ACM.ORTH_LOSS_WEIGHT / ORTH_LOSS_MODE ->
model.orth_loss_weight / model.orth_loss_mode. E.g. the authors' placement and loss:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_acm_R_50_FPN_1x.py \
        'model.backbone.bottom_up.stages.context.ACM.STAGES=[res3,res4,res5]' model.orth_loss_mode=official
"""

from detectron2.config import LazyCall as L

from acm_d2.modeling import ACMGeneralizedRCNN, context_builder, make_context_stages

from .mask_rcnn_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model._target_ = ACMGeneralizedRCNN
model.orth_loss_weight = 0.1
model.orth_loss_mode = "paper"
model.backbone.bottom_up.stages = L(make_context_stages)(
    depth=50,
    context=L(context_builder)(name="ACM", ACM=dict(STAGES=["res2", "res3", "res4", "res5"])),
    stride_in_1x1=True,
    norm="FrozenBN",
)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
