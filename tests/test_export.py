"""Deployment of ACM models through Detectron2's paths: TorchScript scripting and tracing, ONNX (both
exporters, checked with onnxruntime), torch.export, fvcore's FLOP counter; with the default ACM impl,
whose fused op must never reach a saved graph."""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.modeling import build_backbone, build_model

from acm_d2.export import (
    max_difference,
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
from conftest import small_cfg

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
# An exported model computes ACM's reference maths, the eager one (default impl, CPU) the fused form: equal
# up to float rounding, which a random-weight detector amplifies chaotically (a box regression or a
# near-tie in NMS flips). So whole detectors are compared with the same model run eagerly with the
# reference impl (`_eager_reference`), and the default impl's eager outputs with the exported ones where
# no detector sits in between (backbones, modules). Boxes to 0.05 pixel, the rest to 2e-3.


def _assert_detections_close(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        atol = 0.05 if name.endswith("boxes") else 2e-3
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-3, atol=atol, msg=name)


@contextlib.contextmanager
def _eager_reference(model):
    """Run `model` eagerly with every ACM on its reference impl (the maths an exported graph holds)."""
    acms = [m for m in model.modules() if isinstance(m, AttendAndCompare)]
    impls = [m.impl for m in acms]
    for m in acms:
        m.impl = "reference"
    try:
        yield model
    finally:
        for m, impl in zip(acms, impls):
            m.impl = impl


def _fields(instances):
    return {k: v.tensor if hasattr(v, "tensor") else v for k, v in instances.get_fields().items()}


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
    assert max_difference(backbone(images), tuple(scripted(images).values())) < 1e-4


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
    with _eager_reference(model):
        expected = scripted_outputs(model, image)
    (actual,) = script_model(model)(({"image": image},))
    assert expected["scores"].numel() > 0
    _assert_detections_close(actual, expected)


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
        with _eager_reference(model):
            expected = traceable(image)
    actual = torch.load(str(tmp_path / "outputs.pt"))
    (actual,), (expected,) = traceable.outputs_schema(actual), traceable.outputs_schema(expected)
    _assert_detections_close(_fields(actual["instances"]), _fields(expected["instances"]))


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
        assert max_difference(backbone(images), run_onnx(model, (images,))) < 1e-4


@pytest.mark.parametrize("opset", [11, 17])
def test_onnx_mask_rcnn_matches_eager_in_onnxruntime(opset):
    pytest.importorskip("onnxruntime")
    # ROIAlign (aligned=False): ONNX RoiAlign before opset 16 has no `aligned`, so Detectron2's default
    # ROIAlignV2 exports there as an approximation (for a stock model too); this model exports exactly.
    model = _model(
        MASK_RCNN_FPN,
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
        "ROIAlign",
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "ROIAlign",
    )
    image = _image()
    traceable = traceable_model(model, image)
    outputs = run_onnx(onnx_bytes(traceable, (image,), opset=opset), (image,))
    with torch.no_grad(), _eager_reference(model):
        expected = traceable(image)
    instances = traceable.outputs_schema(outputs)[0]["instances"]
    eager = traceable.outputs_schema(expected)[0]["instances"]
    assert len(instances) == len(eager) > 0
    torch.testing.assert_close(instances.scores, eager.scores, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        instances.pred_boxes.tensor, eager.pred_boxes.tensor, rtol=1e-3, atol=0.05
    )


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
