"""The Python (LazyConfig) configs: they build the yaml configs' models, and tools/lazyconfig_train_net.py
trains and evaluates them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import META_ARCH_REGISTRY

from acm_d2.layers import AttendAndCompare
from conftest import CONFIGS, REPO, small_cfg

TOOL = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
TWINS = [
    ("lazy/mask_rcnn_R_50_FPN_1x.py", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"),
    (
        "lazy/mask_rcnn_acm_R_50_FPN_1x.py",
        "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml",
    ),
]


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lazy, yaml", TWINS)
def test_lazy_and_yaml_configs_build_the_same_model(lazy, yaml):
    cfg = small_cfg(yaml)
    lazy_cfg = LazyConfig.load(os.path.join(CONFIGS, lazy))
    with torch.device("meta"):  # structure only: no weight init, no memory
        from_yaml = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        from_lazy = instantiate(lazy_cfg.model)
    assert type(from_lazy) is type(from_yaml)
    assert shapes(from_lazy) == shapes(from_yaml)

    def acms(m):
        return [
            (n, m.variant, m.num_groups)
            for n, m in m.named_modules()
            if isinstance(m, AttendAndCompare)
        ]

    assert acms(from_lazy) == acms(from_yaml)
    if hasattr(from_yaml, "orth_loss"):
        assert (from_lazy.orth_loss.weight, from_lazy.orth_loss.mode) == (
            from_yaml.orth_loss.weight,
            from_yaml.orth_loss.mode,
        )

    def frozen(m):
        return sorted(n for n, p in m.named_parameters() if not p.requires_grad)

    assert frozen(from_lazy) == frozen(from_yaml)  # FREEZE_AT 2: the stem and res2 (not their ACMs)
    assert (
        lazy_cfg.train.max_iter == cfg.SOLVER.MAX_ITER
        and lazy_cfg.optimizer.lr == cfg.SOLVER.BASE_LR
    )


# The ACM lazy config made small for 2 CPU cores, as tests/test_train_net.py does with yaml: ACM R-18
# with GroupNorm at 96 px on the generated dataset.
SMALL_CONFIG = """
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L, LazyConfig

_cfg = LazyConfig.load({config!r})
model, dataloader, optimizer, lr_multiplier, train = (_cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.lr_multiplier, _cfg.train)
model.backbone.bottom_up.stem.norm = "GN"
model.backbone.bottom_up.stages.update(depth=18, norm="GN")
model.backbone.norm = "GN"
model.roi_heads.update(num_classes=2, batch_size_per_image=64)
model.proposal_generator.post_nms_topk = (100, 100)
dataloader.train.dataset.names = "tiny_train"
dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=(96,), max_size=96, sample_style="choice")]
dataloader.train.update(total_batch_size=2, num_workers=0)
dataloader.test.dataset.names = "tiny_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=96)]
dataloader.test.num_workers = 0
optimizer.lr = 0.005
train.update(init_checkpoint="", max_iter=3, eval_period=0, log_period=1, device="cpu")
train.checkpointer.period = 1000
"""


def test_lazy_acm_config_trains_and_evaluates_on_the_cpu(tiny_dataset, tmp_path):
    config = tmp_path / "small_acm.py"
    config.write_text(
        SMALL_CONFIG.format(config=os.path.join(CONFIGS, "lazy", "mask_rcnn_acm_R_50_FPN_1x.py"))
    )
    cmd = [sys.executable, TOOL, "--config-file", str(config)]
    for split, (json_file, image_root) in tiny_dataset.items():
        cmd += ["--coco-dataset", f"tiny_{split}", json_file, image_root]
    cmd += [f"train.output_dir={tmp_path / 'out'}", "train.seed=1"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    with open(tmp_path / "out" / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows if "loss_acm_orth" in r] == [0, 1, 2]
    assert (tmp_path / "out" / "model_final.pth").exists()
    assert "Evaluation results for bbox" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    # The checkpoint carries ExactResumeHook's state, as tools/train_net.py's does.
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert final["trainer"]["hooks"]["ExactResumeHook"]["seed"] == 1
    assert "loss_acm_orth" in final["trainer"]["hooks"]["ExactResumeHook"]["history"]


def test_step_trainers_of_both_tools_stop_on_a_non_finite_loss():
    """tools/lazyconfig_train_net.py and the Trainer take their step trainer from build_step_trainer."""
    from acm_d2.engine import NonFiniteLossError, build_step_trainer

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = build_step_trainer(model, [], optimizer)
    trainer.iter = 7
    losses = {"loss_cls": torch.tensor(0.5), "loss_acm_orth": torch.tensor(float("inf"))}
    with pytest.raises(
        NonFiniteLossError, match=r"iteration 7: loss_acm_orth = inf.*loss_cls = 0\.5"
    ):
        trainer._write_metrics(losses, 0.0)


def test_context_builder_validates_as_a_yaml_config_does():
    from acm_d2.modeling import context_builder

    with pytest.raises(ValueError, match="MODEL.ACM.VARIANT"):
        context_builder("ACM", ACM=dict(VARIANT="PX"))
    with pytest.raises(KeyError, match="no such node"):
        context_builder("ACM", FOO=dict(X=1))
    se = context_builder("SE", SE=dict(STAGES=["res5"]))
    assert (
        se("res4", 0, 6, 1024) is None
        and se("res5", 2, 3, 2048).__class__.__name__ == "SqueezeExcite"
    )
