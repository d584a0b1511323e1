"""tools/train_net.py end to end on a generated COCO-format dataset, in subprocesses as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "COCO-InstanceSegmentation", "mask_rcnn_acm_R_50_FPN_1x.yaml")
# ACM R-18 FPN at 96 px: the shipped config's code path, small enough for 2 CPU cores. From random
# weights the frozen-BN trunk diverges in a few steps (with or without ACM): GroupNorm trains.
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "SEED", "1",
    "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
]


def run_train_net(tiny_dataset, output_dir, *args, num_gpus=1, opts=()):
    """Run train_net; `args` go before the small test config (SMALL), `opts` after it (they win)."""
    datasets = []
    for split, (json_file, image_root) in tiny_dataset.items():
        datasets += ["--coco-dataset", f"tiny_{split}", json_file, image_root]
    cmd = [sys.executable, TRAIN_NET, "--config-file", CONFIG, "--num-gpus", str(num_gpus), *datasets, *args]
    cmd += [*SMALL, "OUTPUT_DIR", str(output_dir), *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1" if num_gpus > 1 else "2")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_then_eval_only_prints_coco_ap(tiny_dataset, tmp_path):
    log = run_train_net(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    assert (tmp_path / "model_final.pth").exists()
    rows = [r for r in metrics(tmp_path) if "loss_acm_orth" in r]
    assert rows and all(r["loss_acm_orth"] >= 0 for r in rows)
    assert "Evaluation results for bbox" in log  # training ends with an evaluation of DATASETS.TEST

    log = run_train_net(tiny_dataset, tmp_path / "eval", "--eval-only", opts=["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log


def test_resume_continues_from_the_last_checkpoint(tiny_dataset, tmp_path):
    run_train_net(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0")
    log = run_train_net(tiny_dataset, tmp_path, "--resume", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1")
    assert "Starting training from iteration 2" in log


def test_missing_coco_dataset_file_is_a_clear_error(tmp_path):
    cmd = [sys.executable, TRAIN_NET, "--config-file", CONFIG, "--coco-dataset", "x", str(tmp_path / "none.json"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "none.json" in result.stderr and "does not exist" in result.stderr


def test_two_process_cpu_training(tiny_dataset, tmp_path):
    log = run_train_net(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", "2", num_gpus=2)
    assert (tmp_path / "model_final.pth").exists()
    assert "Ranks hold identical weights after training (2 processes compared)" in log
    assert "Evaluation results for bbox" in log
