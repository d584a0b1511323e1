"""Attention maps (acm_d2/visualization, tools/visualize_attention.py) and loss curves on a tiny model."""

import json
import os
import re

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from torch.nn import functional as F

from acm_d2.layers import AttendAndCompare
from acm_d2.visualization import (
    acm_modules,
    capture_attention,
    plot_loss_curve,
    resolve_modules,
    select_groups,
)
from conftest import REPO, import_tool, small_cfg

DEMO_CONFIG = "Demo/mask_rcnn_acm_R_18_FPN_synthetic.yaml"
TINY = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96]


def load_tool():
    return import_tool("visualize_attention")


def softmax_reference(x, conv, groups):
    """The K (or Q) attention written directly: per group, softmax over H*W of the grouped 1x1 conv's logits."""
    logits = F.conv2d(x, conv.weight, conv.bias, groups=groups)  # B x G x H x W
    return logits.flatten(2).softmax(-1).view_as(logits)


@pytest.mark.parametrize("variant", ["full", "no_q"])
def test_attention_maps_are_the_softmax_attention_of_the_module(variant):
    torch.manual_seed(0)
    m = AttendAndCompare(16, num_groups=4, variant=variant).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    maps = m.attention_maps(x)
    assert sorted(maps) == (["K", "Q"] if variant == "full" else ["K"])
    torch.testing.assert_close(
        maps["K"], softmax_reference(x, m.k_logits, 4), rtol=1e-12, atol=1e-12
    )
    if variant == "full":
        torch.testing.assert_close(
            maps["Q"], softmax_reference(x, m.q_logits, 4), rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(maps["K"].sum((2, 3)), torch.ones(2, 4, dtype=torch.float64))
    assert AttendAndCompare(16, num_groups=4, variant="p_only").attention_maps(x.float()) == {}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(small_cfg(DEMO_CONFIG, "MODEL.ACM.NUM_GROUPS", 8, *TINY)).eval()


def test_captured_maps_equal_a_direct_computation_on_the_module_input(tiny_model):
    name = resolve_modules(tiny_model, ["res4.1"])[0]
    module = dict(tiny_model.named_modules())[name]
    inputs = []
    hook = module.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].detach()))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    try:
        raw = capture_attention(tiny_model, image, [name], 64, 96, resize=False)[name]
    finally:
        hook.remove()
    (x,) = inputs
    for head, conv in (("K", module.k_logits), ("Q", module.q_logits)):
        np.testing.assert_allclose(
            raw[head], softmax_reference(x, conv, 8)[0].detach().numpy(), rtol=1e-5, atol=1e-7
        )
    full = capture_attention(tiny_model, image, [name], 64, 96)[name]
    assert full["K"].shape == (8, 64, 64)
    np.testing.assert_allclose(full["K"].sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_groups_are_chosen_by_overlap_with_the_ground_truth():
    maps = {"K": np.zeros((3, 4, 4)), "Q": np.zeros((3, 4, 4))}
    maps["K"][:, 3, 3] = 1  # every K group looks at the corner
    maps["Q"][2, 0, 0] = 1  # Q of group 2 looks at the object
    maps["Q"][[0, 1], 3, 3] = 1
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert select_groups([maps], [mask], top=1) == [2]


def test_module_names_resolve_by_suffix_and_unknown_names_fail(tiny_model):
    names = list(acm_modules(tiny_model))
    assert resolve_modules(tiny_model, None) == [n for n in names if ".res4." in n][-1:]
    assert resolve_modules(tiny_model, ["res3.0.context"]) == ["backbone.bottom_up.res3.0.context"]
    with pytest.raises(ValueError, match="res9.0.*matches no ACM module.*res2.0"):
        resolve_modules(tiny_model, ["res9.0"])
    plain = build_model(small_cfg(DEMO_CONFIG, "MODEL.CONTEXT_MODULE", "none", *TINY))
    with pytest.raises(ValueError, match="no ACM module"):
        acm_modules(plain)


@pytest.fixture(scope="module")
def tool_setup(tiny_model, tiny_dataset, tmp_path_factory):
    """A checkpoint of the tiny model and two validation images of the tiny dataset."""
    root = tmp_path_factory.mktemp("vis")
    weights = str(root / "model.pth")
    torch.save({"model": tiny_model.state_dict()}, weights)
    json_file, image_root = tiny_dataset["val"]
    images = [os.path.join(image_root, n) for n in sorted(os.listdir(image_root))[:2]]
    config = os.path.join(REPO, "configs", DEMO_CONFIG)
    return config, weights, images, json_file, root


def run_tool(config, weights, images, output, *extra, opts=()):
    argv = [
        "--config-file",
        config,
        "--weights",
        weights,
        "--input",
        *images,
        "--output",
        str(output),
        "--device",
        "cpu",
        *extra,
    ]
    load_tool().main(argv + ["--opts", "MODEL.ACM.NUM_GROUPS", "8", *map(str, TINY), *opts])


def test_tool_writes_one_png_per_image_with_groups_by_overlap(tool_setup, capsys):
    config, weights, images, json_file, root = tool_setup
    run_tool(
        config,
        weights,
        images,
        root / "by_overlap",
        "--annotations",
        json_file,
        "--top",
        "2",
        "--module",
        "res3.1",
        "res4.1",
    )
    for path in images:
        assert (root / "by_overlap" / (os.path.basename(path)[:-4] + "_attention.png")).exists()
    assert "res3.1, res4.1, groups" in capsys.readouterr().out
    run_tool(config, weights, images[:1], root / "fixed", "--group", "0", "7")
    assert len(os.listdir(root / "fixed")) == 1


def test_tool_errors_name_the_problem(tool_setup, tmp_path):
    config, weights, images, _json_file, _root = tool_setup
    cases = [  # (weights, images, flags, opts, message)
        (
            weights,
            [str(tmp_path / "missing.png")],
            (),
            (),
            "input image .*missing.png.* does not exist",
        ),
        (str(tmp_path / "none.pth"), images, (), (), "weights .*none.pth.* does not exist"),
        (weights, images, (), ("MODEL.CONTEXT_MODULE", "none"), "no ACM module"),
        (weights, images, ("--module", "res7.3"), (), "res7.3.*matches no ACM module"),
    ]
    _check_tool_errors(config, images, tmp_path / "out", cases)


def _check_tool_errors(config, images, output, cases):
    for w, ims, flags, opts, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_tool(config, w, ims, output, *flags, opts=opts)
        assert exit_info.value.code not in (0, None)
        assert re.search(message, str(exit_info.value)), str(exit_info.value)


def test_tool_refuses_weights_that_leave_parameters_random_and_an_output_file(
    tool_setup, tiny_model, tmp_path
):
    """Weights without ACM parameters (a baseline checkpoint) or of another NUM_GROUPS would draw the maps
    of randomly initialised ACMs; the tool loads with train_net's checking loader and refuses them."""
    config, weights, images, _json_file, _root = tool_setup
    baseline = str(tmp_path / "baseline.pth")
    torch.save(
        {"model": {k: v for k, v in tiny_model.state_dict().items() if ".context." not in k}},
        baseline,
    )
    (tmp_path / "a_file").write_text("")
    cases = [
        (
            baseline,
            images,
            (),
            (),
            r"baseline\.pth.*does not hold \d+ parameters.*context-module \(ACM\)",
        ),
        (
            weights,
            images,
            (),
            ("MODEL.ACM.NUM_GROUPS", "4"),
            r"model\.pth.*tensors have another shape.*context",
        ),
    ]
    _check_tool_errors(config, images, tmp_path / "out", cases)
    assert not (tmp_path / "out").exists()  # refused before anything was drawn
    _check_tool_errors(
        config,
        images,
        tmp_path / "a_file",
        [(weights, images, (), (), r"--output .*a_file.* is a file")],
    )


def test_loss_curve_from_metrics_json(tmp_path):
    metrics = tmp_path / "metrics.json"
    rows = [
        {"iteration": i, "total_loss": 2.0 / (i + 1), "loss_cls": 1.0 / (i + 1), "lr": 0.01}
        for i in range(0, 40, 20)
    ]
    metrics.write_text(
        "\n".join(json.dumps(r) for r in rows + [{"iteration": 39, "bbox/AP": 1.0}]) + "\n"
    )
    assert plot_loss_curve(str(metrics), str(tmp_path / "loss.png")) == ["loss_cls", "total_loss"]
    assert cv2.imread(str(tmp_path / "loss.png")) is not None
    metrics.write_text(json.dumps({"iteration": 1, "lr": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no total_loss or loss_"):
        plot_loss_curve(str(metrics), str(tmp_path / "x.png"))


def test_visualize_attention_takes_trailing_overrides_and_opts():
    parse = load_tool().parse_args
    base = ["--config-file", "c.yaml", "--weights", "w.pth", "--input", "a.png", "--output", "vis"]
    trailing, flag = (
        parse([*base, "MODEL.ACM.NUM_GROUPS", "8"]),
        parse([*base, "--opts", "MODEL.ACM.NUM_GROUPS", "8"]),
    )
    assert trailing.opts == flag.opts == ["MODEL.ACM.NUM_GROUPS", "8"]
