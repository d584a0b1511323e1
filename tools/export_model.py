#!/usr/bin/env python
"""Export an acm_d2 model (any Detectron2 yaml config) to TorchScript or ONNX, as Detectron2's
tools/deploy/export_model.py does, then check the exported model against the eager one on a sample
image and print the largest difference. See docs/deploy.md.

    python tools/export_model.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml \\
        --format torchscript --export-method tracing --sample-image input.jpg --output output/export \\
        MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu

Writes OUTPUT/model.ts (torchscript) or OUTPUT/model.onnx, only once the check passes (a failing export
leaves the file there as it was). The files need neither acm_d2 nor detectron2 to run (a traced or ONNX
model needs torchvision's ops or onnxruntime, as a stock Detectron2 model does). Exit status 1 when the
exported model's outputs differ from eager by more than --tolerance (detections matched one to one), or
when MODEL.WEIGHTS is empty or does not fill the model (--allow-random-weights to export anyway).
"""

import argparse
import os
import sys
import tempfile

import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import acm_d2  # noqa: F401  (registers the backbones and meta-architectures)
from acm_d2.checkpoint.safe_load import CheckpointError
from acm_d2.config import load_config
from acm_d2.data.mapper import read_image
from acm_d2.engine.defaults import add_inference_weights_arguments, load_weights_for_inference
from acm_d2.export import (
    MAX_ONNX_OPSET,
    STABLE_ONNX_OPSET_VERSION,
    DetectionLimits,
    compare_outputs,
    onnx_bytes,
    run_onnx,
    script_model,
    scripted_outputs,
    traceable_model,
)
from acm_d2.utils.files import TMP_SUFFIX


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
    add_inference_weights_arguments(parser)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.export_method == "scripting":
        parser.error("--format onnx exports by tracing: use --export-method tracing")
    if not STABLE_ONNX_OPSET_VERSION <= args.opset <= MAX_ONNX_OPSET:
        parser.error(
            f"--opset {args.opset}: the exporter takes opsets {STABLE_ONNX_OPSET_VERSION} to "
            f"{MAX_ONNX_OPSET} (Detectron2's ops need {STABLE_ONNX_OPSET_VERSION}+; 16+ exports ROIAlignV2 exactly)"
        )
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(
            f"--output {args.output!r} is a file; give a folder (it receives model.ts / model.onnx)"
        )
    if args.sample_image is not None and not os.path.isfile(args.sample_image):
        parser.error(f"--sample-image {args.sample_image!r} does not exist")
    return args


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def sample_image(cfg, path):
    """The C x H x W input tensor the model sees for `path`, resized as DefaultPredictor does."""
    if path is None:
        size = cfg.INPUT.MIN_SIZE_TEST
        return torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    image = read_image(path, format=cfg.INPUT.FORMAT)  # training's reader: 16-bit images scaled
    image = (
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        .get_transform(image)
        .apply_image(image)
    )
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def export(args, cfg, model, image, path):
    """Write the exported model to `path`; return (eager outputs, exported outputs), each structured
    as the model returns it (detections as Instances or a dict of fields)."""
    image = image.to(cfg.MODEL.DEVICE)
    if args.export_method == "scripting":
        script_model(model).save(path)
        expected = scripted_outputs(model, image)
        (actual,) = torch.jit.load(path)(({"image": image},))
        return expected, actual
    traceable = traceable_model(model, image)
    with torch.no_grad():
        expected = list(traceable(image))
    if args.format == "torchscript":
        torch.jit.trace(traceable, (image,)).save(path)
        actual = list(torch.jit.load(path)(image))
    else:
        model_bytes = onnx_bytes(traceable, (image,), opset=args.opset)
        with open(path, "wb") as f:
            f.write(model_bytes)
        actual = run_onnx(model_bytes, (image,))
    return traceable.outputs_schema(expected), traceable.outputs_schema(actual)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = setup(args)
    model = build_model(cfg).eval()
    try:
        load_weights_for_inference(model, cfg.MODEL.WEIGHTS, args)
    except (CheckpointError, FileNotFoundError) as error:
        print(
            f"error: {error} (--allow-random-weights exports such a model anyway)", file=sys.stderr
        )
        return 1
    image = sample_image(cfg, args.sample_image)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.onnx" if args.format == "onnx" else "model.ts")
    # Written beside its final name and moved there only once the check passes: a failing export
    # leaves the model already in --output (a verified one, perhaps) as it was.
    fd, staged = tempfile.mkstemp(
        dir=args.output, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX
    )
    os.close(fd)
    try:
        expected, actual = export(args, cfg, model, image, staged)
        comparison = compare_outputs(expected, actual, DetectionLimits.from_config(cfg))
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
                print(
                    f"error: the difference exceeds --tolerance {args.tolerance}", file=sys.stderr
                )
            kept = f"; {path} was left as it was" if os.path.exists(path) else ""
            print(f"error: the exported model was not written{kept}", file=sys.stderr)
            return 1
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    print(f"exported {args.format} ({args.export_method}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
