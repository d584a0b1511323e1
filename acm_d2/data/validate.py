"""A validation pass over a COCO-format instance JSON, run before Detectron2's load_coco_json, so that a
bad file fails at load time with the file and the record named, and recoverable problems are dropped
with a logged count and ids instead of crashing training midway (a missing image is only read when
its batch comes up).

Errors (ValueError naming the file and the record): invalid JSON; a top level without "images" or
"categories"; a category, image or annotation without its required keys or with a malformed bbox;
duplicate image ids; an annotation whose category_id is not among the categories.

Dropped, with a warning listing the count and the first ids:
  * annotations whose box has w or h <= 0 (or is not finite);
  * annotations whose polygon segmentation has no polygon of 3 or more points (Detectron2 drops those
    silently);
  * annotations of an image id that is not in "images";
  * images whose file is missing under the image root, and their annotations;
  * images smaller than MIN_IMAGE_SIDE px on a side or longer than MAX_ASPECT_RATIO times their width
    (or the reverse).
Images without any (remaining) instance are kept and counted: Detectron2 leaves them out of training
when DATALOADER.FILTER_EMPTY_ANNOTATIONS is on (the default) and evaluation needs them.
"""
import json
import logging
import math
import os
from typing import Dict, List

from detectron2.data.datasets import load_coco_json

__all__ = ["MIN_IMAGE_SIDE", "MAX_ASPECT_RATIO", "validate_coco_json", "load_validated_coco_json"]

logger = logging.getLogger(__name__)

# An image whose shorter side is under 8 px has less than one cell of the stride-8 feature map (p3)
# before resizing; one whose sides differ by more than 32x keeps a shorter side under ~42 px after
# Detectron2's default resize (short side 800, long side <= 1333), about one cell of res5. Neither
# carries usable instances; both are dropped rather than trained on.
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 32.0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(json_file, kind, record, index, keys):
    if not isinstance(record, dict):
        raise ValueError(f"{json_file}: {kind} #{index} is a {type(record).__name__}, not an object")
    missing = [k for k in keys if k not in record]
    if missing:
        name = f"{kind} id {record['id']}" if "id" in record else f"{kind} #{index} (no id)"
        raise ValueError(f"{json_file}: {name} lacks the key(s) {missing}")


def _has_valid_polygon(segmentation) -> bool:
    if not isinstance(segmentation, list):
        return True  # RLE (a dict): Detectron2 and pycocotools decode it
    return any(isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6 for p in segmentation)


def _report(json_file, what, ids: List) -> None:
    if ids:
        shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        logger.warning(f"{json_file}: dropped {len(ids)} {what}: ids {shown}")


def validate_coco_json(json_file: str, image_root: str) -> Dict[str, set]:
    """Check `json_file` (see the module doc); return the ids to drop as
    {"images": set of image ids, "annotations": set of annotation ids}. Raises ValueError for errors."""
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(coco, dict) or any(k not in coco for k in ("images", "categories")):
        found = sorted(coco) if isinstance(coco, dict) else type(coco).__name__
        raise ValueError(f"{json_file}: not a COCO instance file: needs 'images' and 'categories' (found {found})")
    for i, cat in enumerate(coco["categories"]):
        _require(json_file, "category", cat, i, ("id", "name"))
    category_ids = {c["id"] for c in coco["categories"]}

    images, missing_files, odd_sizes = {}, [], []
    for i, image in enumerate(coco["images"]):
        _require(json_file, "image", image, i, ("id", "file_name", "width", "height"))
        if image["id"] in images:
            raise ValueError(f"{json_file}: image id {image['id']} appears more than once")
        images[image["id"]] = image
        w, h = image["width"], image["height"]
        if not (_is_number(w) and _is_number(h)):
            raise ValueError(f"{json_file}: image id {image['id']} has width/height {w!r}/{h!r}, not numbers")
        if not os.path.isfile(os.path.join(image_root, image["file_name"])):
            missing_files.append(image["id"])
        elif min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            odd_sizes.append(image["id"])
    drop_images = set(missing_files) | set(odd_sizes)

    degenerate, empty_polygons, orphans, dropped_with_images = [], [], [], []
    with_instances = set()
    for i, ann in enumerate(coco.get("annotations", [])):
        _require(json_file, "annotation", ann, i, ("id", "image_id", "category_id", "bbox"))
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{json_file}: annotation id {ann['id']} has bbox {bbox!r}; expected [x, y, w, h]")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has category_id {ann['category_id']}, which is not "
                f"among the categories {sorted(category_ids)}"
            )
        if ann["image_id"] not in images:
            orphans.append(ann["id"])
        elif ann["image_id"] in drop_images:
            dropped_with_images.append(ann["id"])
        elif not all(_is_number(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            degenerate.append(ann["id"])
        elif "segmentation" in ann and not _has_valid_polygon(ann["segmentation"]):
            empty_polygons.append(ann["id"])
        else:
            with_instances.add(ann["image_id"])

    _report(json_file, f"images whose file is missing under {image_root}", missing_files)
    _report(json_file, f"images under {MIN_IMAGE_SIDE} px or with an aspect ratio over {MAX_ASPECT_RATIO:g}", odd_sizes)
    _report(json_file, "annotations of the dropped images", dropped_with_images)
    _report(json_file, "annotations with degenerate boxes (w or h <= 0)", degenerate)
    _report(json_file, "annotations whose polygons are empty (no polygon of 3+ points)", empty_polygons)
    _report(json_file, "annotations whose image_id is not in 'images'", orphans)
    kept = len(images) - len(drop_images)
    if kept == 0:
        raise ValueError(f"{json_file}: no usable image is left (missing files: {len(missing_files)}, too small or "
                         f"too elongated: {len(odd_sizes)}); check the image root {image_root!r}")
    empty = kept - len(with_instances)
    if empty:
        logger.info(f"{json_file}: {empty} of {kept} images have no instance (training skips them by default)")
    return {"images": drop_images, "annotations": set(degenerate) | set(empty_polygons)}


def load_validated_coco_json(json_file: str, image_root: str, dataset_name: str = None) -> List[dict]:
    """validate_coco_json, then Detectron2's load_coco_json, minus the records the validation dropped."""
    drop = validate_coco_json(json_file, image_root)
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    dicts = [d for d in dicts if d["image_id"] not in drop["images"]]
    if drop["annotations"]:
        for d in dicts:
            d["annotations"] = [a for a in d["annotations"] if a["id"] not in drop["annotations"]]
    return dicts
