import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from acm_d2.checkpoint.official import OFFICIAL_TO_ACM_D2, convert_official_state_dict
from acm_d2.layers import AttendAndCompare
from conftest import REPO, small_cfg

OFFICIAL = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x_official.yaml"
CONVERT = os.path.join(REPO, "tools", "convert_official_acm.py")


class AuthorsStyleACM(nn.Module):
    """The module as the authors' checkpoint lays it out (add_mod = K, sub_mod = Q, mul_mod = P), computing
    ACM as the authors' code does (docs/configs.md, where their code differs): logits on the
    mean-subtracted input, K - Q added to x."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.groups = groups
        self.add_mod = nn.Module()
        self.add_mod.map_gen = nn.Sequential(nn.Conv2d(channels, groups, 1, groups=groups))
        self.sub_mod = nn.Module()
        self.sub_mod.map_gen = nn.Sequential(nn.Conv2d(channels, groups, 1, groups=groups))
        self.mul_mod = nn.Module()
        self.mul_mod.feature_gen = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1, groups=groups),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 1, groups=groups),
        )

    def pool(self, xm, map_gen):
        B, C, H, W = xm.shape
        attn = map_gen(xm).view(B, self.groups, 1, H * W).softmax(-1)
        return (xm.view(B, self.groups, C // self.groups, H * W) * attn).sum(-1).view(B, C, 1, 1)

    def forward(self, x):
        mu = x.mean((2, 3), keepdim=True)
        xm = x - mu
        k, q = self.pool(xm, self.add_mod.map_gen), self.pool(xm, self.sub_mod.map_gen)
        return torch.sigmoid(self.mul_mod.feature_gen(mu)) * (x + k - q), (k * q).sum(
            (1, 2, 3)
        ) / x.shape[1]


def to_official_layout(state_dict):
    inverse = {v: k for k, v in OFFICIAL_TO_ACM_D2.items()}
    out = {}
    for key, value in state_dict.items():
        for ours, theirs in inverse.items():
            key = key.replace(ours, theirs)
        out[key] = value
    return out


def test_authors_layout_maps_onto_a_module_computing_the_same_function():
    torch.manual_seed(0)
    ours = AttendAndCompare(64, num_groups=8).double().train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    theirs = AuthorsStyleACM(64, groups=8).double()
    official = to_official_layout({"res5.0.context." + k: v for k, v in ours.state_dict().items()})
    theirs.load_state_dict({k.removeprefix("res5.0.module."): v for k, v in official.items()})
    x = torch.randn(2, 64, 6, 5, dtype=torch.float64)
    y_theirs, d_theirs = theirs(x)
    torch.testing.assert_close(ours(x), y_theirs)
    torch.testing.assert_close(ours.orth_term, d_theirs)


def test_converter_round_trip_loads_with_no_missing_or_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    source = build_model(small_cfg(OFFICIAL)).eval()
    official = to_official_layout(source.state_dict())
    assert any(".module.add_mod.map_gen.0.weight" in k for k in official)
    torch.save({"model": official, "iteration": 89999}, tmp_path / "official.pth")
    subprocess.run(
        [sys.executable, CONVERT, str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")],
        check=True,
    )

    torch.manual_seed(1)
    target = build_model(small_cfg(OFFICIAL)).eval()

    class RecordingCheckpointer(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = RecordingCheckpointer(target)
    extra = checkpointer.load(str(tmp_path / "ours.pth"))
    assert (
        not checkpointer.incompatible.missing_keys and not checkpointer.incompatible.unexpected_keys
    )
    assert "iteration" not in extra
    image = {"image": torch.rand(3, 96, 96) * 255, "height": 96, "width": 96}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.backbone(x), source.backbone(x))
        a, b = target([image])[0]["instances"], source([image])[0]["instances"]
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_converter_rejects_a_checkpoint_without_acm_keys(tmp_path):
    torch.save(
        {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "plain.pth"
    )
    result = subprocess.run(
        [sys.executable, CONVERT, str(tmp_path / "plain.pth"), str(tmp_path / "out.pth")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no ACM key" in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_converter_reports_a_truncated_file(tmp_path):
    torch.save(
        {"model": {"x.module.add_mod.map_gen.0.weight": torch.zeros(100)}}, tmp_path / "full.pth"
    )
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    result = subprocess.run(
        [sys.executable, CONVERT, str(tmp_path / "cut.pth"), str(tmp_path / "out.pth")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "cannot read" in result.stderr and "cut.pth" in result.stderr


def test_unknown_module_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key"):
        convert_official_state_dict({"res3.0.module.something.weight": torch.zeros(1)})
