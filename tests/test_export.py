"""Deployment of ACM models through Detectron2's paths: TorchScript scripting and tracing, ONNX (both
exporters, checked with onnxruntime), torch.export, fvcore's FLOP counter; with the default ACM impl,
whose fused op must never reach a saved graph."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.modeling import build_backbone, build_model

from acm_d2.export import (
    DetectionLimits,
    compare_outputs,
    onnx_bytes,
    run_onnx,
    script_model,
    scripted_outputs,
    traceable_model,
)
from acm_d2.layers import (
    AttendAndCompare,
    CrissCrossAttention,
    GlobalContext,
    NonLocal2d,
    SqueezeExcite,
)
from acm_d2.layers.acm import ACM_VARIANTS
from conftest import calm_attention, small_cfg

R18 = (
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.ROI_HEADS.NUM_CLASSES",
    3,
    "MODEL.RETINANET.NUM_CLASSES",
    3,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    0.0,
    "TEST.DETECTIONS_PER_IMAGE",
    20,
)
MASK_RCNN_FPN = "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml"
# An exported ACM computes what the eager one computes on the CPU with the same operators (the fused op's
# torch backend, or the reference), so TorchScript agrees with eager exactly; onnxruntime's kernels round
# differently, which a random-weight detector amplifies (boxes to 0.05 pixel, the rest to 2e-3).


def _assert_detections_close(actual, expected, tolerance=0.05):
    comparison = compare_outputs(expected, actual)
    assert comparison.passes(tolerance), comparison


def _model(config_file, *opts):
    torch.manual_seed(0)
    return build_model(small_cfg(config_file, *R18, *opts)).eval()


def _image(height=96, width=128):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 255


class _FlatBackbone(torch.nn.Module):
    """A backbone's feature dict as a tuple, which every exporter takes."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return tuple(self.backbone(images).values())


def _flat_backbone(config_file=MASK_RCNN_FPN):
    torch.manual_seed(0)
    return _FlatBackbone(build_backbone(small_cfg(config_file, *R18))).eval()


def _acm_d2_ops(script_module):
    return [
        node.kind()
        for node in script_module.inlined_graph.nodes()
        if node.kind().startswith("acm_d2::")
    ]


def _random_parameters(module):
    """Non-zero weights everywhere (the peers start as identities), so that a wrong graph shows."""
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module


@pytest.mark.parametrize(
    "make",
    [
        *(lambda v=v: AttendAndCompare(32, num_groups=4, variant=v) for v in ACM_VARIANTS),
        lambda: SqueezeExcite(32),
        lambda: GlobalContext(32),
        lambda: NonLocal2d(32),
        lambda: CrissCrossAttention(32),
    ],
    ids=[f"acm-{v}" for v in ACM_VARIANTS] + ["se", "gc", "nl", "cc"],
)
@pytest.mark.parametrize("training", [False, True])
def test_context_modules_script_and_match_eager(make, training):
    module = _random_parameters(make()).train(training)
    x = torch.randn(2, 32, 5, 7)
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(x), module(x), rtol=1e-5, atol=1e-5)
    if isinstance(module, AttendAndCompare):  # the orthogonality term too, present only in training
        eager_term, scripted_term = module.orth_term, scripted.orth_term
        assert (
            (eager_term is None)
            == (scripted_term is None)
            == (not (training and module.has_orth_term))
        )
        if eager_term is not None:
            torch.testing.assert_close(scripted_term, eager_term)


def test_acm_backbone_scripts_and_matches_eager():
    backbone = _flat_backbone()
    images = torch.randn(1, 3, 64, 96)
    scripted = torch.jit.script(backbone.backbone)
    assert compare_outputs(backbone(images), tuple(scripted(images).values())).passes(1e-4)


def test_fused_op_is_kept_under_torch_compile_and_left_out_of_export():
    acm = AttendAndCompare(32, num_groups=4, impl="fused").eval()
    x = torch.randn(1, 32, 6, 6)
    seen = []

    def recording_backend(graph_module, example_inputs):
        # With autograd on, the op sits in the subgraph of its autograd.Function's forward.
        for module in graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                seen.extend(str(node.target) for node in module.graph.nodes)
        return graph_module

    torch._dynamo.reset()
    torch.compile(acm, backend=recording_backend)(x)
    assert any("acm_d2" in target for target in seen), seen  # the fused op, one node
    program = torch.export.export(acm, (x,))
    assert not any("acm_d2" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), acm(x))
    assert not _acm_d2_ops(torch.jit.trace(acm, x))


@pytest.mark.parametrize(
    "config_file, opts",
    [
        (MASK_RCNN_FPN, ()),
        (
            "COCO-Detection/faster_rcnn_acm_R_50_C4_1x.yaml",
            ("MODEL.MASK_ON", True),
        ),  # Mask R-CNN C4
        ("COCO-Detection/retinanet_acm_R_50_FPN_1x.yaml", ()),
    ],
    ids=["mask_rcnn_fpn", "mask_rcnn_c4", "retinanet"],
)
def test_scripting_with_instances_matches_eager(config_file, opts):
    model = _model(config_file, *opts)
    image = _image()
    expected = scripted_outputs(model, image)  # default impl: the fused op on this CPU
    (actual,) = script_model(model)(({"image": image},))
    assert expected["scores"].numel() > 0
    _assert_detections_close(actual, expected, tolerance=1e-4)


def test_traced_model_runs_in_an_interpreter_without_acm_d2(tmp_path):
    model = _model(MASK_RCNN_FPN)  # default ACM impl: fused in eager on this CPU
    assert any(
        m.uses_fused(torch.zeros(1, m.channels, 4, 4))
        for m in model.modules()
        if isinstance(m, AttendAndCompare)
    )
    image = _image()
    traceable = traceable_model(model, image)
    traced = torch.jit.trace(traceable, (image,))
    assert not _acm_d2_ops(traced)
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    torch.save(image, str(tmp_path / "image.pt"))
    # A fresh interpreter in which importing acm_d2 (or detectron2) fails.
    script = textwrap.dedent(
        """
        import sys, torch, torchvision  # torchvision: its ops (nms, roi_align), needed by stock models too

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("acm_d2", "detectron2"):
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Refuse())
        model = torch.jit.load("model.ts")
        torch.save(list(model(torch.load("image.pt"))), "outputs.pt")
        assert not any(m.startswith(("acm_d2", "detectron2")) for m in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = traceable(image)
    actual = torch.load(str(tmp_path / "outputs.pt"))
    # Another process, another thread count: the same operators agree to rounding (0.006 pixel seen).
    _assert_detections_close(traceable.outputs_schema(actual), traceable.outputs_schema(expected))


def test_traced_acm_mask_rcnn_equals_its_eager_self_on_the_cpu():
    # Default impl: eager runs the fused op, the traced graph its torch backend's standard operators, the
    # same in the same order. With the reference in the graph instead, the near-argmax attention of
    # random weights turned the rounding difference into boxes tens of pixels apart.
    model = _model(MASK_RCNN_FPN)
    image = _image()
    traceable = traceable_model(model, image)
    traced = torch.jit.trace(traceable, (image,))
    with torch.no_grad():
        expected, actual = traceable(image), traced(image)
    assert expected[0].numel() > 0
    for e, a in zip(expected, actual, strict=True):
        assert torch.equal(e, a)
    (scripted,) = script_model(model)(({"image": image},))
    for name, value in scripted_outputs(model, image).items():
        assert torch.equal(scripted[name], value), name


def _detections(boxes, scores, classes):
    return {
        "pred_boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "pred_classes": torch.tensor(classes),
    }


TWO = _detections([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0]], [0.9, 0.9], [1, 2])


def test_compare_outputs_matches_tied_detections_in_either_order():
    swapped = {k: v.flip(0) for k, v in TWO.items()}
    comparison = compare_outputs([TWO], [swapped])
    assert comparison.passes(1e-6) and comparison.difference == 0, comparison


@pytest.mark.parametrize(
    "change, expected_problem",
    [
        (lambda d: d["pred_boxes"][0].add_(0.5), None),  # a moved box: over the tolerance
        (lambda d: d["pred_classes"][1].fill_(0), "has no match"),
        (lambda d: d["scores"][0].fill_(float("nan")), "NaN"),
    ],
    ids=["moved_box", "wrong_class", "nan"],
)
def test_compare_outputs_catches_a_real_difference(change, expected_problem):
    actual = {k: v.clone() for k, v in TWO.items()}
    change(actual)
    comparison = compare_outputs([TWO], [actual])
    assert not comparison.passes(0.05), comparison
    if expected_problem:
        assert any(expected_problem in p for p in comparison.problems), comparison


def test_compare_outputs_names_a_missing_detection_unless_a_cut_off_explains_it():
    first = {k: v[:1] for k, v in TWO.items()}
    comparison = compare_outputs(TWO, first, DetectionLimits(0.05, 0.5, 100))
    assert (
        not comparison.passes(0.05)
        and "eager detection 1 (class 2, score 0.9" in comparison.problems[0]
    )
    # At 1 detection per image the second one, tied with the first, may fall on either side of the cut.
    comparison = compare_outputs(TWO, first, DetectionLimits(0.05, 0.5, 1))
    assert comparison.passes(0.05) and "cut of 1 detections" in comparison.allowed[0], comparison


@pytest.mark.parametrize(
    "dynamo", [False, True], ids=["torchscript_exporter_opset11", "dynamo_exporter"]
)
def test_onnx_backbone_matches_eager_in_onnxruntime(dynamo):
    pytest.importorskip("onnxruntime")  # a fallback only: `make test` installs the deploy extras
    onnx = pytest.importorskip("onnx")
    backbone = _flat_backbone()
    images = torch.randn(1, 3, 64, 96)
    model = onnx_bytes(backbone, (images,), opset=18 if dynamo else 11, dynamo=dynamo)
    assert not {node.domain for node in onnx.load_from_string(model).graph.node} - {"", "ai.onnx"}
    with torch.no_grad():
        assert compare_outputs(backbone(images), run_onnx(model, (images,))).passes(1e-4)


@pytest.mark.parametrize("opset", [11, 17])
def test_onnx_mask_rcnn_matches_eager_in_onnxruntime(opset):
    pytest.importorskip("onnxruntime")
    # ROIAlign (aligned=False): ONNX RoiAlign before opset 16 has no `aligned`, so Detectron2's default
    # ROIAlignV2 exports there as an approximation (for a stock model too); this model exports exactly.
    model = calm_attention(
        _model(
            MASK_RCNN_FPN,
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
            "ROIAlign",
            "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
            "ROIAlign",
        )
    )
    image = _image()
    traceable = traceable_model(model, image)
    outputs = run_onnx(onnx_bytes(traceable, (image,), opset=opset), (image,))
    with torch.no_grad():
        expected = traceable(image)
    instances = traceable.outputs_schema(outputs)[0]["instances"]
    eager = traceable.outputs_schema(expected)[0]["instances"]
    assert len(eager) > 0
    # Score threshold 0 and 20 detections (R18 above), Detectron2's NMS at 0.5.
    comparison = compare_outputs(instances, eager, DetectionLimits(0.0, 0.5, 20))
    assert comparison.passes(0.01), comparison


def test_acm_flops_are_counted_in_every_impl():
    from fvcore.nn import FlopCountAnalysis

    x = torch.randn(2, 32, 8, 8)
    counts = {}
    for impl in ("auto", "reference", "fused"):
        acm = AttendAndCompare(32, num_groups=4, impl=impl).eval()
        analysis = FlopCountAnalysis(acm, x).unsupported_ops_warnings(False)
        counts[impl] = analysis.total()
        assert not any("acm_d2" in op for op in analysis.unsupported_ops()), (
            analysis.unsupported_ops()
        )
    # fvcore counts multiply-adds: K and Q logits and their pooling, 2 heads x 2 x B x C x HW, and P's convs.
    assert counts["auto"] == counts["reference"] == counts["fused"] >= 2 * 2 * 2 * 32 * 64
