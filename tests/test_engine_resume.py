"""Exact resume, in-process (no subprocess start-up): the steps after `resume_or_load(resume=True)` have
the same losses as those of an uninterrupted run with the same cfg.SEED."""

import json
import os

import pytest
import torch

from acm_d2.data.stream import ResumableTrainStream, build_resumable_train_loader
from acm_d2.engine import Trainer
from conftest import LOSS_TERMS, train, trainer_cfg


def final_metrics_row(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f][-1]


def test_resumed_run_has_the_losses_of_an_uninterrupted_run(tiny_dataset, tmp_path):
    # 5 iterations of 2 images from 8: the data stream crosses an epoch at iteration 4, the LR warms up
    # until iteration 3 and drops at iteration 4, all after the resume point.
    opts = (
        "SOLVER.MAX_ITER",
        5,
        "SOLVER.STEPS",
        (4,),
        "SOLVER.WARMUP_ITERS",
        3,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
        "TEST.EVAL_PERIOD",
        0,
        "DATASETS.TEST",
        (),
        "INPUT.MIN_SIZE_TRAIN",
        (64,),
        "INPUT.MAX_SIZE_TRAIN",
        64,
    )
    full, _ = train(trainer_cfg(tiny_dataset, tmp_path / "full", *opts))
    # Killed during iteration 3: the last checkpoint is model_0000001.pth, iteration 2 is done again.
    train(trainer_cfg(tiny_dataset, tmp_path / "cut", *opts), interrupt_at=3)
    assert (tmp_path / "cut" / "last_checkpoint").read_text() == "model_0000001.pth"
    resumed, trainer = train(trainer_cfg(tiny_dataset, tmp_path / "cut", *opts), resume=True)
    assert trainer.start_iter == 2 and sorted(resumed) == [2, 3, 4]
    for it in (2, 3, 4):
        # Exact: the same CPU kernels on the same inputs in the same order give the same bits.
        assert resumed[it] == full[it], (it, resumed[it], full[it])
    assert len({full[it]["lr"] for it in (2, 3, 4)}) == 3 and full[0] != full[2]  # not vacuous
    # Smoothed metrics (median over 20 iterations) include the restored pre-resume history.
    a, b = final_metrics_row(tmp_path / "full"), final_metrics_row(tmp_path / "cut")
    assert a["iteration"] == b["iteration"] == 4
    assert {k: a[k] for k in LOSS_TERMS} == {k: b[k] for k in LOSS_TERMS}


def _file_names(batches):
    return [[d["file_name"] for d in batch] for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_restarts_at_any_batch_with_the_same_images_and_augmentation(
    tiny_dataset, tmp_path, num_workers
):
    cfg = trainer_cfg(
        tiny_dataset,
        tmp_path,
        "DATALOADER.NUM_WORKERS",
        num_workers,
        "INPUT.RANDOM_FLIP",
        "horizontal",
    )
    loader = build_resumable_train_loader(cfg)
    assert isinstance(loader.dataset, ResumableTrainStream)
    stream = iter(loader)
    batches = [next(stream) for _ in range(7)]
    loader.dataset.start_iter = 4
    restarted = iter(loader)
    later = [next(restarted) for _ in range(3)]
    assert _file_names(later) == _file_names(batches[4:])
    for a, b in zip(later, batches[4:]):
        for x, y in zip(a, b):
            assert torch.equal(x["image"], y["image"])  # the same flips
    epoch = sorted(name for batch in _file_names(batches[:4]) for name in batch)
    assert (
        epoch == sorted(set(epoch)) and len(epoch) == 8
    )  # 4 batches of 2: each of the 8 images once


def test_amp_grad_scaler_state_is_restored_on_resume(tiny_dataset, tmp_path):
    """AMPTrainer needs CUDA to step, so this checks the checkpoint path only: the grad scaler state
    saved with a checkpoint is the one a resumed trainer gets."""
    cfg = trainer_cfg(tiny_dataset, tmp_path, "SOLVER.AMP.ENABLED", True)

    def trainer_with_scaler(scale):
        trainer = Trainer(cfg)
        trainer._trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        return trainer

    first = trainer_with_scaler(1024.0)
    first._trainer.grad_scaler._init_growth_tracker = 7
    first.checkpointer.save("model_0000004")
    resumed = trainer_with_scaler(2.0)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1 and resumed._trainer.grad_scaler.get_scale() == 1024.0


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_after_a_kill_while_writing_model_final_writes_it(tiny_dataset, tmp_path):
    """MAX_ITER a multiple of CHECKPOINT_PERIOD: the last step saves model_0000001.pth, then model_final.pth.
    Killed during the second save, the run looks finished to --resume; the resume writes model_final.pth,
    the same checkpoint the uninterrupted save would have written."""
    opts = ("SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", ())
    train(trainer_cfg(tiny_dataset, tmp_path, *opts))
    expected = torch.load(tmp_path / "model_final.pth", weights_only=True)
    # What the kill leaves: model_final only as atomic_write's temporary; last_checkpoint names the step's checkpoint.
    (tmp_path / "model_final.pth").rename(tmp_path / ".model_final.pth.k1ll3d.tmp")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    losses, trainer = train(trainer_cfg(tiny_dataset, tmp_path, *opts), resume=True)
    assert trainer.start_iter == 2 and losses == {}  # nothing trained again
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth" and not list(
        tmp_path.glob(".*.tmp")
    )
    assert _same(torch.load(tmp_path / "model_final.pth", weights_only=True), expected)
