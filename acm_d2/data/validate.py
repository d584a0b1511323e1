"""A validation pass over a COCO-format instance JSON, run before Detectron2's load_coco_json, so that a
bad file fails at load time with the file and the record named, and recoverable problems are dropped
with a logged count and the records (annotation id, image id and file) instead of crashing training
midway (an image is only read when its batch comes up) or exhausting memory.

Errors (ValueError naming the file and the record): invalid JSON; a top level without "images" or
"categories"; a category, image or annotation without its required keys, with a malformed bbox, or with
a segmentation that is neither polygons nor RLE (or an RLE whose counts are not integers); duplicate
image ids; two images with the same file_name (each copy's instances would be background in the other);
an annotation whose category_id is not among the categories.

Dropped, with a warning listing the count and the first records:
  * annotations with a NaN, Inf or far-away coordinate (more than COORDINATE_MARGIN image sizes outside
    the image) in the bbox, a polygon or the keypoints: pycocotools rasterises a polygon point by
    point, so one coordinate of 1e30 would need more memory than any machine has;
  * annotations whose box has w or h <= 0, or lies entirely outside its image (Detectron2 clips it to
    nothing and drops it silently);
  * annotations whose polygon segmentation has no polygon of 3 or more points (Detectron2 drops those
    too, with one warning that gives only their count), or whose RLE's size is not the image's [height, width] or whose counts do not cover it;
  * annotations of an image id that is not in "images";
  * images whose file is missing under the image root, and their annotations;
  * images smaller than MIN_IMAGE_SIDE px on a side or longer than MAX_ASPECT_RATIO times their width
    (or the reverse);
  * with check_images, images whose file is empty, not an image, truncated (a PNG without its final
    IEND chunk, a JPEG without its end marker) or of another size than the JSON says; only the headers
    and the last bytes are read, in a thread pool.
Images without any (remaining) instance are kept and counted: Detectron2 leaves them out of training
when DATALOADER.FILTER_EMPTY_ANNOTATIONS is on (the default) and evaluation needs them.
"""

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from detectron2.data.datasets import load_coco_json
from PIL import Image

__all__ = [
    "MIN_IMAGE_SIDE",
    "MAX_ASPECT_RATIO",
    "COORDINATE_MARGIN",
    "AUTO_CHECK_MAX_IMAGES",
    "validate_coco_json",
    "load_validated_coco_json",
]

logger = logging.getLogger(__name__)

# An image whose shorter side is under 8 px has less than one cell of the stride-8 feature map (p3)
# before resizing; one whose sides differ by more than 32x keeps a shorter side under ~42 px after
# Detectron2's default resize (short side 800, long side <= 1333), about one cell of res5. Neither
# carries usable instances; both are dropped rather than trained on.
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 32.0
# How far outside its image (in image widths / heights) a coordinate may lie. Detectron2 clips boxes and
# masks to the image, so a little outside is harmless; farther is a unit or export error.
COORDINATE_MARGIN = 1.0
# check_images=None checks the image files of datasets up to this size: ~1 s per 10k local files.
AUTO_CHECK_MAX_IMAGES = 20000
# How many records a warning names.
SHOWN = 20


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(json_file, kind, record, index, keys):
    if not isinstance(record, dict):
        raise ValueError(
            f"{json_file}: {kind} #{index} is a {type(record).__name__}, not an object"
        )
    missing = [k for k in keys if k not in record]
    if missing:
        name = f"{kind} id {record['id']}" if "id" in record else f"{kind} #{index} (no id)"
        raise ValueError(f"{json_file}: {name} lacks the key(s) {missing}")


def _within(xy: list, stride: int, x_range, y_range) -> bool:
    """The points of `xy` (x, y first in each group of `stride` numbers) finite and within the ranges.
    A sum is NaN or Inf when any term is, so this is a few C-level passes over the list (COCO-size
    files have ~20M coordinates)."""
    if not math.isfinite(sum(xy)):
        return False
    xs, ys = xy[0::stride], xy[1::stride]
    return (
        min(xs) >= x_range[0]
        and max(xs) <= x_range[1]
        and min(ys) >= y_range[0]
        and max(ys) <= y_range[1]
    )


def _polygons_kind(polygons, x_range, y_range) -> str:
    """'ok', 'far' (a non-finite or far-away coordinate) or 'empty' (no polygon of 3+ points) for the
    polygons Detectron2 keeps (even length, 6+ values). TypeError when a polygon holds a non-number."""
    usable = False
    for polygon in polygons:
        if not isinstance(polygon, list):
            raise TypeError("a polygon is not a list")
        if len(polygon) < 6 or len(polygon) % 2:
            continue  # Detectron2's load_coco_json drops such polygons
        if not _within(polygon, 2, x_range, y_range):
            return "far"
        usable = True
    return "ok" if usable else "empty"


def _rle_matches(rle: dict, height, width) -> bool:
    """The RLE's size is the image's (pycocotools allocates the mask from the size alone) and, when its
    counts are a list, they cover height * width pixels. ValueError for counts that are no RLE at all
    (load_coco_json would fail on them, dropped or not)."""
    size, counts = rle.get("size"), rle.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and 0 <= c < 2**32 for c in counts):
            raise ValueError("RLE counts are not a list of non-negative 32-bit integers")
    elif not isinstance(counts, str):
        raise ValueError("RLE counts are neither a list of integers nor a compressed string")
    if not (isinstance(size, list) and size == [height, width]):
        return False
    return not isinstance(counts, list) or sum(counts) == height * width


def _annotation_kind(ann, image, margin) -> str:
    """Which bucket an annotation of a kept image falls into ('ok' to keep it). TypeError/ValueError for
    a malformed segmentation or keypoints."""
    w, h = image["width"], image["height"]
    x_range, y_range = (-margin * w, (1 + margin) * w), (-margin * h, (1 + margin) * h)
    x, y, bw, bh = ann["bbox"]
    if not _within([x, y, x + bw, y + bh], 2, x_range, y_range):
        return "far"
    if bw <= 0 or bh <= 0:
        return "degenerate"
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        return "outside"
    keypoints = ann.get("keypoints")
    if keypoints is not None:
        if not isinstance(keypoints, list) or len(keypoints) % 3:
            raise ValueError("keypoints are not a list of (x, y, visibility) triples")
        if keypoints and not _within(keypoints, 3, x_range, y_range):
            return "far"
    segmentation = ann.get("segmentation")
    if segmentation is None:
        return "ok"
    if isinstance(segmentation, dict):
        return "ok" if _rle_matches(segmentation, h, w) else "bad_rle"
    if isinstance(segmentation, list):
        return _polygons_kind(segmentation, x_range, y_range)
    raise TypeError("segmentation is neither a list of polygons nor an RLE object")


def _image_file_problem(path: str, width, height) -> Optional[str]:
    """Why the image at `path` cannot be trained on, or None. Reads the header and the last bytes only."""
    try:
        num_bytes = os.path.getsize(path)
        if num_bytes == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            real_size, image_format = image.size, image.format
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # Detectron2 applies EXIF rotations
                real_size = real_size[::-1]
        with open(path, "rb") as f:
            f.seek(max(0, num_bytes - 1024))
            tail = f.read()
    except (
        Exception
    ) as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"not a readable image ({type(e).__name__}: {e})"
    if image_format == "PNG" and not tail.endswith(b"IEND\xaeB`\x82"):
        return "truncated PNG (no IEND chunk at the end)"
    if image_format == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if real_size != (width, height):
        return f"{real_size[0]}x{real_size[1]} px, but the JSON says {width}x{height}"
    return None


def _check_image_files(image_root: str, images: List[dict]) -> Dict[int, str]:
    """{image id: problem} for the given image records, checked in parallel (mostly I/O)."""

    def check(image):
        return _image_file_problem(
            os.path.join(image_root, image["file_name"]), image["width"], image["height"]
        )

    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        problems = pool.map(check, images, chunksize=64)
        return {image["id"]: p for image, p in zip(images, problems) if p is not None}


def _report(json_file, what, records: List[str]) -> None:
    if records:
        shown = "; ".join(records[:SHOWN]) + ("; ..." if len(records) > SHOWN else "")
        logger.warning(f"{json_file}: dropped {len(records)} {what}: {shown}")


def validate_coco_json(
    json_file: str, image_root: str, check_images: Optional[bool] = None
) -> Dict[str, set]:
    """Check `json_file` (see the module doc); return the ids to drop as
    {"images": set of image ids, "annotations": set of annotation ids}. Raises ValueError for errors.

    check_images: also open every image file's header (see the module doc); None (the default) does so
    when the file lists at most AUTO_CHECK_MAX_IMAGES images.
    """
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{json_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    if not isinstance(coco, dict) or any(k not in coco for k in ("images", "categories")):
        found = sorted(coco) if isinstance(coco, dict) else type(coco).__name__
        raise ValueError(
            f"{json_file}: not a COCO instance file: needs 'images' and 'categories' (found {found})"
        )
    for i, cat in enumerate(coco["categories"]):
        _require(json_file, "category", cat, i, ("id", "name"))
    category_ids = {c["id"] for c in coco["categories"]}

    images, by_file, duplicates, missing_files, odd_sizes = {}, {}, [], [], []
    for i, image in enumerate(coco["images"]):
        _require(json_file, "image", image, i, ("id", "file_name", "width", "height"))
        if image["id"] in images:
            raise ValueError(f"{json_file}: image id {image['id']} appears more than once")
        images[image["id"]] = image
        w, h = image["width"], image["height"]
        if not (_is_number(w) and _is_number(h)):
            raise ValueError(
                f"{json_file}: image id {image['id']} has width/height {w!r}/{h!r}, not numbers"
            )
        first = by_file.setdefault(image["file_name"], image["id"])
        if first != image["id"]:
            duplicates.append(f"{image['file_name']!r} (image ids {first} and {image['id']})")
        if not os.path.isfile(os.path.join(image_root, image["file_name"])):
            missing_files.append(image["id"])
        elif min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            odd_sizes.append(image["id"])
    if duplicates:
        raise ValueError(
            f"{json_file}: {len(duplicates)} image(s) share a file_name with an earlier one: "
            f"{'; '.join(duplicates[:SHOWN])}; merge their annotations into one image record"
        )
    drop_images = set(missing_files) | set(odd_sizes)
    if check_images is None:
        check_images = len(images) <= AUTO_CHECK_MAX_IMAGES
    unreadable = {}
    if check_images:
        unreadable = _check_image_files(
            image_root, [im for i, im in images.items() if i not in drop_images]
        )
        drop_images |= set(unreadable)

    def image_name(image_id):
        return f"image {image_id} {images[image_id]['file_name']!r}"

    buckets = {
        k: [] for k in ("far", "degenerate", "outside", "empty", "bad_rle", "orphan", "with_images")
    }
    with_instances = set()
    for i, ann in enumerate(coco.get("annotations", [])):
        _require(json_file, "annotation", ann, i, ("id", "image_id", "category_id", "bbox"))
        bbox = ann["bbox"]
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has bbox {bbox!r}; expected [x, y, w, h]"
            )
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has category_id {ann['category_id']}, which is not "
                f"among the categories {sorted(category_ids)}"
            )
        image_id = ann["image_id"]
        if image_id not in images:
            buckets["orphan"].append((ann["id"], None))
            continue
        if image_id in drop_images:
            buckets["with_images"].append((ann["id"], image_id))
            continue
        try:
            kind = _annotation_kind(ann, images[image_id], COORDINATE_MARGIN)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} ({image_name(image_id)}): {e}"
            ) from None
        if kind == "ok":
            with_instances.add(image_id)
        else:
            buckets[kind].append((ann["id"], image_id))

    def named(pairs):
        return [
            f"annotation {a}" + (f" ({image_name(i)})" if i is not None else "") for a, i in pairs
        ]

    _report(
        json_file,
        f"images whose file is missing under {image_root}",
        [image_name(i) for i in missing_files],
    )
    _report(
        json_file,
        f"images under {MIN_IMAGE_SIDE} px or with an aspect ratio over {MAX_ASPECT_RATIO:g}",
        [image_name(i) for i in odd_sizes],
    )
    _report(
        json_file,
        "images whose file is unreadable or of another size",
        [f"{image_name(i)}: {p}" for i, p in unreadable.items()],
    )
    _report(json_file, "annotations of the dropped images", named(buckets["with_images"]))
    _report(
        json_file,
        f"annotations with a NaN, Inf or far-away coordinate (over {COORDINATE_MARGIN:g} image "
        "size outside the image) in the bbox, polygons or keypoints",
        named(buckets["far"]),
    )
    _report(
        json_file, "annotations with degenerate boxes (w or h <= 0)", named(buckets["degenerate"])
    )
    _report(
        json_file,
        "annotations whose box lies entirely outside the image",
        named(buckets["outside"]),
    )
    _report(
        json_file,
        "annotations whose polygons are empty (no polygon of 3+ points)",
        named(buckets["empty"]),
    )
    _report(
        json_file,
        "annotations whose RLE size is not the image's [height, width] or whose counts do not "
        "cover it",
        named(buckets["bad_rle"]),
    )
    _report(json_file, "annotations whose image_id is not in 'images'", named(buckets["orphan"]))
    kept = len(images) - len(drop_images)
    if kept == 0:
        raise ValueError(
            f"{json_file}: no usable image is left (missing files: {len(missing_files)}, too small or "
            f"too elongated: {len(odd_sizes)}, unreadable: {len(unreadable)}); check the image root "
            f"{image_root!r}"
        )
    empty = kept - len(with_instances)
    if empty:
        logger.info(
            f"{json_file}: {empty} of {kept} images have no instance (training skips them by default)"
        )
    dropped = ("far", "degenerate", "outside", "empty", "bad_rle")
    return {"images": drop_images, "annotations": {a for k in dropped for a, _ in buckets[k]}}


def load_validated_coco_json(
    json_file: str, image_root: str, dataset_name: str = None, check_images: Optional[bool] = None
) -> List[dict]:
    """validate_coco_json, then Detectron2's load_coco_json, minus the records the validation dropped."""
    drop = validate_coco_json(json_file, image_root, check_images)
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    dicts = [d for d in dicts if d["image_id"] not in drop["images"]]
    if drop["annotations"]:
        for d in dicts:
            d["annotations"] = [a for a in d["annotations"] if a["id"] not in drop["annotations"]]
    return dicts
