"""Every shipped yaml config: the paper's matrix is complete, each file builds the model its name says
(context module, placement, meta-architecture, ablation knob) and trains one step."""

import glob
import os
import re

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import EventStorage

from acm_d2.layers import (
    AttendAndCompare,
    CrissCrossAttention,
    GlobalContext,
    NonLocal2d,
    SqueezeExcite,
)
from acm_d2.modeling.backbone import NUM_BLOCKS_PER_STAGE
from acm_d2.modeling.meta_arch import OrthogonalLoss
from conftest import CONFIGS, small_cfg, training_batch

SHIPPED = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
# The model-zoo style configs, named <model>_[<module>_]<backbone>_..._1x; the demo's own config
# (configs/Demo/, trained by tests/test_demo.py) is named after its dataset instead.
MODEL_ZOO = [c for c in SHIPPED if not c.startswith("Demo/")]

BACKBONES = ("R_50", "R_101", "X_101_32x8d")
# Table 6: {none, SE, NL, CC, ACM} x {R-50, R-101, X-101}, plus GC (not in the table) for a one-key comparison.
TABLE_6 = [
    f"COCO-InstanceSegmentation/mask_rcnn_{module}{backbone}_FPN_1x.yaml"
    for backbone in BACKBONES
    for module in ("", "se_", "nl_", "cc_", "acm_", "gc_")
]
# Table 2: (a) the four ACM variants, (b) the number of groups, (c) the orthogonal loss weight; R-50.
TABLE_2 = [
    f"ablations/mask_rcnn_acm_R_50_FPN_1x_{knob}.yaml"
    for knob in [f"variant_{v}" for v in ("full", "no_p", "p_only", "no_q")]
    + [f"groups_{g}" for g in (8, 32, 64, 128)]
    + [f"lambda_{w}" for w in ("0", "0p01", "0p1", "1")]
]
OTHER_MODELS = [
    "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x_official.yaml",
    "COCO-Detection/retinanet_acm_R_50_FPN_1x.yaml",
    "COCO-Detection/faster_rcnn_acm_R_50_FPN_1x.yaml",
    "COCO-Detection/faster_rcnn_acm_R_50_C4_1x.yaml",
    "Misc/cascade_mask_rcnn_acm_R_50_FPN_1x.yaml",
    "COCO-PanopticSegmentation/panoptic_fpn_acm_R_50_1x.yaml",
]

# <model>_[<module>_]<backbone>[_<neck>]_1x[_<suffix>], as Detectron2's model zoo plus the module.
NAME = re.compile(
    r"^(?P<model>mask_rcnn|faster_rcnn|retinanet|cascade_mask_rcnn|panoptic_fpn)_(?:(?P<module>acm|se|gc|nl|cc)_)?"
    r"(?P<backbone>R_50|R_101|X_101_32x8d)(?:_(?:FPN|C4))?_1x(?:_(?P<suffix>\w+))?$"
)
MODULE_TYPES = {
    "acm": AttendAndCompare,
    "se": SqueezeExcite,
    "gc": GlobalContext,
    "nl": NonLocal2d,
    "cc": CrissCrossAttention,
}
STAGES = ("res2", "res3", "res4", "res5")
BLOCK = re.compile(r"(?:^|\.)(res[2-5])\.(\d+)\.context$")


def expected_placement(module, backbone, suffix):
    """{stage: block indices} that the file name promises (each peer's paper placement; see config.py)."""
    blocks = dict(zip(STAGES, NUM_BLOCKS_PER_STAGE[50 if backbone == "R_50" else 101]))
    every = lambda stages: {s: list(range(blocks[s])) for s in stages}  # noqa: E731
    if module is None:
        return {}
    if module == "acm":
        return every(STAGES[1:] if suffix == "official" else STAGES)
    return {
        "se": every(STAGES),
        "gc": every(STAGES[1:]),
        "nl": {"res4": [blocks["res4"] - 2]},  # one block, before the last res4 block
        "cc": {"res4": [blocks["res4"] - 1]},  # after the last res4 block
    }[module]


def placement(model):
    """{module type name: {stage: block indices}} of every context module in the model (backbone and heads)."""
    found = {}
    for name, m in model.named_modules():
        for key, cls in MODULE_TYPES.items():
            if isinstance(m, cls):
                match = BLOCK.search(name)
                assert match, f"{key} module at an unexpected place: {name}"
                found.setdefault(key, {}).setdefault(match.group(1), []).append(int(match.group(2)))
    return found


def test_the_paper_matrix_and_other_models_are_shipped():
    missing = [c for c in TABLE_6 + TABLE_2 + OTHER_MODELS if c not in SHIPPED]
    assert not missing, f"configs missing: {missing}"
    # Every ACM model has its baseline next to it (the file its _BASE_ names).
    for config in OTHER_MODELS[1:]:
        assert config.replace("acm_", "") in SHIPPED


def test_every_shipped_config_name_is_parsed():
    unnamed = [c for c in MODEL_ZOO if not NAME.match(os.path.basename(c)[: -len(".yaml")])]
    assert not unnamed, f"names outside the <model>_[<module>_]<backbone>_..._1x scheme: {unnamed}"


@pytest.mark.parametrize("config", [c for c in SHIPPED if c.startswith(("COCO-", "ablations/"))])
def test_coco_configs_use_the_1x_schedule(config):
    cfg = small_cfg(config)
    base_lr = 0.01 if "retinanet" in config else 0.02  # Detectron2's RetinaNet LR
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (
        16,
        base_lr,
        90000,
    )
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    suffix = "_panoptic_separated" if "panoptic" in config else ""
    assert cfg.DATASETS.TRAIN == (f"coco_2017_train{suffix}",) and cfg.DATASETS.TEST == (
        f"coco_2017_val{suffix}",
    )


def parse(config):
    parts = NAME.match(os.path.basename(config)[: -len(".yaml")]).groupdict()
    return parts["module"], parts["backbone"], parts["suffix"] or ""


def build_structure(cfg):
    """The model of cfg on the meta device: every module and parameter shape, no memory, no init (~5x
    faster than build_model, which also initialises the weights)."""
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


@pytest.mark.parametrize("config", MODEL_ZOO)
def test_every_shipped_config_builds_what_its_name_says(config):
    module, backbone, suffix = parse(config)
    model = build_structure(small_cfg(config))
    assert placement(model) == (
        {module: expected_placement(module, backbone, suffix)} if module else {}
    )
    # ACM configs use an ACM<Base> meta-architecture (with the orthogonal loss); the others a plain one.
    assert isinstance(getattr(model, "orth_loss", None), OrthogonalLoss) == (module == "acm")
    acms = [m for m in model.modules() if isinstance(m, AttendAndCompare)]
    knob, _, value = suffix.partition("_")
    if knob == "variant":
        assert {m.variant for m in acms} == {value}
    elif knob == "groups":
        assert {m.num_groups for m in acms} == {int(value)}
    elif knob == "lambda":
        assert model.orth_loss.weight == float(value.replace("p", "."))


# Training runs each code path once on 2 CPU cores: every context module and ACM variant on R-50
# Mask R-CNN, and ACM in every other model. and the groups / lambda ablations change
# only sizes and numbers, which the test above checks; their blocks are the R-50 ones.
TRAINED = (
    [c for c in TABLE_6 if "_R_50_" in c]
    + [f"ablations/mask_rcnn_acm_R_50_FPN_1x_variant_{v}.yaml" for v in ("no_p", "p_only", "no_q")]
    + OTHER_MODELS
)


@pytest.mark.parametrize("config", TRAINED)
def test_representative_configs_train_one_step(config):
    cfg = small_cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage():
        losses = model(training_batch(size=64))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    # The loss is there when some ACM has both K and Q (not in the p_only and no_q variants).
    acms = [m for m in model.modules() if isinstance(m, AttendAndCompare)]
    assert ("loss_acm_orth" in losses) == any(m.has_orth_term for m in acms)


def test_impossible_group_count_is_a_clear_error():
    # G = 128 fits R-50 (res2: 256 channels, P's hidden width 128); R-18's res2 has 64 channels.
    cfg = small_cfg(
        "ablations/mask_rcnn_acm_R_50_FPN_1x_groups_128.yaml",
        "MODEL.RESNETS.DEPTH",
        18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        64,
    )
    with pytest.raises(
        ValueError,
        match=r"res2 block 0 \(64 channels\).*MODEL.ACM.*divisible by num_groups \(128\)",
    ):
        build_model(cfg)


def test_load_config_merges_the_overrides_and_falls_back_to_the_cpu(monkeypatch, caplog):
    from acm_d2.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = os.path.join(CONFIGS, "COCO-InstanceSegmentation", "mask_rcnn_acm_R_50_FPN_1x.yaml")
    cfg = load_config(config, ["MODEL.DEVICE", "cuda:1", "MODEL.ACM.NUM_GROUPS", "8"])
    assert cfg.MODEL.CONTEXT_MODULE == "ACM" and cfg.MODEL.ACM.NUM_GROUPS == 8
    assert cfg.MODEL.DEVICE == "cpu" and "CUDA is not available" in caplog.text
