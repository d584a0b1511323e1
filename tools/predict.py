#!/usr/bin/env python
"""Run an acm_d2 model (or any Detectron2 yaml config) on images: Detectron2's demo/demo.py for ACM
configs, without the webcam and video modes.

    python tools/predict.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml \\
        --input photos/ "more/*.jpg" one.png --output output/predictions --json output/predictions.json \\
        --confidence-threshold 0.5 MODEL.WEIGHTS model_final.pth

Config overrides come last, as `KEY VALUE` pairs (as train_net and export_model take them; `--opts KEY
VALUE ...` is the same). --output writes each image with its detections drawn by Detectron2's Visualizer
(same file name); --json writes the detections in COCO's results format (image_id, category_id, bbox as
x, y, w, h, score, segmentation as RLE), each with the file_name it came from, replacing the file only
once it is complete. An input that cannot be read, or has more than --max-pixels pixels, is reported by
name and skipped; the exit status is then 1. Paths that would overwrite an input, or two inputs that
would give one drawing, are refused before anything runs.
"""

import argparse
import glob
import json
import logging
import math
import os
import re
import sys

import cv2
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import acm_d2  # noqa: F401  (registers the backbones and meta-architectures)
from acm_d2.checkpoint.safe_load import CheckpointError
from acm_d2.config import load_config
from acm_d2.data.mapper import ImageTooLargeError, read_image
from acm_d2.engine.defaults import add_inference_weights_arguments, load_weights_for_inference
from acm_d2.utils.files import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("acm_d2.predict")


# A 12000 x 12000 PNG of 445 KB decodes to 13.6 GB in the model's float input; 50 megapixels is 8K video
# and most camera sensors.
DEFAULT_MAX_PIXELS = 50_000_000
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


class Predictor(DefaultPredictor):
    """Detectron2's DefaultPredictor (one BGR image in, the model's output dict out), loading the
    weights as --eval-only does: refused when missing or when they leave parameters random."""

    def __init__(self, cfg, args):  # DefaultPredictor.__init__ with the checkpointer replaced
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        load_weights_for_inference(self.model, cfg.MODEL.WEIGHTS, args)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"cfg.INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")


def _threshold(text):
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score between 0 and 1")
    return value


def _pixels(text):
    value = int(float(text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive pixel count")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders (their images) or glob patterns",
    )
    parser.add_argument(
        "--output", metavar="DIR", help="folder for the images with their detections drawn"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the detections as COCO-format results"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=_threshold,
        default=0.5,
        help="minimum score of a shown or written detection, in [0, 1]",
    )
    parser.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip, by name, an image of more pixels than this (default {DEFAULT_MAX_PIXELS:.0e}): "
        "an image is decoded whole, and a small compressed file can decode to gigabytes",
    )
    add_inference_weights_arguments(parser)
    parser.add_argument(
        "--opts",
        dest="opts_flag",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE ... (the same as giving them last, without --opts)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    args.opts = args.opts + args.opts_flag
    keys = [i for i in args.input if CONFIG_KEY.match(i) and not os.path.exists(i)]
    if keys:
        parser.error(
            f"--input {keys[0]!r} looks like a config key: --input takes every word after it, so give the "
            "KEY VALUE overrides after another option (e.g. after --output) or behind --opts"
        )
    if not args.output and not args.json:
        parser.error("nothing to write: give --output, --json or both")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} is a file; give a folder for the drawn images")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json!r} is a folder; give a file path")
    return args


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    # As Detectron2's demo: one threshold for every meta-architecture.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def _same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_outputs(args, paths):
    """An error message when a path this run writes is an input, or two inputs share one drawing; else None."""
    for path in paths:
        if args.json and _same_file(args.json, path):
            return f"--json {args.json!r} is the input image {path!r}: writing it would destroy the image"
    if not args.output:
        return None
    drawn = {}
    for path in paths:
        target = os.path.join(args.output, os.path.basename(path))
        if _same_file(target, path):
            return (
                f"--output {args.output!r} holds the input {path!r}: its drawing would replace the image; give "
                "another --output folder"
            )
        if target in drawn:
            return (
                f"the inputs {drawn[target]!r} and {path!r} would both be drawn to {target!r}; rename one, or "
                "run them with different --output folders"
            )
        drawn[target] = path
    return None


def expand_inputs(patterns):
    """(image paths in the given order, folders and patterns expanded and sorted; the inputs that name nothing)."""
    paths, unmatched = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            unmatched.append(pattern)
        paths.extend(found)
    return paths, unmatched


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="acm_d2")
    cfg = setup_cfg(args)
    paths, failed = expand_inputs(args.input)
    for pattern in failed:
        logger.error(
            f"--input {pattern!r}: no such file or folder, and no image matches it as a pattern"
        )
    problem = check_outputs(args, paths)
    if problem:  # a refusal before any work: on stderr, as argparse's errors
        print(f"predict: error: {problem}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(cfg, args)
    except (CheckpointError, FileNotFoundError) as error:
        print(
            f"predict: error: {error} (--allow-random-weights runs such a model anyway)",
            file=sys.stderr,
        )
        return 1
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    # Results name the dataset's category ids when the test set has them (COCO), else the model's class indices.
    to_dataset_id = {
        v: k for k, v in getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).items()
    }
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    results, predicted = [], 0
    for image_id, path in enumerate(tqdm.tqdm(paths, unit="image", disable=len(paths) < 2)):
        try:
            # training's reader (16-bit images scaled, not clipped), refusing huge images from their header
            image = read_image(path, format="BGR", max_pixels=args.max_pixels)
        except ImageTooLargeError as error:
            logger.error(f"{error}; skipped (raise --max-pixels to predict it)")
            failed.append(path)
            continue
        except Exception as error:  # unreadable or not an image: say which, go on with the others
            logger.error(f"cannot read image {path!r} ({type(error).__name__}: {error}); skipped")
            failed.append(path)
            continue
        instances = predictor(image)["instances"].to(
            "cpu"
        )  # DefaultPredictor takes BGR and converts
        predicted += 1
        if args.json:
            for detection in instances_to_coco_json(instances, image_id):
                detection["category_id"] = to_dataset_id.get(
                    detection["category_id"], detection["category_id"]
                )
                detection["file_name"] = path
                results.append(detection)
        if args.output:
            drawn = Visualizer(
                image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE
            ).draw_instance_predictions(instances)
            target = os.path.join(args.output, os.path.basename(path))
            try:  # OpenCV writes every accepted extension (matplotlib's savefig has no .bmp)
                written = cv2.imwrite(target, drawn.get_image()[:, :, ::-1])
            except cv2.error:
                written = False
            if not written:
                logger.error(f"cannot write the drawing {target!r}; skipped")
                failed.append(path)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write(args.json, lambda f: json.dump(results, f), "w")
    logger.info(f"{predicted} of {len(paths)} images predicted")
    if failed:
        logger.error(f"{len(failed)} input(s) failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
