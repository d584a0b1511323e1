"""Deployment of acm_d2 models through Detectron2's export paths: TorchScript (tracing or scripting) and
ONNX, each checked against the eager model.

This follows Detectron2's tools/deploy/export_model.py: tracing goes through detectron2.export's
TracingAdapter (the model's inputs and outputs flattened to tensors), scripting through
scripting_with_instances. While a graph is captured, every ACM computes with standard operators (see
acm_d2/layers/acm.py), so the files written here load and run where acm_d2 is not installed:
torch.jit.load, C++ libtorch, onnxruntime.
"""

import io
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.export import STABLE_ONNX_OPSET_VERSION, TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes
from torch import Tensor, nn

__all__ = [
    "SCRIPTING_FIELDS",
    "STABLE_ONNX_OPSET_VERSION",
    "max_difference",
    "onnx_bytes",
    "run_onnx",
    "script_model",
    "scripted_outputs",
    "traceable_model",
]

# Every Instances field an acm_d2 meta-architecture (Mask / Faster R-CNN, RetinaNet) uses in inference,
# as Detectron2's export_model.py lists them for scripting_with_instances.
SCRIPTING_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
}


def _inference(model: nn.Module, inputs: List[Dict[str, Tensor]]):
    """What the exported model computes: for R-CNN models the detections before rescaling to the input
    size (do_postprocess=False, so masks stay 28 x 28 per box, as Detectron2 exports them)."""
    if isinstance(model, GeneralizedRCNN):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    return model(inputs)


def traceable_model(model: nn.Module, image: Tensor) -> TracingAdapter:
    """model (eval mode) as a function of one C x H x W image tensor, in Detectron2's TracingAdapter.

    The adapter is put in eval mode: torch.onnx.export restores the mode it finds, recursively."""
    if model.training:
        raise ValueError("export needs a model in eval mode: call model.eval() first")
    return TracingAdapter(model, [{"image": image}], _inference).eval()


class _ScriptableAdapter(nn.Module):
    """Returns plain dicts of tensors, not Instances, so that the scripted model is usable outside
    Python (https://github.com/pytorch/pytorch/issues/46944), as in Detectron2's export_model.py."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()


class _ScriptableRCNN(_ScriptableAdapter):
    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


class _ScriptableDenseDetector(_ScriptableAdapter):
    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        instances = self.model(
            inputs
        )  # a scripted DenseDetector returns its detections before rescaling
        return [i.get_fields() for i in instances]


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script of an R-CNN or dense detector (RetinaNet, FCOS) in eval mode: a function of a
    tuple of {"image": C x H x W} dicts that returns, per image, the detections (before rescaling to the
    input size) as a dict of tensors (the fields of SCRIPTING_FIELDS it has)."""
    if model.training:
        raise ValueError("scripting needs a model in eval mode: call model.eval() first")
    if isinstance(model, GeneralizedRCNN):
        adapter = _ScriptableRCNN(model)
    elif isinstance(model, DenseDetector):
        adapter = _ScriptableDenseDetector(model)
    else:
        raise ValueError(
            f"scripting supports R-CNN models and dense detectors (RetinaNet, FCOS), not {type(model).__name__}"
        )
    return scripting_with_instances(adapter, SCRIPTING_FIELDS)


def scripted_outputs(model: nn.Module, image: Tensor) -> Dict[str, Tensor]:
    """The eager counterpart of a scripted model's output for one image: the same dict of tensors."""
    inputs = [{"image": image}]
    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):
            instances = model.inference(inputs, do_postprocess=False)[0]
        else:  # what DenseDetector.forward computes before it rescales
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            instances = model.forward_inference(images, features, model.head(features))[0]
    return {
        name: value.tensor if isinstance(value, Boxes) else value
        for name, value in instances.get_fields().items()
    }


def onnx_bytes(
    traceable: nn.Module,
    args: Sequence[Tensor],
    *,
    opset: int = STABLE_ONNX_OPSET_VERSION,
    dynamo: bool = False,
) -> bytes:
    """The ONNX model of traceable(*args), from the TorchScript-based exporter (dynamo=False, what
    Detectron2 uses, at its opset 11 by default) or the dynamo one (torch.export based)."""
    if dynamo:
        return torch.onnx.export(
            traceable, tuple(args), dynamo=True, opset_version=opset
        ).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(traceable, tuple(args), buffer, opset_version=opset, dynamo=False)
    return buffer.getvalue()


def run_onnx(model: bytes, args: Sequence[Tensor]) -> List[Tensor]:
    """The outputs of an ONNX model for the given inputs, from onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def max_difference(expected: Sequence[Tensor], actual: Sequence[Tensor]) -> float:
    """The largest absolute difference between two lists of outputs, which must match in count and shapes."""
    if len(expected) != len(actual):
        raise ValueError(
            f"the exported model gives {len(actual)} outputs, the eager one {len(expected)}"
        )
    worst = 0.0
    for index, (e, a) in enumerate(zip(expected, actual)):
        if tuple(e.shape) != tuple(a.shape):
            raise ValueError(
                f"output {index}: the exported model gives shape {tuple(a.shape)}, the eager one {tuple(e.shape)}"
            )
        if e.numel():
            worst = max(worst, (e.double() - a.double()).abs().max().item())
    return worst
