"""A generated COCO-format instance-segmentation dataset where an object's class depends on another
region of the image, so that comparing regions matters (as in the paper's chest X-ray tasks).

The rule: every image has one *reference* shape (circle, square or triangle) drawn inside a white
frame in one of its corners, and 1-4 *objects* (also circles, squares or triangles) elsewhere.
An object's class is "same_as_reference" when its shape is the reference's shape and
"different_from_reference" otherwise. Colours, sizes and rotations are random and independent of
the class, and half of the objects match, so nothing inside an object's own box tells its class:
a model must compare it with the framed reference. The reference itself is not annotated.

Images are PNG files; annotations are a COCO JSON with polygon masks. The output depends only on
the seed and the sizes, so tests and the demo see the same data on every machine.
"""

import argparse
import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

from ..utils.files import atomic_write

__all__ = ["CLASSES", "SHAPES", "generate_split", "generate_dataset", "register_synthetic_dataset"]

CLASSES = ("same_as_reference", "different_from_reference")
SHAPES = ("circle", "square", "triangle")
_SUBPIXEL_BITS = 4  # cv2.fillPoly's fixed-point shift: polygons are drawn at 1/16 pixel


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (N x 2, float) of a shape inscribed in a circle of `radius` around (cx, cy)."""
    corners = {"circle": 32, "square": 4, "triangle": 3}[shape]
    t = angle + np.arange(corners) * 2 * np.pi / corners
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _fill(image: np.ndarray, polygon: np.ndarray, color) -> None:
    pts = np.round(polygon * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(image, [pts], color, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour gradient with pixel noise, so that flat colour gives nothing away."""
    corners = rng.uniform(40, 140, size=(2, 2, 3)).astype(np.float32)
    image = cv2.resize(corners, (size, size), interpolation=cv2.INTER_LINEAR)
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _random_color(rng: np.random.Generator) -> Tuple[int, int, int]:
    # Away from the background's range (40-140) on at least one channel, so objects are visible.
    color = rng.integers(0, 256, size=3)
    color[rng.integers(3)] = rng.choice([rng.integers(0, 20), rng.integers(190, 256)])
    return tuple(int(c) for c in color)


def _render_image(rng: np.random.Generator, size: int, max_objects: int):
    """One image and its objects as (shape name, polygon, class index)."""
    image = _background(rng, size)
    ref_radius = size * rng.uniform(0.07, 0.10)
    half = ref_radius + 4
    corner_x, corner_y = rng.integers(2, size=2)
    ref_cx = half + 2 if corner_x == 0 else size - half - 2
    ref_cy = half + 2 if corner_y == 0 else size - half - 2
    ref_shape = SHAPES[rng.integers(len(SHAPES))]
    cv2.rectangle(
        image,
        (int(ref_cx - half), int(ref_cy - half)),
        (int(ref_cx + half), int(ref_cy + half)),
        (255, 255, 255),
        2,
    )
    _fill(
        image,
        _shape_polygon(ref_shape, ref_cx, ref_cy, ref_radius, rng.uniform(0, 2 * np.pi)),
        _random_color(rng),
    )

    placed = [(ref_cx, ref_cy, half * 1.5)]  # circles that new objects must not touch
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(50):
            radius = size * rng.uniform(0.08, 0.16)
            cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
            if all(np.hypot(cx - px, cy - py) > radius + pr + 2 for px, py, pr in placed):
                break
        else:
            continue  # no free spot: fewer objects in this image
        same = rng.random() < 0.5
        others = [s for s in SHAPES if s != ref_shape]
        shape = ref_shape if same else others[rng.integers(len(others))]
        polygon = _shape_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        _fill(image, polygon, _random_color(rng))
        placed.append((cx, cy, radius))
        objects.append((shape, polygon, 0 if same else 1))
    return image, objects


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def generate_split(
    output_dir: str,
    split: str,
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 4,
) -> Tuple[str, str]:
    """Write `num_images` PNGs to output_dir/split/ and output_dir/split.json; return (json, image dir)."""
    if num_images < 1 or image_size < 48 or max_objects < 1:
        raise ValueError(
            f"need num_images >= 1, image_size >= 48 and max_objects >= 1, got {num_images}, {image_size}, {max_objects}"
        )
    rng = np.random.default_rng([seed, sum(split.encode())])
    image_dir = os.path.join(output_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for image_id in range(1, num_images + 1):
        image, objects = _render_image(rng, image_size, max_objects)
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for _shape, polygon, category in objects:
            x0, y0 = np.clip(polygon.min(axis=0), 0, image_size)
            x1, y1 = np.clip(polygon.max(axis=0), 0, image_size)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "area": round(_polygon_area(polygon), 2),
                    "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"acm_d2 synthetic comparison dataset, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ],
    }
    json_file = os.path.join(output_dir, f"{split}.json")
    atomic_write(
        json_file, lambda f: json.dump(coco, f), "w"
    )  # a reader never sees a half-written JSON
    return json_file, image_dir


def generate_dataset(
    output_dir: str,
    num_train: int = 300,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 4,
) -> Dict[str, Tuple[str, str]]:
    """Both splits; returns {"train": (json, image dir), "val": (json, image dir)}."""
    return {
        split: generate_split(output_dir, split, n, image_size, seed, max_objects)
        for split, n in (("train", num_train), ("val", num_val))
    }


def register_synthetic_dataset(prefix: str, splits: Dict[str, Tuple[str, str]]) -> List[str]:
    """Register each split as `<prefix>_<split>` with Detectron2's COCO loader; return the names."""
    from .datasets import register_coco_dataset

    names = []
    for split, (json_file, image_root) in splits.items():
        register_coco_dataset(f"{prefix}_{split}", json_file, image_root)
        names.append(f"{prefix}_{split}")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", required=True, help="folder for train/, val/, train.json, val.json"
    )
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = generate_dataset(
        args.output, args.num_train, args.num_val, args.image_size, args.seed, args.max_objects
    )
    for split, (json_file, image_root) in splits.items():
        print(f"{split}: {json_file} {image_root}")


if __name__ == "__main__":
    main()
