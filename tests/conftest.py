import os

import pytest
import torch
from detectron2.config import get_cfg

import acm_d2
from acm_d2.data.synthetic import generate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

torch.set_num_threads(2)


def small_cfg(config_file: str, *opts):
    """A shipped config made small enough for a CPU test: random weights, 64-128 px inputs, few proposals."""
    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config_file))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TRAIN", (96,),
            "INPUT.MAX_SIZE_TRAIN", 128,
            "INPUT.MIN_SIZE_TEST", 96,
            "INPUT.MAX_SIZE_TEST", 128,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
            "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
            *opts,
        ]
    )
    return cfg


def training_batch(num_images=2, size=96, seed=0):
    """Detectron2 training inputs: random images with one box and one mask each, and the semantic
    segmentation a Panoptic FPN also trains on (class 1 inside the mask, 0 elsewhere)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]]))
        instances.gt_classes = torch.tensor([1])
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        mask[0, 12:70, 10:60] = True
        instances.gt_masks = BitMasks(mask)
        image = torch.randint(0, 255, (3, size, size), generator=g).float()
        sem_seg = mask[0].long()
        batch.append({"image": image, "instances": instances, "sem_seg": sem_seg, "height": size, "width": size})
    return batch


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A generated COCO-format dataset: 8 train and 4 val images of 96 px."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    return generate_dataset(root, num_train=8, num_val=4, image_size=96, seed=0)
