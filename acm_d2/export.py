"""Deployment of acm_d2 models through Detectron2's export paths: TorchScript (tracing or scripting) and
ONNX, each checked against the eager model.

This follows Detectron2's tools/deploy/export_model.py: tracing goes through detectron2.export's
TracingAdapter (the model's inputs and outputs flattened to tensors), scripting through
scripting_with_instances. While a graph is captured, every ACM computes with standard operators (see
acm_d2/layers/acm.py), so the files written here load and run where acm_d2 is not installed:
torch.jit.load, C++ libtorch, onnxruntime.
"""

import io
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.export import STABLE_ONNX_OPSET_VERSION, TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn

__all__ = [
    "SCRIPTING_FIELDS",
    "STABLE_ONNX_OPSET_VERSION",
    "MAX_ONNX_OPSET",
    "Comparison",
    "DetectionLimits",
    "compare_outputs",
    "onnx_bytes",
    "run_onnx",
    "script_model",
    "scripted_outputs",
    "traceable_model",
]

# The highest opset of torch.onnx's TorchScript-based exporter (dynamo=False), which export_model uses.
MAX_ONNX_OPSET = 20

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


@dataclass(frozen=True)
class DetectionLimits:
    """The cut-offs of a detector's inference, which a rounding difference may tip a detection across:
    its score threshold, its NMS IoU threshold (None: not known) and its detections per image."""

    score_threshold: float = 0.0
    nms_threshold: Optional[float] = None
    max_detections: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "DetectionLimits":
        """The limits of the model that `cfg` builds (R-CNN heads, or RetinaNet for a dense detector)."""
        heads = (
            cfg.MODEL.RETINANET
            if cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
            else cfg.MODEL.ROI_HEADS
        )
        return cls(heads.SCORE_THRESH_TEST, heads.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)


@dataclass
class Comparison:
    """How an exported model's outputs differ from the eager model's.

    difference: the largest absolute difference over the plain tensors and over the fields (box
    coordinates, scores, masks) of the detections matched one to one; inf when an output holds NaN.
    problems: what no tolerance accepts (a detection without a match, NaN, a shape or field mismatch).
    allowed: the detections found on one side only because a rounding-sized change tipped them across
    a cut-off (score threshold, NMS threshold, detections per image)."""

    difference: float = 0.0
    problems: List[str] = field(default_factory=list)
    allowed: List[str] = field(default_factory=list)

    def passes(self, tolerance: float) -> bool:
        return not self.problems and self.difference <= tolerance


# A pair of detections of one class is a candidate match above this IoU, or with every coordinate within
# MATCH_DISTANCE pixels (random weights give boxes a hundredth of a pixel tall, whose IoU rounding
# swings); the coordinates of a matched pair are then held to the tolerance. A detection missing on one
# side is put down to NMS when it overlaps a kept detection of its class within NMS_MARGIN of the NMS
# threshold, and to a score cut-off within SCORE_MARGIN of it.
MATCH_IOU = 0.5
MATCH_DISTANCE = 1.0
NMS_MARGIN = 0.05
SCORE_MARGIN = 1e-3


def compare_outputs(expected, actual, limits: DetectionLimits = DetectionLimits()) -> Comparison:
    """Compare two model outputs of the same structure (lists, tuples, dicts, Instances, Boxes, tensors).

    Detections (an Instances, or a dict with "pred_boxes" and "scores" as a scripted model returns them)
    are matched one to one, not by row: same class, overlapping boxes, the closest boxes first. Rows
    of equal or nearly equal scores come out of a sort in either order, so comparing row i with row i
    reports a large difference for two identical results. Other tensors are compared elementwise."""
    comparison = Comparison()
    _compare(expected, actual, "output", limits, comparison)
    return comparison


def _detections(value) -> Optional[Dict[str, Tensor]]:
    fields = value.get_fields() if isinstance(value, Instances) else value
    if not isinstance(fields, dict) or not {"pred_boxes", "scores"} <= set(fields):
        return None
    return {k: v.tensor if isinstance(v, Boxes) else v for k, v in fields.items()}


def _compare(expected, actual, where: str, limits: DetectionLimits, out: Comparison) -> None:
    detections = _detections(expected)
    if detections is not None:
        other = _detections(actual)
        if other is None:
            out.problems.append(f"{where}: the eager model gives detections, the exported one not")
        else:
            _compare_detections(detections, other, where, limits, out)
    elif isinstance(expected, dict):
        if not isinstance(actual, dict) or sorted(expected) != sorted(actual):
            keys = sorted(actual) if isinstance(actual, dict) else type(actual).__name__
            out.problems.append(
                f"{where}: the eager model gives {sorted(expected)}, the exported one {keys}"
            )
            return
        for key in sorted(expected):
            _compare(expected[key], actual[key], f"{where}[{key!r}]", limits, out)
    elif isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            count = len(actual) if isinstance(actual, (list, tuple)) else type(actual).__name__
            out.problems.append(
                f"{where}: the exported model gives {count} outputs, the eager one {len(expected)}"
            )
            return
        for index, (e, a) in enumerate(zip(expected, actual)):
            _compare(e, a, f"{where}[{index}]", limits, out)
    elif isinstance(expected, Boxes):
        _compare(
            expected.tensor,
            actual.tensor if isinstance(actual, Boxes) else actual,
            where,
            limits,
            out,
        )
    elif isinstance(expected, Tensor):
        _compare_tensors(expected, actual, where, out)
    elif expected != actual:  # image sizes and other plain values
        out.problems.append(
            f"{where}: the eager model gives {expected!r}, the exported one {actual!r}"
        )


def _compare_tensors(expected: Tensor, actual, where: str, out: Comparison) -> None:
    if not isinstance(actual, Tensor) or tuple(expected.shape) != tuple(actual.shape):
        shape = tuple(actual.shape) if isinstance(actual, Tensor) else type(actual).__name__
        out.problems.append(
            f"{where}: the exported model gives shape {shape}, the eager one {tuple(expected.shape)}"
        )
        return
    if not _finite_or_report(expected, actual, where, out) or not expected.numel():
        return
    difference = (expected.double() - actual.double().to(expected.device)).abs().max().item()
    out.difference = max(out.difference, difference)


def _finite_or_report(expected: Tensor, actual: Tensor, where: str, out: Comparison) -> bool:
    """Whether neither side holds NaN; else records the problem and an infinite difference."""
    nans = [int(t.isnan().sum()) if t.is_floating_point() else 0 for t in (expected, actual)]
    if any(nans):
        out.problems.append(
            f"{where}: NaN in the output (eager: {nans[0]}, exported: {nans[1]} values)"
        )
        out.difference = float("inf")
        return False
    return True


def _compare_detections(
    expected: Dict[str, Tensor], actual: Dict[str, Tensor], where: str, limits: DetectionLimits, out
) -> None:
    if sorted(expected) != sorted(actual):
        out.problems.append(
            f"{where}: the eager detections have fields {sorted(expected)}, the exported ones {sorted(actual)}"
        )
        return
    if not all(_finite_or_report(expected[k], actual[k], f"{where}.{k}", out) for k in expected):
        return
    actual = {k: v.to(expected[k].device) for k, v in actual.items()}
    pairs = _match(expected, actual)
    if pairs:
        rows_e, rows_a = (torch.tensor(rows, dtype=torch.long) for rows in zip(*pairs))
        for name in expected:
            e, a = expected[name][rows_e], actual[name][rows_a]
            if tuple(e.shape) != tuple(a.shape):
                out.problems.append(
                    f"{where}.{name}: per detection shape {tuple(a.shape[1:])} exported, {tuple(e.shape[1:])} eager"
                )
            elif e.numel():
                out.difference = max(out.difference, (e.double() - a.double()).abs().max().item())
    for side, mine, theirs, matched in (
        ("eager", expected, actual, {i for i, _ in pairs}),
        ("exported", actual, expected, {j for _, j in pairs}),
    ):
        other = "exported" if side == "eager" else "eager"
        for row in range(len(mine["scores"])):
            if row in matched:
                continue
            reason = _why_missing(mine, row, theirs, limits)
            box = [round(float(c), 2) for c in mine["pred_boxes"][row]]
            text = (
                f"{where}: {side} detection {row} (class {int(_classes(mine)[row])}, "
                f"score {float(mine['scores'][row]):.4g}, box {box}) has no match in the {other} model"
            )
            if reason:
                out.allowed.append(f"{text}: {reason}")
            else:
                out.problems.append(text)


def _classes(detections: Dict[str, Tensor]) -> Tensor:
    classes = detections.get("pred_classes")
    return (
        classes
        if classes is not None
        else detections["scores"].new_zeros(len(detections["scores"]), dtype=torch.long)
    )


def _match(expected: Dict[str, Tensor], actual: Dict[str, Tensor]) -> List[Tuple[int, int]]:
    """Pairs (eager row, exported row): same class, IoU above MATCH_IOU or boxes within MATCH_DISTANCE,
    the pair with the closest box coordinates first."""
    boxes_e, boxes_a = expected["pred_boxes"].double(), actual["pred_boxes"].double()
    if not len(boxes_e) or not len(boxes_a):
        return []
    distance = (boxes_e[:, None] - boxes_a[None]).abs().amax(-1)
    close = (pairwise_iou(Boxes(boxes_e), Boxes(boxes_a)) > MATCH_IOU) | (
        distance <= MATCH_DISTANCE
    )
    candidate = close & (_classes(expected)[:, None] == _classes(actual)[None])
    distance[~candidate] = float("inf")
    pairs = []
    while True:
        best = int(distance.argmin())
        i, j = divmod(best, distance.shape[1])
        if distance[i, j] == float("inf"):
            return pairs
        pairs.append((i, j))
        distance[i, :] = float("inf")
        distance[:, j] = float("inf")


def _why_missing(mine: Dict[str, Tensor], row: int, theirs: Dict[str, Tensor], limits) -> str:
    """Why detection `row` of one side may be absent from the other after a rounding-sized change
    ("" when nothing explains it)."""
    score = float(mine["scores"][row])
    if score <= limits.score_threshold + SCORE_MARGIN:
        return f"its score is at the score threshold {limits.score_threshold}"
    scores = theirs["scores"]
    if (
        limits.max_detections
        and len(scores) >= limits.max_detections
        and score <= float(scores.min()) + SCORE_MARGIN
    ):
        return f"its score is at the cut of {limits.max_detections} detections per image"
    if limits.nms_threshold is not None and len(scores):
        iou = pairwise_iou(
            Boxes(mine["pred_boxes"][row : row + 1].double()), Boxes(theirs["pred_boxes"].double())
        )[0]
        rival = (
            (_classes(theirs) == _classes(mine)[row])
            & (scores >= score - SCORE_MARGIN)
            & (iou >= limits.nms_threshold - NMS_MARGIN)
        )
        if rival.any():
            return (
                f"it overlaps a detection of its class by IoU {float(iou[rival].max()):.3f}, at the NMS "
                f"threshold {limits.nms_threshold}"
            )
    return ""
