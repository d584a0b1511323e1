"""Reproducible installs (constraints.txt, `make venv`, `make lock`) and staging weights for a
machine without internet (tools/fetch_weights.py, `make weights`), checked without a network."""

import ast
import functools
import http.server
import importlib.util
import subprocess
import threading
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _setup_requirements():
    """setup.py's install_requires and extras_require, read without running it."""
    call = next(
        node
        for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    keywords = {k.arg: k.value for k in call.keywords}
    return (
        ast.literal_eval(keywords["install_requires"]),
        ast.literal_eval(keywords["extras_require"]),
    )


def _pins():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and Version(version), f"constraints.txt: {line!r} is not NAME==VERSION"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _make_dry_run(target, *variables):
    result = subprocess.run(
        ["make", "-n", target, "VENV=/nonexistent/venv", *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_lock_pins_every_requirement_of_make_venv_within_setup_py_ranges():
    install_requires, extras = _setup_requirements()
    pins = _pins()
    wanted = [*install_requires, *extras["test"], *extras["deploy"], "pip<27", "wheel"]
    wanted += ["torch==2.14.1", "torchvision==0.29.1"]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is installed by make venv but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    assert "acm-d2" not in pins and "sal-detectron2" not in pins  # own code; pinned by sha256


def test_make_venv_installs_through_the_lock_and_make_lock_rewrites_it():
    installs = [line for line in _make_dry_run("venv").splitlines() if "pip install" in line]
    assert len(installs) == 3 and all("-c constraints.txt" in line for line in installs)
    unpinned = _make_dry_run("venv", "CONSTRAINTS=")
    assert "pip install" in unpinned and " -c " not in unpinned
    lock = _make_dry_run("lock")
    assert "freeze --all --exclude-editable" in lock and lock.count("-c constraints.txt") == 0
    assert 'cp "$d/lock" constraints.txt' in lock


def _load_fetch_weights():
    spec = importlib.util.spec_from_file_location(
        "fetch_weights", REPO / "tools" / "fetch_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def weights_host(tmp_path, monkeypatch):
    """A local stand-in for Detectron2's weights host, serving detectron2/ImageNetPretrained/MSRA/
    R-50.pkl; Detectron2's handler of detectron2:// URLs points at it."""
    from detectron2.utils.file_io import Detectron2Handler

    served = tmp_path / "host"
    (served / "detectron2" / "ImageNetPretrained" / "MSRA").mkdir(parents=True)
    payload = b"weights" * 1000
    (served / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl").write_bytes(payload)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prefix = f"http://127.0.0.1:{server.server_address[1]}/detectron2/"
    monkeypatch.setattr(Detectron2Handler, "S3_DETECTRON2_PREFIX", prefix)
    # fetch_weights sets FVCORE_CACHE for the process: monkeypatch restores it after the test.
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "elsewhere"))
    yield payload, server
    server.shutdown()


def test_fetch_weights_stages_a_configs_weights_where_an_offline_run_finds_them(
    tmp_path, weights_host, capsys
):
    from detectron2.utils.file_io import PathManager

    payload, server = weights_host
    fw = _load_fetch_weights()
    config = REPO / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_acm_R_50_FPN_1x.yaml"
    assert fw.config_weights(config) == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    cache = tmp_path / "cache"
    fw.main(["--cache", str(cache), str(config)])
    staged = cache / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    assert staged.read_bytes() == payload
    assert "FVCORE_CACHE" in capsys.readouterr().out
    # Offline: the real host's URL, as a run resolves detectron2://, is served from the staged cache.
    server.shutdown()
    real = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    assert PathManager.get_local_path(real) == str(staged)


def test_fetch_weights_names_what_it_could_not_fetch(tmp_path, weights_host, capsys):
    fw = _load_fetch_weights()
    missing = "detectron2://ImageNetPretrained/MSRA/R-0.pkl"
    with pytest.raises(SystemExit, match="1 of the weights could not be fetched"):
        fw.main(["--cache", str(tmp_path / "cache"), missing])
    assert f"cannot fetch {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="nope.yaml is neither a config file nor a URL"):
        fw.main(["--cache", str(tmp_path / "cache"), "nope.yaml"])
