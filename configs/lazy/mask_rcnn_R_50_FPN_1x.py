"""Mask R-CNN R50-FPN 1x, the baseline: Detectron2's LazyConfig model zoo file, the twin of
configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml (same parameter names and shapes).

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_1x.py --num-gpus 8
"""
from ..common.coco_schedule import lr_multiplier_1x as lr_multiplier
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_fpn import model
from ..common.optim import SGD as optimizer
from ..common.train import train

model.backbone.bottom_up.freeze_at = 2
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
