"""torch.compile of an ACM backbone, and mixed-precision training steps (CPU autocast here; AMPTrainer on CUDA)."""

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from conftest import R18_GN, small_cfg, training_batch

ACM_R18 = ("COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml", *R18_GN)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_compiled_backbone_is_one_graph_without_breaks(impl):
    import torch._dynamo

    torch._dynamo.reset()
    backbone = build_backbone(small_cfg(*ACM_R18, "MODEL.ACM.IMPL", impl)).bottom_up.train()
    explanation = torch._dynamo.explain(backbone)(torch.randn(1, 3, 64, 64))
    # 8 ACM blocks, one graph: no break inside ACM and nothing that splits the model per block.
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# float16 convolutions are slow on the CPU (a minute here): that case runs with the slow tests.
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)]
)
def test_mixed_precision_training_step_is_finite_and_close_to_fp32(dtype):
    torch.manual_seed(0)
    model = build_model(small_cfg(*ACM_R18)).train()
    batch = training_batch(size=64)
    with EventStorage():
        torch.manual_seed(1)
        full = model(batch)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(batch)
    assert all(torch.isfinite(v) for v in mixed.values()), mixed
    # Same sampled proposals (same seed), so the half-precision losses track the float32 ones.
    torch.testing.assert_close(
        mixed["loss_acm_orth"].float(), full["loss_acm_orth"], rtol=0.1, atol=1e-4
    )
    sum(mixed.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_amp_precision_key_selects_the_autocast_dtype():
    from acm_d2.config import amp_precision

    assert amp_precision(small_cfg(ACM_R18[0])) == torch.float16  # Detectron2's AMPTrainer default
    assert (
        amp_precision(small_cfg(ACM_R18[0], "SOLVER.AMP.PRECISION", "bfloat16")) == torch.bfloat16
    )
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        amp_precision(small_cfg(ACM_R18[0], "SOLVER.AMP.PRECISION", "fp8"))


def test_the_trainer_key_is_added_to_full_configs_and_not_to_model_only_ones():
    from detectron2.config import CfgNode, get_cfg

    from acm_d2.config import add_acm_config, add_trainer_config
    from acm_d2.modeling import context_builder

    full = get_cfg()
    add_acm_config(full)
    assert full.SOLVER.AMP.PRECISION == "float16"
    model_only = CfgNode({"MODEL": CfgNode()})
    add_acm_config(model_only)
    assert "SOLVER" not in model_only
    assert "SOLVER" not in context_builder("ACM").args[0]  # its config holds the model keys only
    trainer_only = get_cfg()
    add_trainer_config(trainer_only)
    assert trainer_only.SOLVER.AMP.PRECISION == "float16" and "ACM" not in trainer_only.MODEL
