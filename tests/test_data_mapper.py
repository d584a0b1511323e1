"""acm_d2.data.mapper and the training set-up's data checks: 16-bit images arrive scaled, an unreadable
image is named, the heads' class counts are checked against the datasets, RLE masks switch the mapper
to bitmasks, and Mask R-CNN on data without masks is refused up front."""

import json
import logging

import cv2
import numpy as np
import pytest
import torch

from acm_d2.data.datasets import register_coco_dataset
from acm_d2.data.mapper import DatasetMapper, read_image
from acm_d2.engine import Trainer
from conftest import small_cfg

MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"


def test_16_bit_png_arrives_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)
    path = str(tmp_path / "xray.png")
    cv2.imwrite(path, ramp)
    expected = np.round(ramp / 257.0)
    for image_format in ("BGR", "RGB", "L"):
        image = read_image(path, image_format)
        assert image.dtype == np.uint8 and image.shape[:2] == (96, 96)
        assert np.abs(image.astype(float) - expected[..., None]).max() <= 1
    cfg = small_cfg(MASK_RCNN)
    out = DatasetMapper(cfg, False)({"file_name": path, "height": 96, "width": 96, "image_id": 1})
    assert out["image"].min() < 5 and out["image"].max() > 250
    assert (
        out["image"] == 255
    ).float().mean() < 0.01  # Detectron2's own read: all but the darkest 1/257


def test_8_bit_images_read_as_detectron2_reads_them(tiny_dataset):
    from detectron2.data.detection_utils import read_image as d2_read_image

    path = f"{tiny_dataset['train'][1]}/000001.png"
    assert np.array_equal(read_image(path, "BGR"), d2_read_image(path, "BGR"))


def test_unreadable_image_mid_run_names_the_file(tmp_path, tiny_dataset):
    png = open(f"{tiny_dataset['train'][1]}/000001.png", "rb").read()
    path = tmp_path / "cut.png"
    path.write_bytes(png[: len(png) // 2])
    mapper = DatasetMapper(small_cfg(MASK_RCNN), True)
    with pytest.raises(OSError, match=f"{path}: cannot read the image .*truncated"):
        mapper(
            {"file_name": str(path), "height": 96, "width": 96, "image_id": 1, "annotations": []}
        )


def num_annotations(tiny_dataset):
    with open(tiny_dataset["train"][0]) as f:
        return len(json.load(f)["annotations"])


def register(tmp_path, tiny_dataset, change=None, name=None):
    with open(tiny_dataset["train"][0]) as f:
        coco = json.load(f)
    if change:
        change(coco)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    name = name or f"mapper_{tmp_path.name}"
    register_coco_dataset(name, str(path), tiny_dataset["train"][1])
    return name, str(path)


@pytest.mark.parametrize(
    "config, key",
    [
        (MASK_RCNN, "MODEL.ROI_HEADS.NUM_CLASSES"),
        ("COCO-Detection/retinanet_acm_R_50_FPN_1x.yaml", "MODEL.RETINANET.NUM_CLASSES"),
    ],
)
def test_fewer_classes_than_categories_is_an_error_at_training_start(
    tmp_path, tiny_dataset, caplog, config, key
):
    name, _ = register(tmp_path, tiny_dataset)
    cfg = small_cfg(config, "DATASETS.TRAIN", (name,), key, 1)
    with pytest.raises(
        ValueError, match=f"cfg.{key} = 1, but dataset '{name}' has 2 categories .*Set {key} 2"
    ):
        Trainer.build_train_loader(cfg)
    cfg = small_cfg(config, "DATASETS.TRAIN", (name,), key, 5)
    with caplog.at_level(logging.WARNING, logger="acm_d2"):
        Trainer.build_train_loader(cfg)
    assert f"cfg.{key} = 5, but dataset '{name}' has only 2 categories" in caplog.text


def rle_instead_of_polygon(coco):
    from pycocotools import mask as mask_util

    for ann in coco["annotations"][:3]:
        mask = np.zeros((96, 96), np.uint8, order="F")
        x, y, w, h = (int(v) for v in ann["bbox"])
        mask[y : y + h, x : x + w] = 1
        rle = mask_util.encode(mask)
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}


def test_rle_masks_switch_the_mapper_to_bitmasks_and_train(tmp_path, tiny_dataset, caplog):
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks
    from detectron2.utils.events import EventStorage

    name, _ = register(tmp_path, tiny_dataset, rle_instead_of_polygon)
    cfg = small_cfg(
        "Demo/mask_rcnn_acm_R_18_FPN_synthetic.yaml",
        "DATASETS.TRAIN",
        (name,),
        "SOLVER.IMS_PER_BATCH",
        2,
        "DATALOADER.NUM_WORKERS",
        0,
    )
    with caplog.at_level(logging.INFO, logger="acm_d2.data.mapper"):
        loader = Trainer.build_train_loader(cfg)
    assert f"3 of the {num_annotations(tiny_dataset)} training annotations" in caplog.text
    assert "INPUT.MASK_FORMAT bitmask" in caplog.text
    batch = next(iter(loader))
    assert all(isinstance(d["instances"].gt_masks, BitMasks) for d in batch)
    model = build_model(cfg)
    with EventStorage():
        losses = model(batch)
    assert torch.isfinite(losses["loss_mask"])


def test_mask_rcnn_on_data_without_masks_is_refused_up_front(tmp_path, tiny_dataset):
    def drop_masks(coco):
        for ann in coco["annotations"][1:]:
            ann.pop("segmentation")

    name, path = register(tmp_path, tiny_dataset, drop_masks)
    cfg = small_cfg(MASK_RCNN, "DATASETS.TRAIN", (name,))
    total = num_annotations(tiny_dataset)
    match = f"MODEL.MASK_ON is True, but {total - 1} of the {total} annotations .*{path}.* set MODEL.MASK_ON False"
    with pytest.raises(ValueError, match=match + ".* or add masks"):
        Trainer.build_train_loader(cfg)
    Trainer.build_train_loader(
        small_cfg(MASK_RCNN, "DATASETS.TRAIN", (name,), "MODEL.MASK_ON", False)
    )
