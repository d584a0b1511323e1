import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone, build_model

from acm_d2.layers import AttendAndCompare
from conftest import small_cfg

ACM_R50 = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"


def acm_modules(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, AttendAndCompare)]


@pytest.mark.parametrize(
    "config, stages, expected",
    [
        (ACM_R50, ["res2", "res3", "res4", "res5"], 16),
        (ACM_R50, ["res3", "res4", "res5"], 13),
        (
            "COCO-InstanceSegmentation/mask_rcnn_acm_R_101_FPN_1x.yaml",
            ["res2", "res3", "res4", "res5"],
            33,
        ),
        ("COCO-InstanceSegmentation/mask_rcnn_acm_R_101_FPN_1x.yaml", ["res3", "res4", "res5"], 30),
        (
            "COCO-InstanceSegmentation/mask_rcnn_acm_X_101_32x8d_FPN_1x.yaml",
            ["res2", "res3", "res4", "res5"],
            33,
        ),
        (
            "COCO-InstanceSegmentation/mask_rcnn_acm_X_101_32x8d_FPN_1x.yaml",
            ["res3", "res4", "res5"],
            30,
        ),
    ],
)
def test_module_count_per_placement(config, stages, expected):
    cfg = small_cfg(config, "MODEL.ACM.STAGES", stages)
    backbone = build_backbone(cfg)
    found = acm_modules(backbone)
    assert len(found) == expected
    assert {n.split(".")[1] for n, _ in found} == set(stages)


def test_acm_sits_in_every_block_with_the_block_output_channels():
    backbone = build_backbone(small_cfg(ACM_R50))
    for stage, channels in zip(["res2", "res3", "res4", "res5"], [256, 512, 1024, 2048]):
        for block in getattr(backbone.bottom_up, stage):
            assert isinstance(block.context, AttendAndCompare)
            assert block.context.channels == channels == block.out_channels


def test_acm_in_frozen_stage_stays_trainable_while_the_block_is_frozen():
    cfg = small_cfg(ACM_R50, "MODEL.BACKBONE.FREEZE_AT", 2)
    res2 = build_backbone(cfg).bottom_up.res2
    assert not any(p.requires_grad for p in res2[0].conv1.parameters())
    assert all(p.requires_grad for block in res2 for p in block.context.parameters())


def test_acm_in_frozen_stage_receives_gradients():
    cfg = small_cfg(ACM_R50, "MODEL.BACKBONE.FREEZE_AT", 2)
    backbone = build_backbone(cfg).train()
    out = backbone(torch.randn(1, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    for block in backbone.bottom_up.res2:
        assert block.conv1.weight.grad is None
        assert all(p.grad is not None for p in block.context.parameters())


def test_basic_block_resnet18_gets_acm_after_conv2():
    cfg = small_cfg(ACM_R50, "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
    backbone = build_backbone(cfg)
    assert len(acm_modules(backbone)) == 8
    outputs = backbone(torch.randn(1, 3, 64, 64))
    assert outputs["p2"].shape == (1, 256, 16, 16)


def test_context_module_none_builds_the_plain_resnet_with_detectron2_names():
    plain = build_backbone(small_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    ours = build_backbone(small_cfg(ACM_R50, "MODEL.CONTEXT_MODULE", "none"))
    assert not acm_modules(ours)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }


def test_baseline_checkpoint_loads_with_only_acm_keys_missing(tmp_path):
    baseline = build_model(small_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    DetectionCheckpointer(baseline, save_dir=str(tmp_path)).save("baseline")
    model = build_model(small_cfg(ACM_R50))

    class RecordingCheckpointer(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(str(tmp_path / "baseline.pth"))
    incompatible = checkpointer.incompatible
    assert incompatible.missing_keys
    assert all(".context." in k for k in incompatible.missing_keys)
    assert len(incompatible.missing_keys) == 16 * 8  # 16 ACMs x (4 convs x weight, bias)
    assert not incompatible.unexpected_keys
    for key, value in baseline.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.ACM.NUM_GROUPS", 48], "divisible by num_groups"),
        (["MODEL.ACM.VARIANT", "PX"], "MODEL.ACM.VARIANT"),
        (["MODEL.ACM.STAGES", ["res6"]], "MODEL.ACM.STAGES"),
        (["MODEL.ACM.ORTH_LOSS_WEIGHT", -1.0], "MODEL.ACM.ORTH_LOSS_WEIGHT"),
        (["MODEL.ACM.ORTH_LOSS_MODE", "both"], "MODEL.ACM.ORTH_LOSS_MODE"),
        (["MODEL.ACM.STAGES", ["res3"], "MODEL.ACM.ORTH_LOSS_MODE", "official"], "res5"),
        (["MODEL.CONTEXT_MODULE", "XYZ"], "MODEL.CONTEXT_MODULE"),
        (["MODEL.RESNETS.DEPTH", 42], "MODEL.RESNETS.DEPTH"),
    ],
)
def test_bad_config_values_name_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(small_cfg(ACM_R50, *opts))


def test_retinanet_backbone_has_p3_to_p7():
    from detectron2.layers import ShapeSpec

    from acm_d2.modeling import build_acm_retinanet_resnet_fpn_backbone

    cfg = small_cfg(
        ACM_R50,
        "MODEL.RESNETS.OUT_FEATURES",
        ["res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES",
        ["res3", "res4", "res5"],
    )
    backbone = build_acm_retinanet_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert sorted(backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert len(acm_modules(backbone)) == 16


C4 = "COCO-Detection/faster_rcnn_acm_R_50_C4_1x.yaml"


def test_c4_model_puts_res5_acms_in_its_roi_head_with_detectron2_names():
    plain = build_model(small_cfg("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    ours = build_model(small_cfg(C4))
    names = [n for n, _ in acm_modules(ours)]
    assert len(names) == 16 and "backbone.res5.0.context" not in names
    assert [n for n in names if "res5" in n] == [f"roi_heads.res5.{i}.context" for i in range(3)]
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items() if ".context." not in k}
    assert ours_shapes == {k: v.shape for k, v in plain.state_dict().items()}


def test_c4_roi_head_refuses_a_dilated_res5():
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_model(small_cfg(C4, "MODEL.RESNETS.RES5_DILATION", 2))


def test_backbone_from_plain_pytorch_with_its_orthogonal_loss():
    """The README's snippet: the ACM backbone outside Detectron2's meta-architectures."""
    from detectron2.config import get_cfg

    import acm_d2
    from acm_d2.modeling import OrthogonalLoss
    from conftest import CONFIGS

    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file(f"{CONFIGS}/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml")
    cfg.MODEL.WEIGHTS = ""  # or a checkpoint, loaded with DetectionCheckpointer(backbone)
    backbone = build_backbone(cfg).train()
    orth = OrthogonalLoss(
        backbone, weight=cfg.MODEL.ACM.ORTH_LOSS_WEIGHT, mode=cfg.MODEL.ACM.ORTH_LOSS_MODE
    )

    images = torch.randn(
        2, 3, 64, 64
    )  # normalised: (BGR 0-255 - cfg.MODEL.PIXEL_MEAN) / cfg.MODEL.PIXEL_STD
    features = backbone(images)
    loss = sum(f.mean() for f in features.values()) + orth()["loss_acm_orth"]
    loss.backward()

    assert sorted(features) == ["p2", "p3", "p4", "p5", "p6"]
    assert len(orth.modules) == 16
    assert all(m.orth_term is None for _, m in orth.modules)  # released by orth()
    assert all(p.grad is not None for n, p in backbone.named_parameters() if "q_logits.weight" in n)
