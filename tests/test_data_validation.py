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
        (
            lambda c: c["annotations"][3].pop("bbox"),
            r"annotation id 4 lacks the key\(s\) \['bbox'\]",
        ),
        (
            lambda c: c["annotations"][2].update(bbox=[1, 2, 3]),
            r"annotation id 3 has bbox \[1, 2, 3\]",
        ),
        (lambda c: c["annotations"][1].update(category_id=7), "annotation id 2 has category_id 7"),
        (lambda c: c["images"][0].pop("height"), r"image id 1 lacks the key\(s\) \['height'\]"),
        (lambda c: c["images"].append(dict(c["images"][0])), "image id 1 appears more than once"),
    ],
)
def test_malformed_coco_file_is_an_error_naming_file_and_record(
    coco, tmp_path, tiny_dataset, how, match
):
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
    anns[3]["bbox"] = [120.0, 10.0, 20.0, 20.0]  # entirely right of its 96 px image
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
    assert (
        "dropped 2 images under 8 px or with an aspect ratio over 32: image 102 'tiny.png'; image 103"
        in log
    )
    assert (
        "dropped 1 annotations with degenerate boxes (w or h <= 0): annotation 1 (image 1 '000001.png')"
        in log
    )
    assert (
        "dropped 1 annotations whose polygons are empty" in log and ": annotation 2 (image " in log
    )
    assert (
        "dropped 1 annotations whose box lies entirely outside the image: annotation 4 (image "
        in log
    )
    assert "dropped 1 annotations whose image_id is not in 'images': annotation 1000\n" in log
    assert (
        "dropped 1 annotations of the dropped images: annotation 1001 (image 101 'gone.png')" in log
    )
    assert "have no instance" in log
    ids = {d["image_id"] for d in dicts}
    assert ids == set(range(1, 9)) | {104}
    ann_ids = {a["id"] for d in dicts for a in d["annotations"]}
    assert not ann_ids & {1, 2, 4, 1000, 1001} and len(ann_ids) == len(coco["annotations"]) - 3


def test_training_stream_runs_through_a_dataset_with_dropped_records(coco, tmp_path, tiny_dataset):
    from acm_d2.data.stream import build_resumable_train_loader

    image_root = tiny_dataset["train"][1]
    path = write(tmp_path, bad_but_usable(coco, image_root))
    register_coco_dataset("tiny_with_bad_records", path, image_root)
    cfg = small_cfg(
        "COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml",
        "DATASETS.TRAIN",
        ("tiny_with_bad_records",),
        "SOLVER.IMS_PER_BATCH",
        4,
        "SEED",
        0,
    )
    usable = {d["image_id"] for d in load_validated_coco_json(path, image_root) if d["annotations"]}
    stream = iter(build_resumable_train_loader(cfg))
    seen = {d["image_id"] for _ in range(6) for d in next(stream)}  # 3 epochs of the usable images
    assert seen == usable and len(usable) >= 7


def test_no_usable_image_is_an_error(coco, tmp_path):
    path = write(tmp_path, coco)
    with pytest.raises(ValueError, match="no usable image is left.*missing files: 8"):
        validate_coco_json(path, str(tmp_path))


def _peak_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("where", ["polygon", "bbox", "keypoints"])
def test_nonfinite_or_huge_coordinate_drops_its_annotation_quickly(
    coco, tmp_path, tiny_dataset, caplog, where, value
):
    """One such number used to make pycocotools rasterise a polygon of ~1e30 points (> 20 GB)."""
    import time

    from detectron2.structures.masks import polygons_to_bitmask

    coco = copy.deepcopy(coco)
    ann = coco["annotations"][0]
    if where == "polygon":
        ann["segmentation"][0][3] = value
    elif where == "bbox":
        ann["bbox"][2] = value
    else:
        ann["keypoints"] = [10.0, 10.0, 2, value, 5.0, 2]
    image_root = tiny_dataset["train"][1]
    path = write(tmp_path, json.dumps(coco))  # NaN / Infinity tokens, as Python's json writes them
    peak, start = _peak_rss_mib(), time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="acm_d2.data.validate"):
        dicts = load_validated_coco_json(path, image_root)
    # The masks the mapper and mask head will rasterise, rasterised here: cheap once the record is gone.
    for d in dicts:
        for a in d["annotations"]:
            polygons_to_bitmask([np.asarray(p) for p in a["segmentation"]], d["height"], d["width"])
    assert time.perf_counter() - start < 5 and _peak_rss_mib() - peak < 200
    assert "annotations with a NaN, Inf or far-away coordinate" in caplog.text
    assert "annotation 1 (image 1 '000001.png')" in caplog.text
    assert 1 not in {a["id"] for d in dicts for a in d["annotations"]}


def test_bad_rle_drops_its_annotation(coco, tmp_path, tiny_dataset, caplog):
    coco = copy.deepcopy(coco)
    coco["annotations"][0]["segmentation"] = {"size": [10**9, 10**9], "counts": [10**9]}
    coco["annotations"][1]["segmentation"] = {
        "size": [96, 96],
        "counts": [5, 10],
    }  # covers 15 of 96*96 px
    coco["annotations"][2]["segmentation"] = {
        "size": [96, 96],
        "counts": [9000, 216],
    }  # a valid RLE
    with caplog.at_level(logging.WARNING, logger="acm_d2.data.validate"):
        dicts = load_validated_coco_json(write(tmp_path, coco), tiny_dataset["train"][1])
    assert "dropped 2 annotations whose RLE size is not the image's [height, width]" in caplog.text
    kept = {a["id"] for d in dicts for a in d["annotations"]}
    assert 1 not in kept and 2 not in kept and 3 in kept


@pytest.mark.parametrize(
    "segmentation, match",
    [
        ([[1.0, 2.0, "x", 4.0, 5.0, 6.0]], "unsupported operand"),
        ("mask.png", "neither a list of polygons nor an RLE"),
        ({"size": [96, 96], "counts": [10**18]}, "not a list of non-negative 32-bit integers"),
    ],
)
def test_malformed_segmentation_is_an_error_naming_the_record(
    coco, tmp_path, tiny_dataset, segmentation, match
):
    coco = copy.deepcopy(coco)
    coco["annotations"][0]["segmentation"] = segmentation
    with pytest.raises(
        ValueError, match=f"bad.json: annotation id 1 \\(image 1 '000001.png'\\): .*{match}"
    ):
        validate_coco_json(write(tmp_path, coco), tiny_dataset["train"][1])


def test_duplicate_file_names_are_an_error_naming_both_ids(coco, tmp_path, tiny_dataset):
    coco = copy.deepcopy(coco)
    coco["images"][3]["file_name"] = coco["images"][1]["file_name"]
    with pytest.raises(
        ValueError,
        match=r"1 image\(s\) share a file_name .*'000002.png' \(image ids 2 and 4\); merge",
    ):
        validate_coco_json(write(tmp_path, coco), tiny_dataset["train"][1])


def broken_images(coco, image_root):
    """Images 1-5 of the generated data, each broken in one way; returns the new coco and the problems."""
    coco = copy.deepcopy(coco)
    files = [f"{image_root}/{im['file_name']}" for im in coco["images"]]
    open(files[0], "wb").close()
    with open(files[1], "w") as f:
        f.write("not an image")
    png = open(files[2], "rb").read()
    with open(files[2], "wb") as f:
        f.write(png[: len(png) // 2])
    jpeg = cv2.imencode(".jpg", np.zeros((96, 96, 3), np.uint8))[1].tobytes()
    with open(f"{image_root}/cut.jpg", "wb") as f:
        f.write(jpeg[: len(jpeg) - 100])
    coco["images"][3]["file_name"] = "cut.jpg"
    coco["images"][4]["width"] = 120
    return coco, {
        1: "empty file",
        2: "not a readable image",
        3: "truncated",
        4: "truncated JPEG",
        5: "96x96 px, but the JSON says 120x96",
    }


def test_image_check_drops_unreadable_and_resized_images_naming_them(
    coco, tmp_path, tiny_dataset, caplog
):
    import shutil

    image_root = str(tmp_path / "images")
    shutil.copytree(tiny_dataset["train"][1], image_root)
    coco, problems = broken_images(coco, image_root)
    path = write(tmp_path, coco)
    with caplog.at_level(logging.WARNING, logger="acm_d2.data.validate"):
        dropped = validate_coco_json(path, image_root)  # the default checks datasets this small
    assert dropped["images"] == set(problems)
    assert "dropped 5 images whose file is unreadable or of another size" in caplog.text
    for image_id, problem in problems.items():
        record = f"image {image_id} '{coco['images'][image_id - 1]['file_name']}': "
        assert problem in caplog.text.split(record)[1].split(";")[0]
    assert validate_coco_json(path, image_root, check_images=False)["images"] == set()


@pytest.mark.slow
def test_validation_costs_about_as_much_as_parsing_the_json(tmp_path):
    """A tenth of COCO train2017 (11.8k images, 86k annotations, each with a 20-point polygon): the checks
    add less than the JSON parse they follow, so a COCO-size file costs about two parses."""
    import time

    rng = np.random.default_rng(0)
    num_images, num_annotations = 11_800, 86_000
    image_root = tmp_path / "images"
    image_root.mkdir()
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480}
        for i in range(num_images)
    ]
    for image in images:
        (image_root / image["file_name"]).touch()
    xy = rng.uniform(10, 400, size=(num_annotations, 2)).round(2)
    annotations = [
        {
            "id": i,
            "image_id": i % num_images,
            "category_id": 1,
            "iscrowd": 0,
            "area": 100.0,
            "bbox": [x, y, 30.5, 20.25],
            "segmentation": [[v for k in range(20) for v in (x + k, y + k % 7)]],
        }
        for i, (x, y) in enumerate(xy.tolist())
    ]
    path = write(
        tmp_path,
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        ),
        "coco_tenth.json",
    )
    del annotations
    start = time.perf_counter()
    with open(path) as f:
        json.load(f)
    parse = time.perf_counter() - start
    start = time.perf_counter()
    dropped = validate_coco_json(path, str(image_root), check_images=False)
    seconds = time.perf_counter() - start
    print(f"json.load {parse:.2f} s, validate_coco_json {seconds:.2f} s")
    assert dropped == {"images": set(), "annotations": set()}
    assert seconds < 3 * parse + 1


@pytest.mark.parametrize(
    "flag, kept", [("--no-check-images", True), ("--check-images", False), (None, False)]
)
def test_check_images_flag_reaches_the_loader(coco, tmp_path, tiny_dataset, flag, kept):
    import shutil

    from detectron2.data import DatasetCatalog

    from acm_d2.engine import argument_parser, register_datasets

    image_root = str(tmp_path / "images")
    shutil.copytree(tiny_dataset["train"][1], image_root)
    open(f"{image_root}/000001.png", "wb").close()  # zero bytes
    name = f"flag_{tmp_path.name}"
    argv = ["--coco-dataset", name, write(tmp_path, coco), image_root] + ([flag] if flag else [])
    register_datasets(argument_parser().parse_args(argv))
    assert (1 in {d["image_id"] for d in DatasetCatalog.get(name)}) == kept
