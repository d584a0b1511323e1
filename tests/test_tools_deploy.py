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
from conftest import REPO, calm_attention, import_tool, small_cfg

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


def _write_png(path, size=(32, 40)):
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))
    return str(path)


def _predict_args(*args):
    return ["--config-file", CONFIG, *args]


class _RecordingPredictor:
    """Stands in for the model: records the images predict feeds it, returns no detections."""

    images = []

    def __init__(self, cfg, args):
        pass

    def __call__(self, image):
        from detectron2.structures import Boxes, Instances

        type(self).images.append(image)
        empty = Instances(
            image.shape[:2], pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0)
        )
        empty.pred_classes = torch.zeros(0, dtype=torch.long)
        return {"instances": empty}


@pytest.fixture
def predict(monkeypatch):
    tool = import_tool("predict")
    _RecordingPredictor.images = []
    monkeypatch.setattr(tool, "Predictor", _RecordingPredictor)
    return tool


def test_predict_refuses_an_output_folder_that_holds_the_inputs(tmp_path, predict, capsys):
    image = _write_png(tmp_path / "a.png")
    before = open(image, "rb").read()
    assert predict.main(_predict_args("--input", str(tmp_path), "--output", str(tmp_path))) == 2
    assert open(image, "rb").read() == before and not _RecordingPredictor.images
    assert "its drawing would replace the image" in capsys.readouterr().err


def test_predict_refuses_a_json_path_that_is_an_input(tmp_path, predict):
    image = _write_png(tmp_path / "a.png")
    assert predict.main(_predict_args("--input", image, "--json", image)) == 2
    assert cv2.imread(image) is not None


def test_predict_refuses_two_inputs_that_would_share_a_drawing(tmp_path, predict, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _write_png(tmp_path / "a" / "x.png"), _write_png(tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    assert predict.main(_predict_args("--input", first, second, "--output", str(out))) == 2
    error = capsys.readouterr().err
    assert first in error and second in error and not out.exists()


def test_predict_draws_a_bmp_and_goes_on_after_it(tmp_path, predict):
    images = [_write_png(tmp_path / "a.bmp"), _write_png(tmp_path / "b.png")]
    out, results = tmp_path / "out", tmp_path / "r.json"
    assert (
        predict.main(
            _predict_args("--input", *images, "--output", str(out), "--json", str(results))
        )
        == 0
    )
    assert sorted(os.listdir(out)) == ["a.bmp", "b.png"] and json.loads(results.read_text()) == []


def test_predict_reads_a_16_bit_png_as_training_does(tmp_path, predict):
    image = str(tmp_path / "xray.png")
    cv2.imwrite(image, np.full((16, 16), 32896, dtype=np.uint16))  # mid-grey in 16 bits
    assert predict.main(_predict_args("--input", image, "--json", str(tmp_path / "r.json"))) == 0
    (seen,) = _RecordingPredictor.images
    assert seen.dtype == np.uint8 and (seen == 128).all()  # 32896 / 257, not clipped to 255


def test_predict_skips_an_image_over_the_pixel_limit_by_name(tmp_path, predict, caplog):
    big, small = (
        _write_png(tmp_path / "big.png", (40, 40)),
        _write_png(tmp_path / "small.png", (8, 8)),
    )
    args = _predict_args(
        "--input", big, small, "--json", str(tmp_path / "r.json"), "--max-pixels", "1000"
    )
    assert predict.main(args) == 1
    assert len(_RecordingPredictor.images) == 1
    assert "big.png: 40 x 40 = 1600 pixels, over the limit of 1000" in caplog.text
    assert "raise --max-pixels" in caplog.text


def test_predict_keeps_the_previous_json_when_writing_fails(tmp_path, predict, monkeypatch):
    results = tmp_path / "r.json"
    results.write_text('[{"previous": "results"}]')

    def failing_dump(obj, f):
        f.write("[{")
        raise OSError("disk full")

    monkeypatch.setattr(predict.json, "dump", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        predict.main(
            _predict_args("--input", _write_png(tmp_path / "a.png"), "--json", str(results))
        )
    assert json.loads(results.read_text()) == [{"previous": "results"}]
    assert os.listdir(tmp_path) == sorted(["a.png", "r.json"]) or set(os.listdir(tmp_path)) == {
        "a.png",
        "r.json",
    }


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5"])
def test_predict_refuses_a_confidence_threshold_that_is_not_a_score(value, capsys):
    with pytest.raises(SystemExit):
        import_tool("predict").parse_args(
            _predict_args("--input", "a.png", "--json", "r.json", "--confidence-threshold", value)
        )
    assert "--confidence-threshold" in capsys.readouterr().err


def test_predict_takes_trailing_overrides_opts_and_trust_checkpoint():
    parse = import_tool("predict").parse_args
    trailing = parse(
        _predict_args(
            "--input", "a.png", "--json", "r.json", "--trust-checkpoint", "MODEL.WEIGHTS", "w.pth"
        )
    )
    flag = parse(
        _predict_args("--input", "a.png", "--json", "r.json", "--opts", "MODEL.WEIGHTS", "w.pth")
    )
    assert trailing.opts == flag.opts == ["MODEL.WEIGHTS", "w.pth"] and trailing.trust_checkpoint


def test_predict_names_an_override_swallowed_by_input(capsys):
    with pytest.raises(SystemExit):
        import_tool("predict").parse_args(
            _predict_args("--json", "r.json", "--input", "a.png", "MODEL.WEIGHTS", "w")
        )
    assert "'MODEL.WEIGHTS' looks like a config key" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["predict", "export_model"])
def test_tools_refuse_weights_that_do_not_fit_the_config(tmp_path, weights, tool):
    # Another class count: the box and mask predictors would stay random; and no weights at all.
    out = (
        ("--json", str(tmp_path / "r.json"))
        if tool == "predict"
        else ("--output", str(tmp_path / "out"))
    )
    args = ["--config-file", CONFIG]
    if tool == "predict":
        args += ["--input", _write_png(tmp_path / "a.png")]
    args += out
    main = import_tool(tool).main
    assert main([*args, *TINY, "MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.WEIGHTS", weights]) == 1
    assert main([*args, *TINY, "MODEL.WEIGHTS", ""]) == 1
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "out" / "model.ts").exists()


def test_export_model_keeps_the_previous_model_when_the_check_fails(tmp_path, weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.ts").write_bytes(b"the verified model")
    # A negative tolerance: no export can pass the check.
    args = [
        "--config-file",
        CONFIG,
        "--output",
        str(out),
        "--tolerance",
        "-1",
        "--trust-checkpoint",
        *TINY,
        "MODEL.WEIGHTS",
        weights,
    ]
    assert import_tool("export_model").main(args) == 1
    assert (out / "model.ts").read_bytes() == b"the verified model" and os.listdir(out) == [
        "model.ts"
    ]
    assert "was left as it was" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--opset", "99"], "--opset 99"),
        (["--opset", "9"], "--opset 9"),
        (["--output", "FILE"], "is a file; give a folder"),
    ],
    ids=["opset_too_high", "opset_too_low", "output_is_a_file"],
)
def test_export_model_refuses_bad_arguments_by_name(tmp_path, args, message, capsys):
    existing = tmp_path / "file"
    existing.write_text("")
    args = [str(existing) if a == "FILE" else a for a in args]
    argv = [
        "--config-file",
        CONFIG,
        "--format",
        "onnx",
        "--output",
        str(tmp_path / "o"),
        *args,
        "--trust-checkpoint",
    ]
    with pytest.raises(SystemExit):
        import_tool("export_model").parse_args(argv)
    assert message in capsys.readouterr().err


def test_export_model_reads_a_16_bit_sample_as_training_does(tmp_path):
    from acm_d2.config import load_config

    image = str(tmp_path / "xray.png")
    cv2.imwrite(image, np.full((96, 128), 32896, dtype=np.uint16))
    sample = import_tool("export_model").sample_image(load_config(CONFIG, TINY), image)
    assert sample.shape == (3, 96, 128) and (sample == 128).all()
