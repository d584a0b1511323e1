"""torchvision ResNet / ResNeXt weights in acm_d2's backbone: every trunk tensor maps and the converted
trunk computes torchvision's features, given the config values the converter documents."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torchvision.transforms.functional import normalize

from acm_d2.checkpoint.torchvision import convert_torchvision_state_dict, torchvision_config
from acm_d2.modeling import build_acm_resnet_backbone
from conftest import REPO, small_cfg

ACM_R50 = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"
CONVERT = os.path.join(REPO, "tools", "convert_torchvision_weights.py")
STAGES = ["res2", "res3", "res4", "res5"]


def random_torchvision(arch):
    """A randomly initialised torchvision model in eval mode, with non-trivial BN affine and statistics."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def torchvision_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for stage, layer in zip(STAGES, [model.layer1, model.layer2, model.layer3, model.layer4]):
        out[stage] = x = layer(x)
    return out


def our_backbone(state_dict, input_format, context_module="none"):
    cfg = small_cfg(
        ACM_R50,
        "MODEL.CONTEXT_MODULE",
        context_module,
        "MODEL.RESNETS.OUT_FEATURES",
        STAGES,
        *torchvision_config(state_dict, input_format),
    )
    return build_acm_resnet_backbone(cfg, ShapeSpec(channels=3)).eval(), cfg


@pytest.mark.parametrize(
    "arch, input_format",
    [("resnet50", "BGR"), ("resnet50", "RGB"), ("resnet18", "BGR"), ("resnext101_32x8d", "BGR")],
)
def test_converted_trunk_gives_torchvision_features(arch, input_format):
    tv = random_torchvision(arch)
    converted = convert_torchvision_state_dict(tv.state_dict(), input_format)
    ours, cfg = our_backbone(tv.state_dict(), input_format)
    assert set(converted) == set(
        ours.state_dict()
    )  # every trunk tensor maps, nothing else is needed
    ours.load_state_dict(converted)

    # One RGB 0-255 image, fed as each library expects it.
    rgb = torch.rand(1, 3, 72, 88) * 255
    tv_input = normalize(rgb / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    image = rgb.flip(1) if cfg.INPUT.FORMAT == "BGR" else rgb
    our_input = (image - torch.tensor(cfg.MODEL.PIXEL_MEAN)[:, None, None]) / torch.tensor(
        cfg.MODEL.PIXEL_STD
    )[:, None, None]
    with torch.no_grad():
        expected, got = torchvision_features(tv, tv_input), ours(our_input)
    for stage in STAGES:
        scale = expected[stage].abs().max()
        torch.testing.assert_close(
            got[stage], expected[stage], rtol=1e-4, atol=1e-4 * max(1.0, float(scale))
        )


def test_config_values_read_from_the_tensors():
    def opts(arch):
        return dict(zip(*[iter(torchvision_config(random_torchvision(arch).state_dict()))] * 2))

    r50, x101 = opts("resnet50"), opts("resnext101_32x8d")
    assert (
        r50["MODEL.RESNETS.DEPTH"],
        r50["MODEL.RESNETS.NUM_GROUPS"],
        r50["MODEL.RESNETS.WIDTH_PER_GROUP"],
    ) == (50, 1, 64)
    assert (
        x101["MODEL.RESNETS.DEPTH"],
        x101["MODEL.RESNETS.NUM_GROUPS"],
        x101["MODEL.RESNETS.WIDTH_PER_GROUP"],
    ) == (101, 32, 8)
    assert r50["MODEL.RESNETS.STRIDE_IN_1X1"] is False and r50["INPUT.FORMAT"] == "BGR"
    assert r50["MODEL.PIXEL_MEAN"] == [103.53, 116.28, 123.675] and r50["MODEL.PIXEL_STD"] == [
        57.375,
        57.12,
        58.395,
    ]


def test_acm_backbone_misses_only_acm_keys():
    tv = random_torchvision("resnet50")
    ours, _ = our_backbone(tv.state_dict(), "BGR", context_module="ACM")
    incompatible = ours.load_state_dict(
        convert_torchvision_state_dict(tv.state_dict()), strict=False
    )
    assert not incompatible.unexpected_keys
    assert incompatible.missing_keys and all(".context." in k for k in incompatible.missing_keys)
    assert len(incompatible.missing_keys) == 16 * 8  # 16 ACMs x 4 convs x (weight, bias)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key 'head.weight'"):
        convert_torchvision_state_dict(
            {"conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(1)}
        )


def test_tool_writes_a_pkl_that_a_full_acm_model_loads_by_name_matching(tmp_path):
    tv = random_torchvision("resnet18")
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    result = subprocess.run(
        [sys.executable, CONVERT, str(tmp_path / "resnet18.pth"), str(tmp_path / "r18.pkl")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "MODEL.RESNETS.STRIDE_IN_1X1 False" in result.stdout
    with open(tmp_path / "r18.pkl", "rb") as f:
        converted = pickle.load(f)["model"]

    model = build_model(small_cfg(ACM_R50, *torchvision_config(tv.state_dict())))
    DetectionCheckpointer(model).load(str(tmp_path / "r18.pkl"))
    state = model.state_dict()
    for key, value in converted.items():
        torch.testing.assert_close(state[f"backbone.bottom_up.{key}"], torch.from_numpy(value))
