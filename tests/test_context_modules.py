"""Choosing a context module with one key: placement, counts, identity at start, config validation."""

import pathlib
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import acm_d2
from acm_d2.config import PEER_MODULES, ContextModule, check_context_module_entry
from acm_d2.layers import (
    AttendAndCompare,
    CrissCrossAttention,
    GlobalContext,
    NonLocal2d,
    SqueezeExcite,
)
from acm_d2.modeling import is_block_selected
from acm_d2.modeling.context import add_context_module

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(module, depth=50, **node_values):
    """An R-50 (or R-18) FPN config with cfg.MODEL.CONTEXT_MODULE = module and its node updated."""
    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.BACKBONE.NAME = "build_acm_resnet_fpn_backbone"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CONTEXT_MODULE = module
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for key, value in node_values.items():
        cfg.MODEL[module][key] = value
    return cfg


def _contexts(backbone):
    """{block name: its context module}, e.g. {"res4.4": NonLocal2d(...)}."""
    return {
        name[len("bottom_up.") : -len(".context")]: module
        for name, module in backbone.named_modules()
        if name.endswith(".context")
    }


# ---------------------------------------------------------------- placement helper


@pytest.mark.parametrize(
    "stages, blocks, stage, block_index, expected",
    [
        (["res4"], [], "res4", 3, True),  # [] = every block
        (["res4"], [], "res3", 0, False),  # stage not listed
        (["res4"], [-2], "res4", 4, True),  # -2 of 6 blocks = block 4
        (["res4"], [-2], "res4", 5, False),
        (["res4"], [0, -1], "res4", 5, True),
        (["res3", "res4"], [1], "res3", 1, True),
    ],
)
def test_is_block_selected(stages, blocks, stage, block_index, expected):
    assert (
        is_block_selected("MODEL.NL", stages, blocks, stage, block_index, num_blocks=6) is expected
    )


@pytest.mark.parametrize("blocks", [[6], [-7], [0, 9]])
def test_block_index_out_of_range_names_the_key_and_range(blocks):
    with pytest.raises(
        ValueError,
        match=r"cfg\.MODEL\.NL\.BLOCKS = .* res4, which has 6 blocks; allowed: indices from -6 to 5",
    ):
        is_block_selected("MODEL.NL", ["res4"], blocks, "res4", 0, num_blocks=6)


# ---------------------------------------------------------------- counts in built backbones

R50_PLACEMENTS = {
    # module: (layer class, number of modules, the blocks that hold them)
    "SE": (
        SqueezeExcite,
        16,
        [f"res{s}.{i}" for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3)) for i in range(n)],
    ),
    "GC": (
        GlobalContext,
        13,
        [f"res{s}.{i}" for s, n in zip((3, 4, 5), (4, 6, 3)) for i in range(n)],
    ),
    "NL": (NonLocal2d, 1, ["res4.4"]),  # the block before the last of res4's 6
    "CC": (CrissCrossAttention, 1, ["res4.5"]),
    "ACM": (
        AttendAndCompare,
        16,
        [f"res{s}.{i}" for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3)) for i in range(n)],
    ),
}


@pytest.mark.parametrize("module", sorted(R50_PLACEMENTS))
def test_r50_fpn_default_placement(module):
    layer_class, count, expected_blocks = R50_PLACEMENTS[module]
    backbone = build_backbone(_cfg(module))
    contexts = _contexts(backbone)
    assert len(contexts) == count and sorted(contexts) == sorted(expected_blocks)
    assert all(type(m) is layer_class for m in contexts.values())
    # FREEZE_AT = 2 freezes the stem and res2, never a context module inside them.
    assert all(p.requires_grad for m in contexts.values() for p in m.parameters())
    features = backbone(torch.randn(1, 3, 64, 64))
    assert features["p2"].shape == (1, 256, 16, 16)


def test_empty_blocks_select_every_block_of_the_stages():
    contexts = _contexts(build_backbone(_cfg("NL", BLOCKS=[])))
    assert sorted(contexts) == [f"res4.{i}" for i in range(6)]


def test_peer_options_reach_the_layers():
    cc = _contexts(
        build_backbone(_cfg("CC", RECURRENCE=3, REDUCTION=4, STAGES=["res5"], BLOCKS=[0]))
    )
    assert list(cc) == ["res5.0"] and (
        cc["res5.0"].recurrence,
        cc["res5.0"].query.out_channels,
    ) == (3, 512)
    gc = _contexts(build_backbone(_cfg("GC", RATIO=0.25, STAGES=["res3"], BLOCKS=[-1])))
    assert list(gc) == ["res3.3"] and gc["res3.3"].transform[0].out_channels == 128
    se = _contexts(build_backbone(_cfg("SE", REDUCTION=4, STAGES=["res2"])))
    assert se["res2.0"].fc1.out_channels == 64


@pytest.mark.parametrize(
    "module, expected",
    [
        ("SE", {f"res{s}.{i}": 64 * 2 ** (s - 2) for s in (2, 3, 4, 5) for i in (0, 1)}),
        ("GC", {f"res{s}.{i}": 64 * 2 ** (s - 2) for s in (3, 4, 5) for i in (0, 1)}),
        ("NL", {"res4.0": 256}),
        ("CC", {"res4.1": 256}),
    ],
)
def test_r18_basic_blocks_place_peers_with_64_to_512_channels(module, expected):
    backbone = build_backbone(_cfg(module, depth=18))
    assert {name: m.channels for name, m in _contexts(backbone).items()} == expected
    backbone(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("module", ["GC", "NL", "CC"])
def test_identity_initialised_peers_leave_a_plain_backbone_unchanged(module):
    """Loading plain-ResNet weights into a GC/NL/CC backbone gives the same features at step 0."""
    torch.manual_seed(0)
    plain = build_backbone(_cfg("none")).eval()
    with_peer = build_backbone(_cfg(module)).eval()
    missing, unexpected = with_peer.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(".context." in key for key in missing) and not unexpected
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = plain(x), with_peer(x)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "SE.REDUCTION",
            0,
            r"cfg\.MODEL\.SE\.REDUCTION = 0 is invalid; allowed: a positive integer",
        ),
        (
            "SE.STAGES",
            ["res6"],
            r"cfg\.MODEL\.SE\.STAGES = \['res6'\] is invalid; allowed: distinct names among",
        ),
        ("GC.STAGES", ["res3", "res3"], r"cfg\.MODEL\.GC\.STAGES = \['res3', 'res3'\] is invalid"),
        (
            "GC.RATIO",
            0.0,
            r"cfg\.MODEL\.GC\.RATIO = 0\.0 is invalid; allowed: a number in \(0, 1\]",
        ),
        ("GC.RATIO", 2, r"cfg\.MODEL\.GC\.RATIO = 2 is invalid"),
        (
            "NL.BLOCKS",
            ["last"],
            r"cfg\.MODEL\.NL\.BLOCKS = \['last'\] is invalid; allowed: a list of block indices",
        ),
        ("CC.BLOCKS", [1.5], r"cfg\.MODEL\.CC\.BLOCKS = \[1\.5\] is invalid"),
        (
            "CC.RECURRENCE",
            0,
            r"cfg\.MODEL\.CC\.RECURRENCE = 0 is invalid; allowed: a positive integer",
        ),
        ("CC.REDUCTION", -8, r"cfg\.MODEL\.CC\.REDUCTION = -8 is invalid"),
    ],
)
def test_invalid_peer_values_name_key_value_and_allowed(key, value, message):
    cfg = _cfg("SE")
    node, leaf = key.split(".")
    cfg.MODEL[node][leaf] = value
    with pytest.raises(ValueError, match=message):
        acm_d2.validate_acm_config(cfg)


def test_block_index_out_of_range_for_the_depth_fails_at_build_naming_the_key():
    cfg = _cfg("NL", depth=18, BLOCKS=[-3])  # R-18's res4 has 2 blocks
    with pytest.raises(
        ValueError, match=r"cfg\.MODEL\.NL\.BLOCKS = \[-3\] is invalid for res4, which has 2 blocks"
    ):
        build_backbone(cfg)


def test_layer_error_at_build_says_which_block_and_node():
    cfg = _cfg("SE", depth=18, REDUCTION=128)  # res2 of R-18 has 64 channels
    with pytest.raises(
        ValueError,
        match=r"'SE' for res2 block 0 \(64 channels\) from cfg\.MODEL\.SE: SqueezeExcite needs",
    ):
        build_backbone(cfg, ShapeSpec(channels=3))


def test_unknown_context_module_lists_the_peers():
    cfg = _cfg("SE")
    cfg.MODEL.CONTEXT_MODULE = "se"
    with pytest.raises(ValueError, match=r"allowed: \['ACM', 'CC', 'GC', 'NL', 'SE', 'none'\]"):
        build_backbone(cfg)


# A new context module the documented way (docs/configs.md, "Adding a context module"): a layer (in the
# repository: a file in acm_d2/layers) and one ContextModule entry. Run apart: the registry keeps it.
ADD_A_MODULE = """
import pytest, torch
from torch import nn
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from acm_d2.config import ContextModule, _check_positive_int, add_acm_config, validate_acm_config
from acm_d2.modeling import context_builder
from acm_d2.modeling.context import add_context_module

class Toy(nn.Module):
    def __init__(self, channels, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels, 1, 1), float(scale)))
    def forward(self, x):
        return x * self.scale

add_context_module("TOY", ContextModule(
    build=lambda node, channels: Toy(channels, node.SCALE),
    defaults=dict(SCALE=2, STAGES=["res4", "res5"], BLOCKS=[-1]),
    checks=dict(SCALE=_check_positive_int),
))
cfg = get_cfg()
add_acm_config(cfg)
assert cfg.MODEL.TOY.SCALE == 2 and cfg.MODEL.TOY.BLOCKS == [-1]
cfg.merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_acm_resnet_fpn_backbone", "MODEL.DEVICE", "cpu",
                     "MODEL.CONTEXT_MODULE", "TOY", "MODEL.TOY.SCALE", 3])
toys = {n: m for n, m in build_backbone(cfg).named_modules() if isinstance(m, Toy)}
assert sorted(toys) == ["bottom_up.res4.5.context", "bottom_up.res5.2.context"], sorted(toys)
assert all(float(m.scale[0]) == 3 for m in toys.values())
cfg.MODEL.TOY.SCALE = 0
with pytest.raises(ValueError, match=r"cfg\\.MODEL\\.TOY\\.SCALE = 0 is invalid"):
    validate_acm_config(cfg)
assert isinstance(context_builder("TOY", TOY=dict(SCALE=5))("res5", 2, 3, 8), Toy)
print("TOY-OK")
"""


def test_a_new_context_module_is_one_table_entry():
    proc = subprocess.run(
        [sys.executable, "-c", ADD_A_MODULE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0 and "TOY-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "name, defaults, checks, message",
    [
        ("ACM", dict(STAGES=[], BLOCKS=[]), {}, "name 'ACM' is invalid"),
        ("toy", dict(STAGES=[], BLOCKS=[]), {}, "name 'toy' is invalid"),
        ("TOY", dict(STAGES=[]), {}, r"lack \['BLOCKS'\]"),
        ("TOY", dict(STAGES=[], BLOCKS=[]), dict(SCALE=print), r"does not have \['SCALE'\]"),
    ],
)
def test_a_context_module_entry_that_cannot_work_is_refused(name, defaults, checks, message):
    entry = ContextModule(build=lambda node, channels: None, defaults=defaults, checks=checks)
    with pytest.raises(ValueError, match=message):
        check_context_module_entry(name, entry)


def test_an_existing_context_module_name_is_refused():
    with pytest.raises(ValueError, match="'SE' exists already"):
        add_context_module("SE", PEER_MODULES["SE"])


def test_acm_backbone_built_where_the_meta_architecture_drops_the_loss_warns(caplog):
    """A backbone may be built on its own, so the builder warns; tools/train_net.py refuses (test_engine_errors)."""
    cfg = _cfg("ACM")  # MODEL.META_ARCHITECTURE: the plain GeneralizedRCNN
    with caplog.at_level("WARNING", logger="acm_d2"):
        build_backbone(cfg)
    assert any(
        "ORTH_LOSS_WEIGHT" in r.getMessage() and "vanish" in r.getMessage() for r in caplog.records
    )


def _saved_bytes_and_grads(cfg):
    """Bytes of the distinct storages autograd keeps for backward over one training forward of the
    backbone, and the gradients of a loss using every output and the ACMs' orthogonality terms."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg).train()
    x = torch.randn(2, 3, 64, 64)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = backbone(x)
        loss = sum((f * f).mean() for f in features.values())
        loss = loss + sum(m.orth_term.sum() for m in _contexts(backbone).values())
    params = [p for p in backbone.parameters() if p.requires_grad]
    return sum(storages.values()), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_context_recompute_keeps_less_for_backward_and_gives_the_same_gradients(impl):
    cfg = _cfg("ACM")
    cfg.MODEL.ACM.IMPL = impl
    kept, grads = _saved_bytes_and_grads(cfg)
    cfg.MODEL.CONTEXT_RECOMPUTE = True
    kept_recomputed, grads_recomputed = _saved_bytes_and_grads(cfg)
    for a, b in zip(grads, grads_recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # At least the conv3 (+ norm) output of every one of the 16 blocks is no longer kept.
    block_outputs = sum(
        2 * c * (64 // s) ** 2 * 4
        for c, s, n in ((256, 4, 3), (512, 8, 4), (1024, 16, 6), (2048, 32, 3))
        for _ in range(n)
    )
    assert kept - kept_recomputed >= block_outputs, (kept, kept_recomputed, block_outputs)
