import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import small_cfg, training_batch

ACM_R50 = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"
OFFICIAL = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x_official.yaml"


def train_losses(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    with EventStorage():
        losses = model(training_batch())
    return model, losses


def test_orth_loss_is_in_the_loss_dict_finite_and_positive():
    _, losses = train_losses(small_cfg(ACM_R50))
    assert "loss_acm_orth" in losses
    assert torch.isfinite(losses["loss_acm_orth"]) and losses["loss_acm_orth"] > 0
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)


def test_orth_loss_scales_with_its_weight():
    _, a = train_losses(small_cfg(ACM_R50, "MODEL.ACM.ORTH_LOSS_WEIGHT", 0.1))
    _, b = train_losses(small_cfg(ACM_R50, "MODEL.ACM.ORTH_LOSS_WEIGHT", 1.0))
    torch.testing.assert_close(b["loss_acm_orth"], 10 * a["loss_acm_orth"])


def loss_modules_terms(model):
    """modules x batch: the terms of the loss's modules, from a second run of the backbone alone."""
    images = model.preprocess_image(training_batch())
    model.backbone(images.tensor)
    return torch.stack([m.orth_term for _, m in model.orth_loss.modules])


def test_paper_mode_sums_abs_batch_means_over_all_modules():
    model, losses = train_losses(small_cfg(ACM_R50))
    assert len(model.orth_loss.modules) == 16
    d = loss_modules_terms(model)
    torch.testing.assert_close(losses["loss_acm_orth"], 0.1 * d.mean(1).abs().sum())


def test_official_mode_uses_only_res5_and_abs_after_the_sum():
    model, losses = train_losses(small_cfg(OFFICIAL))
    names = [n for n, _ in model.orth_loss.modules]
    assert len(names) == 3 and all(".res5." in n for n in names)
    assert sum(n.endswith(".context") for n, _ in model.named_modules()) == 13
    d = loss_modules_terms(model)
    torch.testing.assert_close(losses["loss_acm_orth"], 0.1 * d.sum(0).mean().abs())


def test_gradients_reach_every_acm_parameter():
    model, losses = train_losses(small_cfg(ACM_R50))
    sum(losses.values()).backward()
    acm_params = [(n, p) for n, p in model.named_parameters() if ".context." in n]
    assert len(acm_params) == 16 * 8
    for name, p in acm_params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if (
            "logits.bias" not in name
        ):  # the logit biases cancel in the softmax: their gradient is ~0
            assert p.grad.abs().sum() > 0, name


def test_orth_loss_alone_reaches_k_and_q_logits():
    model, losses = train_losses(small_cfg(ACM_R50))
    losses["loss_acm_orth"].backward()
    for name, p in model.named_parameters():
        if "k_logits.weight" in name or "q_logits.weight" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inference_returns_detectron2_output_and_stores_no_terms():
    torch.manual_seed(0)
    model = build_model(small_cfg(ACM_R50)).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 96, 96) * 255, "height": 96, "width": 96}])
    assert set(out[0]) == {"instances"}
    assert all(m.orth_term is None for _, m in model.orth_loss.modules)


@pytest.mark.parametrize("variant", ["p_only", "no_q"])
def test_variants_without_q_have_no_orth_loss(variant):
    _, losses = train_losses(small_cfg(ACM_R50, "MODEL.ACM.VARIANT", variant))
    assert "loss_acm_orth" not in losses


C4 = "COCO-Detection/faster_rcnn_acm_R_50_C4_1x.yaml"


def test_c4_official_mode_uses_the_roi_head_res5_acms_whose_batch_is_the_regions():
    model, losses = train_losses(small_cfg(C4, "MODEL.ACM.ORTH_LOSS_MODE", "official"))
    assert [n for n, _ in model.orth_loss.modules] == [
        f"roi_heads.res5.{i}.context" for i in range(3)
    ]
    assert torch.isfinite(losses["loss_acm_orth"])


def test_c4_paper_mode_averages_each_module_over_its_own_batch():
    model, losses = train_losses(small_cfg(C4))
    assert len(model.orth_loss.modules) == 16
    assert torch.isfinite(losses["loss_acm_orth"]) and losses["loss_acm_orth"] > 0


def test_official_mode_without_res5_acms_is_a_clear_error():
    # Detectron2's plain Res5ROIHeads: the ACM backbone stops at res4, so no ACM is in res5.
    cfg = small_cfg(
        C4, "MODEL.ROI_HEADS.NAME", "Res5ROIHeads", "MODEL.ACM.ORTH_LOSS_MODE", "official"
    )
    with pytest.raises(ValueError, match="ACMRes5ROIHeads"):
        build_model(cfg)


def test_acm_meta_architectures_are_importable_classes():
    from detectron2.modeling import META_ARCH_REGISTRY

    from acm_d2.modeling import ACMGeneralizedRCNN, ACMPanopticFPN, ACMRetinaNet

    for cls in (ACMGeneralizedRCNN, ACMRetinaNet, ACMPanopticFPN):
        assert isinstance(cls, type) and META_ARCH_REGISTRY.get(cls.__name__) is cls
