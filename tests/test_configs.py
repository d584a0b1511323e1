import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, small_cfg, training_batch

SHIPPED = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


def test_the_paper_configs_are_shipped():
    for name in [
        "mask_rcnn_R_50_FPN_1x", "mask_rcnn_acm_R_50_FPN_1x", "mask_rcnn_acm_R_50_FPN_1x_official",
        "mask_rcnn_R_101_FPN_1x", "mask_rcnn_acm_R_101_FPN_1x",
        "mask_rcnn_X_101_32x8d_FPN_1x", "mask_rcnn_acm_X_101_32x8d_FPN_1x",
    ]:
        assert f"COCO-InstanceSegmentation/{name}.yaml" in SHIPPED


@pytest.mark.parametrize("config", [c for c in SHIPPED if c.startswith("COCO-")])
def test_coco_configs_use_the_1x_schedule(config):
    cfg = small_cfg(config)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.02, 90000)
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_builds_and_trains_one_step(config):
    cfg = small_cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage():
        losses = model(training_batch(size=64))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    if "acm" in os.path.basename(config):
        assert "loss_acm_orth" in losses
