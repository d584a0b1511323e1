"""Fixtures and helpers shared by the test files (they import them from here, never from each other)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.env import seed_all_rng

import acm_d2
from acm_d2.data.datasets import register_coco_dataset
from acm_d2.data.synthetic import generate_dataset
from acm_d2.engine import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

torch.set_num_threads(2)


# ResNet-18 with GroupNorm: the shipped configs' code paths at a CPU test's size (from random weights the
# frozen-BN trunk diverges in a few steps, with or without ACM; GroupNorm trains).
R18_GN = (
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN",
)  # fmt: skip


def small_cfg(config_file: str, *opts):
    """A shipped config made small enough for a CPU test: random weights, 64-128 px inputs, few proposals."""
    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config_file))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TRAIN",
            (96,),
            "INPUT.MAX_SIZE_TRAIN",
            128,
            "INPUT.MIN_SIZE_TEST",
            96,
            "INPUT.MAX_SIZE_TEST",
            128,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
            200,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            50,
            "MODEL.RPN.PRE_NMS_TOPK_TEST",
            200,
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            50,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            32,
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
        batch.append(
            {
                "image": image,
                "instances": instances,
                "sem_seg": sem_seg,
                "height": size,
                "width": size,
            }
        )
    return batch


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A generated COCO-format dataset: 8 train and 4 val images of 96 px."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    return generate_dataset(root, num_train=8, num_val=4, image_size=96, seed=0)


# tools/train_net.py as a user runs it, in a subprocess
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(
    REPO, "configs", "COCO-InstanceSegmentation", "mask_rcnn_acm_R_50_FPN_1x.yaml"
)
# ACM R-18 FPN at 96 px: the shipped config's code path, small enough for 2 CPU cores. From random
# weights the frozen-BN trunk diverges in a few steps (with or without ACM): GroupNorm trains.
SMALL = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.RESNETS.NORM",
    "GN",
    "MODEL.FPN.NORM",
    "GN",
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "2",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "64",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.005",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "0",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.EVAL_PERIOD",
    "0",
    "SEED",
    "1",
    "DATASETS.TRAIN",
    "('tiny_train',)",
    "DATASETS.TEST",
    "('tiny_val',)",
]


def train_net_command(dataset, output_dir, *args, opts=(), wrapper=None):
    """tools/train_net.py on the tiny dataset; `args` go before the small test config (SMALL), `opts`
    after it (they win); `wrapper` runs before the script (e.g. a Python file that wraps it)."""
    datasets = []
    for split, (json_file, image_root) in dataset.items():
        datasets += ["--coco-dataset", f"tiny_{split}", json_file, image_root]
    cmd = [sys.executable, *([wrapper] if wrapper else []), TRAIN_NET, "--config-file", CONFIG]
    return cmd + [*datasets, *args, *SMALL, "OUTPUT_DIR", str(output_dir), *opts]


def run_train_net(tiny_dataset, output_dir, *args, num_gpus=1, opts=()):
    """Run train_net (train_net_command) to completion; it must succeed."""
    cmd = train_net_command(tiny_dataset, output_dir, "--num-gpus", str(num_gpus), *args, opts=opts)
    env = dict(os.environ, OMP_NUM_THREADS="1" if num_gpus > 1 else "2")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid):
    """The pids of the live (not zombie) processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return children


# the Trainer in-process
LOSS_TERMS = (
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_acm_orth",
)


def trainer_cfg(tiny_dataset, output_dir, *opts):
    for split, (json_file, image_root) in tiny_dataset.items():
        register_coco_dataset(f"tiny_{split}", json_file, image_root)
    cfg = small_cfg(
        "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml",
        *SMALL,
        "OUTPUT_DIR",
        str(output_dir),
        *opts,
    )
    return cfg


class Interrupt(Exception):
    pass


def train(cfg, resume=False, interrupt_at=None):
    """Train as tools/train_net.py does (seeded as default_setup seeds); return {iteration: {term: loss}}."""
    from detectron2.engine import HookBase

    losses = {}

    class Record(HookBase):
        def after_step(self):
            if interrupt_at is not None and self.trainer.iter + 1 == interrupt_at:
                raise Interrupt()  # as if killed after this step: whatever came after the last checkpoint is lost
            hist = self.trainer.storage.histories()
            losses[self.trainer.iter] = {
                k: hist[k].latest() for k in LOSS_TERMS + ("total_loss", "lr")
            }

    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except Interrupt:
        pass
    return losses, trainer


def calm_attention(model):
    """Scale every ACM's attention-logits weights by 1/10, in place; returns the model.

    Random kaiming weights give logits of 50-300, a softmax that is nearly an argmax, which turns
    onnxruntime's rounding (its own kernels) into box differences of 0.06-0.2 pixel; at 1/10 the
    difference falls to a stock model's 0.004, so an ONNX check can be held to a tight tolerance."""
    from acm_d2.layers import AttendAndCompare

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AttendAndCompare):
                for conv in (m.k_logits, m.q_logits):
                    if conv is not None:
                        conv.weight.mul_(0.1)
    return model


def import_tool(name):
    """tools/<name>.py imported as a module, to call its functions in the test's process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
