"""acm_d2.data.validate: malformed COCO files are errors naming the file and record; unusable records are
dropped with a logged count and ids, and the training stream then runs through them without a crash."""
import copy
import json
import logging

import cv2
import numpy as np
import pytest

from acm_d2.data.datasets import register_coco_dataset
from acm_d2.data.validate import load_validated_coco_json, validate_coco_json
from conftest import small_cfg


def write(tmp_path, coco, name="bad.json"):
    path = tmp_path / name
    path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return str(path)


@pytest.fixture
def coco(tiny_dataset):
    with open(tiny_dataset["train"][0]) as f:
        return json.load(f)


def _break(coco, how):
    coco = copy.deepcopy(coco)
    how(coco)
    return coco


@pytest.mark.parametrize(
    "how, match",
    [
        (lambda c: c.pop("images"), "needs 'images' and 'categories'"),
        (lambda c: c["annotations"][3].pop("bbox"), r"annotation id 4 lacks the key\(s\) \['bbox'\]"),
        (lambda c: c["annotations"][2].update(bbox=[1, 2, 3]), r"annotation id 3 has bbox \[1, 2, 3\]"),
        (lambda c: c["annotations"][1].update(category_id=7), "annotation id 2 has category_id 7"),
        (lambda c: c["images"][0].pop("height"), r"image id 1 lacks the key\(s\) \['height'\]"),
        (lambda c: c["images"].append(dict(c["images"][0])), "image id 1 appears more than once"),
    ],
)
def test_malformed_coco_file_is_an_error_naming_file_and_record(coco, tmp_path, tiny_dataset, how, match):
    path = write(tmp_path, _break(coco, how))
    with pytest.raises(ValueError, match=f"bad.json: .*{match}"):
        validate_coco_json(path, tiny_dataset["train"][1])


def test_invalid_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match="bad.json: invalid JSON at line 2"):
        validate_coco_json(path, str(tmp_path))


def bad_but_usable(coco, image_root):
    """The generated file with one of each recoverable problem; returns (coco, what is dropped)."""
    coco = copy.deepcopy(coco)
    anns = coco["annotations"]
    anns[0]["bbox"][2] = 0.0  # degenerate box
    anns[1]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # no polygon of 3+ points
    anns.append(dict(anns[2], id=1000, image_id=999))  # image id not in images
    cv2.imwrite(f"{image_root}/tiny.png", np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(f"{image_root}/strip.png", np.zeros((3, 200, 3), np.uint8))
    cv2.imwrite(f"{image_root}/unannotated.png", np.zeros((96, 96, 3), np.uint8))
    anns[3]["bbox"] = [200.0, 10.0, 20.0, 20.0]  # entirely right of its 96 px image
    extra = [
        {"id": 101, "file_name": "gone.png", "width": 96, "height": 96},
        {"id": 102, "file_name": "tiny.png", "width": 4, "height": 4},
        {"id": 103, "file_name": "strip.png", "width": 200, "height": 3},
        {"id": 104, "file_name": "unannotated.png", "width": 96, "height": 96},
    ]
    coco["images"] += extra
    anns.append(dict(anns[2], id=1001, image_id=101))
    return coco


def test_recoverable_problems_are_dropped_and_logged(coco, tmp_path, tiny_dataset, caplog):
    image_root = tiny_dataset["train"][1]
    path = write(tmp_path, bad_but_usable(coco, image_root))
    with caplog.at_level(logging.INFO, logger="acm_d2.data.validate"):
        dicts = load_validated_coco_json(path, image_root)
    log = caplog.text
    assert "dropped 1 images whose file is missing" in log and "image 101 'gone.png'" in log
    assert "dropped 2 images under 8 px or with an aspect ratio over 32: image 102 'tiny.png'; image 103 'strip.png'" in log
    assert "dropped 1 annotations with degenerate boxes (w or h <= 0): annotation 1 (image 1 '000001.png')" in log
    assert "dropped 1 annotations whose polygons are empty" in log and ": annotation 2 (image " in log
    assert "dropped 1 annotations whose box lies entirely outside the image: annotation 4 (image " in log
    assert "dropped 1 annotations whose image_id is not in 'images': annotation 1000\n" in log
    assert "dropped 1 annotations of the dropped images: annotation 1001 (image 101 'gone.png')" in log
    assert "have no instance" in log
    ids = {d["image_id"] for d in dicts}
    assert ids == set(range(1, 9)) | {104}
    ann_ids = {a["id"] for d in dicts for a in d["annotations"]}
    assert not ann_ids & {1, 2, 4, 1000, 1001} and len(ann_ids) == len(coco["annotations"]) - 3


def test_training_stream_runs_through_a_dataset_with_dropped_records(coco, tmp_path, tiny_dataset):
    from acm_d2.engine.resume import build_resumable_train_loader

    image_root = tiny_dataset["train"][1]
    path = write(tmp_path, bad_but_usable(coco, image_root))
    register_coco_dataset("tiny_with_bad_records", path, image_root)
    cfg = small_cfg("COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml",
                    "DATASETS.TRAIN", ("tiny_with_bad_records",), "SOLVER.IMS_PER_BATCH", 4, "SEED", 0)
    usable = {d["image_id"] for d in load_validated_coco_json(path, image_root) if d["annotations"]}
    stream = iter(build_resumable_train_loader(cfg))
    seen = {d["image_id"] for _ in range(6) for d in next(stream)}  # 3 epochs of the usable images
    assert seen == usable and len(usable) >= 7


def test_no_usable_image_is_an_error(coco, tmp_path):
    path = write(tmp_path, coco)
    with pytest.raises(ValueError, match="no usable image is left.*missing files: 8"):
        validate_coco_json(path, str(tmp_path))
