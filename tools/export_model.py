#!/usr/bin/env python
"""Export an acm_d2 model (any Detectron2 yaml config) to TorchScript or ONNX, as Detectron2's
tools/deploy/export_model.py does, then check the exported model against the eager one on a sample
image and print the largest difference. See docs/deploy.md.

    python tools/export_model.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml \\
        --format torchscript --export-method tracing --sample-image input.jpg --output output/export \\
        MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu

Writes OUTPUT/model.ts (torchscript) or OUTPUT/model.onnx. The files need neither acm_d2 nor
detectron2 to run (a traced or ONNX model needs torchvision's ops or onnxruntime, as a stock Detectron2
model does). Exit status 1 when the exported model's outputs differ from eager by more than --tolerance.
"""

import argparse
import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import detection_utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import acm_d2  # noqa: E402,F401  (registers the backbones and meta-architectures)
from acm_d2.checkpoint.checkpointer import AtomicCheckpointer  # noqa: E402
from acm_d2.export import (  # noqa: E402
    STABLE_ONNX_OPSET_VERSION,
    DetectionLimits,
    compare_outputs,
    onnx_bytes,
    run_onnx,
    script_model,
    scripted_outputs,
    traceable_model,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="a yaml config (acm_d2 or stock Detectron2)",
    )
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument(
        "--export-method",
        choices=["tracing", "scripting"],
        default="tracing",
        help="scripting: torchscript only (ONNX export traces)",
    )
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with and to check on; default: random noise of INPUT.MIN_SIZE_TEST px, "
        "which checks the export but traces one arbitrary image size",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for model.ts / model.onnx"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=STABLE_ONNX_OPSET_VERSION,
        help=f"ONNX opset (default {STABLE_ONNX_OPSET_VERSION}, Detectron2's; 16+ exports ROIAlignV2 exactly)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="largest accepted absolute difference to eager (boxes are in pixels; default 0.05)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.export_method == "scripting":
        parser.error("--format onnx exports by tracing: use --export-method tracing")
    return args


def setup(args):
    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def sample_image(cfg, path):
    """The C x H x W input tensor the model sees for `path`, resized as DefaultPredictor does."""
    if path is None:
        size = cfg.INPUT.MIN_SIZE_TEST
        return torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    image = (
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        .get_transform(image)
        .apply_image(image)
    )
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def export(args, cfg, model, image):
    """Write the exported model; return (its path, eager outputs, exported outputs), each output
    structured as the model returns it (detections as Instances or a dict of fields)."""
    os.makedirs(args.output, exist_ok=True)
    image = image.to(cfg.MODEL.DEVICE)
    if args.export_method == "scripting":
        path = os.path.join(args.output, "model.ts")
        scripted = script_model(model)
        scripted.save(path)
        expected = scripted_outputs(model, image)
        (actual,) = torch.jit.load(path)(({"image": image},))
        return path, expected, actual
    traceable = traceable_model(model, image)
    with torch.no_grad():
        expected = list(traceable(image))
    if args.format == "torchscript":
        path = os.path.join(args.output, "model.ts")
        torch.jit.trace(traceable, (image,)).save(path)
        actual = list(torch.jit.load(path)(image))
    else:
        path = os.path.join(args.output, "model.onnx")
        model_bytes = onnx_bytes(traceable, (image,), opset=args.opset)
        with open(path, "wb") as f:
            f.write(model_bytes)
        actual = run_onnx(model_bytes, (image,))
    return path, traceable.outputs_schema(expected), traceable.outputs_schema(actual)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = setup(args)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    path, expected, actual = export(args, cfg, model, sample_image(cfg, args.sample_image))
    comparison = compare_outputs(expected, actual, DetectionLimits.from_config(cfg))
    print(f"exported {args.format} ({args.export_method}) to {path}")
    print(
        f"max abs difference to eager on the sample: {comparison.difference:.3g} "
        "(detections matched one to one by class and IoU)"
    )
    for note in comparison.allowed:
        print(f"note: {note}")
    for problem in comparison.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not comparison.passes(args.tolerance):
        if comparison.difference > args.tolerance:
            print(f"error: the difference exceeds --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
