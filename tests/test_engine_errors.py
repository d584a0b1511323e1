"""Bad input to training: config keys a model would ignore, unusable checkpoints, non-finite losses,
and parameters without gradients (which DDP reports as "unused parameters")."""

import logging

import pytest
import torch
from detectron2.modeling import build_model

from acm_d2.checkpoint.checkpointer import AtomicCheckpointer, CheckpointError
from acm_d2.engine import NonFiniteLossError, Trainer
from acm_d2.modeling import check_context_keys
from acm_d2.modeling.meta_arch import OrthogonalLoss
from conftest import R18_GN, small_cfg, train, trainer_cfg, training_batch

ACM = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"
PLAIN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
SMALL_R18 = (*R18_GN, "MODEL.FPN.OUT_CHANNELS", 64)


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, opts, key",
    [
        (PLAIN, ["MODEL.ACM.ORTH_LOSS_WEIGHT", 0.5], "MODEL.ACM.ORTH_LOSS_WEIGHT"),
        (PLAIN, ["MODEL.ACM.STAGES", ["res5"]], "MODEL.ACM.STAGES"),
        (PLAIN, ["MODEL.CONTEXT_MODULE", "SE"], "MODEL.CONTEXT_MODULE"),
        (PLAIN, ["MODEL.SE.REDUCTION", 8], "MODEL.SE.REDUCTION"),
        (ACM, ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "MODEL.ACM.ORTH_LOSS_WEIGHT"),
    ],
)
def test_context_keys_the_model_would_ignore_are_an_error_naming_the_key(config, opts, key):
    cfg = small_cfg(config, *opts)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_context_keys(cfg)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Trainer.build_model(cfg)  # wired where tools/train_net.py builds its model


def test_plain_meta_architecture_without_the_orth_loss_is_allowed_with_weight_zero():
    check_context_keys(
        small_cfg(
            ACM, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ACM.ORTH_LOSS_WEIGHT", 0.0
        )
    )
    check_context_keys(small_cfg(PLAIN))  # the baseline with every context key at its default


def test_other_context_modules_keys_are_a_warning(caplog):
    cfg = small_cfg(ACM, "MODEL.CONTEXT_MODULE", "SE", "MODEL.ACM.NUM_GROUPS", 8)
    with caplog.at_level(logging.WARNING, logger="acm_d2"):
        check_context_keys(cfg)
    assert "MODEL.ACM.NUM_GROUPS" in caplog.text and "ignored" in caplog.text


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.ACM.NUM_GROUPS", 48], r"cfg\.MODEL\.ACM.*divisible by num_groups \(48\)"),
        (["MODEL.ACM.REDUCTION", 3], r"cfg\.MODEL\.ACM.*reduction"),
        (["MODEL.ACM.VARIANT", "no_k"], r"MODEL\.ACM\.VARIANT"),
        (["MODEL.ACM.STAGES", ["res1"]], r"MODEL\.ACM\.STAGES"),
        (["MODEL.ACM.ORTH_LOSS_WEIGHT", -0.1], r"MODEL\.ACM\.ORTH_LOSS_WEIGHT"),
        (["MODEL.CONTEXT_MODULE", "BAM"], r"MODEL\.CONTEXT_MODULE"),
    ],
)
def test_bad_acm_values_fail_when_the_trainer_builds_the_model(opts, match):
    with pytest.raises(ValueError, match=match):
        Trainer.build_model(small_cfg(ACM, *SMALL_R18, *opts))


# ---- no parameter without a gradient (DDP's "unused parameters") -------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.ACM.VARIANT", "full", "MODEL.ACM.STAGES", ["res5"]],
        ["MODEL.ACM.VARIANT", "no_p", "MODEL.ACM.STAGES", ["res2", "res4"]],
        ["MODEL.ACM.VARIANT", "p_only"],
        ["MODEL.ACM.VARIANT", "no_q", "MODEL.ACM.STAGES", ["res3"]],
        ["MODEL.ACM.ORTH_LOSS_MODE", "official", "MODEL.ACM.STAGES", ["res4", "res5"]],
        ["MODEL.ACM.ORTH_LOSS_WEIGHT", 0.0, "MODEL.ACM.STAGES", ["res2", "res3", "res4", "res5"]],
    ],
)
def test_every_trainable_parameter_gets_a_gradient(opts):
    """DDP (find_unused_parameters=False, Detectron2's default) fails at the next step otherwise."""
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(small_cfg(ACM, *SMALL_R18, "MODEL.BACKBONE.FREEZE_AT", 0, *opts))
    model.train()
    with EventStorage():
        sum(model(training_batch(size=64)).values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


# ---- checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acm_model():
    torch.manual_seed(0)
    return build_model(small_cfg(ACM, *SMALL_R18))


def _load(model, path):
    return AtomicCheckpointer(model).load(str(path))


def test_missing_checkpoint_names_the_file(acm_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _load(acm_model, tmp_path / "nope.pth")


def test_truncated_checkpoint_names_the_file(acm_model, tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": acm_model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated"):
        _load(acm_model, path)


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2, 3], "holds a list"),
        ({"model": {"a": 1}}, "not a model state dict"),
        ({"model": "weights"}, "no model state dict"),
        ({"fc.weight": torch.zeros(3, 3)}, "shares no parameter"),
    ],
)
def test_foreign_checkpoint_names_the_file(acm_model, tmp_path, content, match):
    path = tmp_path / "foreign.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"foreign.pth.*{match}"):
        _load(acm_model, path)


def test_checkpoint_of_another_backbone_names_the_file_and_a_key(acm_model, tmp_path):
    state = dict(acm_model.state_dict())
    key = next(
        k for k in state if k.startswith("backbone.bottom_up.res3") and k.endswith("conv1.weight")
    )
    state[key] = torch.zeros(3, 3, 1, 1)
    torch.save({"model": state}, tmp_path / "r101.pth")
    with pytest.raises(CheckpointError, match=rf"r101.pth.*another backbone.*{key}"):
        _load(acm_model, tmp_path / "r101.pth")


def test_baseline_checkpoint_summary_separates_acm_keys_from_other_missing_keys(
    acm_model, tmp_path
):
    state = {k: v for k, v in acm_model.state_dict().items() if ".context." not in k}
    torch.save({"model": state}, tmp_path / "baseline.pth")
    without_heads = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_head")}
    torch.save({"model": without_heads}, tmp_path / "imagenet_like.pth")

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    checkpointer = AtomicCheckpointer(acm_model)
    checkpointer.logger.addHandler(handler)
    level = checkpointer.logger.level
    checkpointer.logger.setLevel(logging.INFO)
    try:
        checkpointer.load(str(tmp_path / "baseline.pth"))
        summary = [r for r in records if "context-module (ACM)" in r.getMessage()]
        assert (
            summary[-1].levelno == logging.INFO
            and "No other parameter is missing" in summary[-1].getMessage()
        )
        records.clear()
        checkpointer.load(str(tmp_path / "imagenet_like.pth"))
        summary = [r for r in records if "context-module (ACM)" in r.getMessage()]
        assert summary[-1].levelno == logging.WARNING
        assert "other parameters are missing" in summary[-1].getMessage()
        assert "roi_heads.mask_head" in summary[-1].getMessage()
    finally:
        checkpointer.logger.removeHandler(handler)
        checkpointer.logger.setLevel(level)


# ---- non-finite loss ---------------------------------------------------------------------------
def test_non_finite_orth_loss_stops_naming_the_term_and_keeps_the_last_good_checkpoint(
    tiny_dataset, tmp_path, monkeypatch
):
    calls = []
    original = OrthogonalLoss.__call__

    def nan_at_second_step(self):
        out = original(self)
        calls.append(1)
        if len(calls) == 2:
            out["loss_acm_orth"] = out["loss_acm_orth"] * float("nan")
        return out

    monkeypatch.setattr(OrthogonalLoss, "__call__", nan_at_second_step)
    cfg = trainer_cfg(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1)
    with pytest.raises(
        NonFiniteLossError, match=r"iteration 1: loss_acm_orth = nan.*model_0000000\.pth"
    ) as info:
        train(cfg)
    assert (
        "loss_cls" not in str(info.value).split("finite terms")[0]
    )  # only the bad term is named as bad
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]  # no model_final
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    state = torch.load(tmp_path / "model_0000000.pth", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "inference").exists()  # no evaluation after the bad step


def test_rpn_divergence_ends_like_a_non_finite_loss(tiny_dataset, tmp_path, monkeypatch):
    """Detectron2's RPN raises a plain FloatingPointError ("Predicted boxes or scores contain Inf/NaN")
    before any loss is checked; it ends as NonFiniteLossError with the iteration, checkpoint and knobs."""
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead

    calls = []
    original = StandardRPNHead.forward

    def nan_deltas_at_second_step(self, features):
        logits, deltas = original(self, features)
        calls.append(1)
        if len(calls) == 2:
            deltas = [d * float("nan") for d in deltas]
        return logits, deltas

    monkeypatch.setattr(StandardRPNHead, "forward", nan_deltas_at_second_step)
    cfg = trainer_cfg(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"diverged at iteration 1: .*Inf/NaN.*SOLVER\.BASE_LR.*model_0000000\.pth",
    ):
        train(cfg)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]  # no model_final
    assert not (tmp_path / "inference").exists()


def test_resume_with_a_changed_head_names_the_keys_and_shapes_at_load_time(tiny_dataset, tmp_path):
    train(trainer_cfg(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", 1, "DATASETS.TEST", ()))
    changed = Trainer(
        trainer_cfg(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", 2, "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    )
    with pytest.raises(
        CheckpointError,
        match=(
            r"model_final\.pth.*roi_heads\.box_predictor\.cls_score\.weight: \(3, 1024\) in the file, \(4, 1024\) in the "
            r"model.*another OUTPUT_DIR with MODEL\.WEIGHTS"
        ),
    ):
        changed.resume_or_load(resume=True)
    # Fine-tuning from the same file (MODEL.WEIGHTS, no resume) still re-initialises the changed layers.
    changed.checkpointer.resume_or_load(str(tmp_path / "model_final.pth"), resume=False)


def test_eval_only_refuses_missing_or_incomplete_weights_unless_asked(acm_model, tmp_path):
    import argparse

    from acm_d2.engine import load_weights_for_evaluation

    args = argparse.Namespace(resume=False, allow_random_weights=False)
    with pytest.raises(
        CheckpointError,
        match=r"--eval-only without weights.*MODEL\.WEIGHTS.*--allow-random-weights",
    ):
        load_weights_for_evaluation(acm_model, "", str(tmp_path), args)
    torch.save(
        {"model": {k: v for k, v in acm_model.state_dict().items() if ".context." not in k}},
        tmp_path / "baseline.pth",
    )
    with pytest.raises(CheckpointError, match=r"baseline\.pth.*does not hold \d+ parameters"):
        load_weights_for_evaluation(acm_model, str(tmp_path / "baseline.pth"), str(tmp_path), args)
    args.allow_random_weights = True
    load_weights_for_evaluation(acm_model, "", str(tmp_path), args)
    load_weights_for_evaluation(acm_model, str(tmp_path / "baseline.pth"), str(tmp_path), args)
