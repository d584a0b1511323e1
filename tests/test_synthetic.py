"""The generated comparison dataset (acm_d2/data/synthetic.py): valid COCO, masks that match the boxes,
deterministic for a seed, separate splits, and the documented class rule."""

import filecmp
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from acm_d2.data.synthetic import CLASSES, SHAPES, _render_image, generate_dataset, generate_split


def test_json_loads_with_pycocotools_and_every_mask_decodes(tiny_dataset):
    for json_file, image_root in tiny_dataset.values():
        coco = COCO(json_file)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        assert coco.getAnnIds(), "no annotations"
        for image in coco.loadImgs(coco.getImgIds()):
            assert os.path.isfile(os.path.join(image_root, image["file_name"]))
        for ann in coco.loadAnns(coco.getAnnIds()):
            mask = coco.annToMask(ann)
            assert mask.shape == (96, 96) and mask.any()
            assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(mask.sum(), rel=0.15)


def test_mask_bbox_matches_annotation_bbox_within_one_pixel(tiny_dataset):
    coco = COCO(tiny_dataset["train"][0])
    for ann in coco.loadAnns(coco.getAnnIds()):
        ys, xs = np.nonzero(coco.annToMask(ann))
        x, y, w, h = ann["bbox"]
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(
            mask_box, [x, y, x + w, y + h], atol=1.0, err_msg=f"annotation {ann['id']}"
        )


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = generate_split(str(tmp_path / "a"), "train", 3, image_size=64, seed=5)
    b = generate_split(str(tmp_path / "b"), "train", 3, image_size=64, seed=5)
    c = generate_split(str(tmp_path / "c"), "train", 3, image_size=64, seed=6)
    load = lambda split: {k: v for k, v in json.load(open(split[0])).items() if k != "info"}  # noqa: E731
    assert load(a) == load(b) and load(a) != load(c)
    names = sorted(os.listdir(a[1]))
    assert names == sorted(os.listdir(b[1]))
    assert all(
        filecmp.cmp(os.path.join(a[1], n), os.path.join(b[1], n), shallow=False) for n in names
    )


def test_train_and_val_are_different_images_with_the_requested_counts(tmp_path):
    splits = generate_dataset(str(tmp_path), num_train=5, num_val=3, image_size=64, seed=0)
    train, val = (json.load(open(splits[s][0])) for s in ("train", "val"))
    assert len(train["images"]) == 5 and len(val["images"]) == 3
    for coco in (train, val):
        image_ids = {im["id"] for im in coco["images"]}
        assert len(image_ids) == len(coco["images"])
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        assert {a["image_id"] for a in coco["annotations"]} <= image_ids
    assert train["annotations"][0]["segmentation"] != val["annotations"][0]["segmentation"]


def test_class_is_same_as_reference_exactly_when_the_shape_matches():
    """Within an image every 'same' object has one shape (the reference's), and no 'different' object has it;
    over many images both classes are common."""
    rng = np.random.default_rng(0)
    counts = np.zeros(2, int)
    for _ in range(60):
        _image, objects = _render_image(rng, 96, 4)
        same = {shape for shape, _poly, cls in objects if cls == 0}
        different = {shape for shape, _poly, cls in objects if cls == 1}
        assert len(same) <= 1 and not (same & different) and (same | different) <= set(SHAPES)
        for _shape, _poly, cls in objects:
            counts[cls] += 1
    assert counts.min() > 0.35 * counts.sum()


def test_too_small_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_size >= 48"):
        generate_split(str(tmp_path), "train", 1, image_size=32)
