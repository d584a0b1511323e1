#!/usr/bin/env python
"""Run an acm_d2 model (or any Detectron2 yaml config) on images: Detectron2's demo/demo.py for ACM
configs, without the webcam and video modes.

    python tools/predict.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml \\
        --input photos/ "more/*.jpg" one.png --output output/predictions --json output/predictions.json \\
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS model_final.pth

--output writes each image with its detections drawn by Detectron2's Visualizer (same file name);
--json writes the detections in COCO's results format (image_id, category_id, bbox as x, y, w, h,
score, segmentation as RLE), each with the file_name it came from. An input that cannot be read is
reported by name and skipped; the exit status is then 1.
"""

import argparse
import glob
import json
import logging
import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout

import torch  # noqa: E402
import tqdm  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

import acm_d2  # noqa: E402  (registers the backbones and meta-architectures)
from acm_d2.checkpoint.checkpointer import AtomicCheckpointer  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("acm_d2.predict")


class Predictor(DefaultPredictor):
    """Detectron2's DefaultPredictor (one BGR image in, the model's output dict out), loading the
    weights through acm_d2's checking checkpointer, which names the file when a checkpoint is unusable."""

    def __init__(self, cfg):  # DefaultPredictor.__init__ with the checkpointer replaced
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"cfg.INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")


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
        type=float,
        default=0.5,
        help="minimum score of a shown or written detection",
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if not args.output and not args.json:
        parser.error("nothing to write: give --output, --json or both")
    return args


def setup_cfg(args):
    cfg = get_cfg()
    acm_d2.add_acm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # As Detectron2's demo: one threshold for every meta-architecture.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


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
    predictor = Predictor(cfg)
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
            image = read_image(path, format="BGR")
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
            drawn.save(os.path.join(args.output, os.path.basename(path)))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f)
    logger.info(f"{predicted} of {len(paths)} images predicted")
    if failed:
        logger.error(f"{len(failed)} input(s) failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
