"""tools/train_net.py end to end on a generated COCO-format dataset, in subprocesses as a user runs it."""

import json
import os
import subprocess
import sys

from conftest import CONFIG, TRAIN_NET, run_train_net


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_then_eval_only_prints_coco_ap(tiny_dataset, tmp_path):
    log = run_train_net(
        tiny_dataset, tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"
    )
    assert (tmp_path / "model_final.pth").exists()
    rows = [r for r in metrics(tmp_path) if "loss_acm_orth" in r]
    assert rows and all(r["loss_acm_orth"] >= 0 for r in rows)
    assert "Evaluation results for bbox" in log  # training ends with an evaluation of DATASETS.TEST

    log = run_train_net(
        tiny_dataset,
        tmp_path / "eval",
        "--eval-only",
        opts=["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")],
    )
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log


def test_resume_continues_from_the_last_checkpoint(tiny_dataset, tmp_path):
    run_train_net(
        tiny_dataset,
        tmp_path,
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "TEST.EVAL_PERIOD",
        "0",
    )
    log = run_train_net(
        tiny_dataset, tmp_path, "--resume", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"
    )
    assert "Starting training from iteration 2" in log


def test_missing_coco_dataset_file_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        TRAIN_NET,
        "--config-file",
        CONFIG,
        "--coco-dataset",
        "x",
        str(tmp_path / "none.json"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (
        result.returncode != 0
        and "none.json" in result.stderr
        and "does not exist" in result.stderr
    )


def test_two_process_cpu_training(tiny_dataset, tmp_path):
    log = run_train_net(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", "2", num_gpus=2)
    assert (tmp_path / "model_final.pth").exists()
    assert "Ranks hold identical weights after training (2 processes compared)" in log
    assert "Evaluation results for bbox" in log
