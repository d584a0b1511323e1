"""Mask R-CNN R50-FPN 1x, the baseline: Detectron2's own LazyConfig model-zoo parts (model, COCO data,
SGD, 1x schedule, train settings), the twin of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml
(same parameter names and shapes). Taken from the installed Detectron2 with model_zoo.get_config, as
Detectron2's ViTDet project does, not copied.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_1x.py --num-gpus 8
"""

from detectron2 import model_zoo

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train

model.backbone.bottom_up.freeze_at = 2
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
