"""tools/predict.py and tools/export_model.py on a tiny random-weight ACM model."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from acm_d2.checkpoint.checkpointer import AtomicCheckpointer
from conftest import REPO, calm_attention, small_cfg

CONFIG = os.path.join(
    REPO, "configs", "COCO-InstanceSegmentation", "mask_rcnn_acm_R_50_FPN_1x.yaml"
)
TINY = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "3",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.DEVICE",
    "cpu",
]


def _run(tool, *args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", tool), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = calm_attention(build_model(small_cfg(CONFIG, *TINY)))
    AtomicCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


def test_predict_draws_writes_coco_json_and_reports_unreadable_inputs(tmp_path, weights):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(images / name), rng.integers(0, 255, (96, 120, 3), dtype=np.uint8))
    (images / "broken.png").write_bytes(b"not an image")
    out, results = tmp_path / "drawn", tmp_path / "results.json"
    result = _run(
        "predict.py",
        "--config-file",
        CONFIG,
        "--input",
        str(images),
        str(tmp_path / "missing*.jpg"),
        "--output",
        str(out),
        "--json",
        str(results),
        "--confidence-threshold",
        "0.0",
        "--opts",
        "MODEL.WEIGHTS",
        weights,
        "DATASETS.TEST",
        "()",
        *TINY,
    )
    # The broken file and the pattern that matches nothing are named; the two images are still done.
    assert result.returncode == 1, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Detectron2's logger writes to stdout
    assert (
        "cannot read image" in log
        and "broken.png" in log
        and "'" + str(tmp_path / "missing*.jpg") + "'" in log
    )
    assert sorted(os.listdir(out)) == ["a.png", "b.jpg"]
    detections = json.loads(results.read_text())
    assert detections and {d["file_name"] for d in detections} == {
        str(images / "a.png"),
        str(images / "b.jpg"),
    }
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(detections[0])
    assert all(
        0 <= d["category_id"] < 3 for d in detections
    )  # no test set: the model's class indices


def test_predict_names_a_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"truncated")
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), dtype=np.uint8))
    result = _run(
        "predict.py",
        "--config-file",
        CONFIG,
        "--input",
        str(image),
        "--json",
        str(tmp_path / "r.json"),
        "--opts",
        "MODEL.WEIGHTS",
        str(bad),
        *TINY,
    )
    assert (
        result.returncode != 0
        and "cannot read checkpoint" in result.stderr
        and str(bad) in result.stderr
    )


@pytest.mark.parametrize(
    "fmt, method", [("torchscript", "tracing"), ("torchscript", "scripting"), ("onnx", "tracing")]
)
def test_export_model_writes_the_model_and_checks_it_against_eager(tmp_path, weights, fmt, method):
    # opset 16: the first with RoiAlign's `aligned`, which Detectron2's ROIAlignV2 needs to export exactly.
    image = tmp_path / "sample.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    # Default ACM impl: the eager model runs the fused op, the exported graph its torch backend's
    # operators, so TorchScript agrees exactly (same process, same CPU); onnxruntime to its own kernels'
    # rounding (0.004 pixel here, with calm attention). Score threshold 0 and 20 detections: many near-tied
    # scores, which the check matches one to one whatever their order.
    result = _run(
        "export_model.py",
        "--config-file",
        CONFIG,
        "--format",
        fmt,
        "--export-method",
        method,
        "--sample-image",
        str(image),
        "--output",
        str(tmp_path / "out"),
        "--opset",
        "16",
        "--tolerance",
        "0.01" if fmt == "onnx" else "1e-6",
        "MODEL.WEIGHTS",
        weights,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "TEST.DETECTIONS_PER_IMAGE",
        "20",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "out" / ("model.onnx" if fmt == "onnx" else "model.ts"))
    assert "max abs difference to eager on the sample" in result.stdout
