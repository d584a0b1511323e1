"""The offline wheelhouse (scripts/build_wheelhouse.py, `make wheelhouse`), checked without a network."""

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _load_build_wheelhouse():
    spec = importlib.util.spec_from_file_location(
        "build_wheelhouse", REPO / "scripts" / "build_wheelhouse.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bw = _load_build_wheelhouse()


def _requires(graph):
    return {name: [Requirement(r) for r in reqs] for name, reqs in graph.items()}


# A resolution shaped like the real one: acm_d2's needs reach numpy directly and through pycocotools,
# matplotlib pulls a subtree of its own, black needs a backport only before Python 3.12.
GRAPH = _requires(
    {
        "fvcore": ["numpy", "yacs>=0.1.8", "iopath>=0.1.7"],
        "yacs": ["pyyaml"],
        "pyyaml": [],
        "iopath": ["tqdm", "portalocker"],
        "tqdm": [],
        "portalocker": [],
        "numpy": [],
        "pycocotools": ["numpy", "matplotlib>=2.1.0"],
        "matplotlib": ["numpy>=1.23", "kiwisolver>=1.3.1", "fonttools"],
        "kiwisolver": [],
        "fonttools": ["brotli; extra == 'woff'"],
        "brotli": [],
        "black": [
            "click>=8",
            "tomli>=1.1.0; python_version < '3.11'",
            "backport; python_version < '3.12'",
        ],
        "click": [],
        "tomli": [],
        "backport": [],
    }
)
ROOTS = [Requirement(r) for r in ("fvcore>=0.1.5", "pycocotools>=2.0.2", "black", "numpy")]


def test_closure_leaves_out_excluded_distributions_and_what_only_they_need():
    needed = bw.closure(ROOTS, GRAPH, {"matplotlib", "numpy"}, bw.marker_environment("3.12"))
    assert needed == sorted(
        [
            "fvcore",
            "yacs",
            "pyyaml",
            "iopath",
            "tqdm",
            "portalocker",
            "pycocotools",
            "black",
            "click",
        ]
    )


def test_closure_evaluates_markers_for_the_target_python_not_this_one():
    exclude = {"matplotlib", "numpy"}
    assert "backport" in bw.closure(ROOTS, GRAPH, exclude, bw.marker_environment("3.11"))
    assert "backport" not in bw.closure(ROOTS, GRAPH, exclude, bw.marker_environment("3.12"))
    assert "tomli" not in bw.closure(ROOTS, GRAPH, exclude, bw.marker_environment("3.11"))


def test_closure_follows_requested_extras_only():
    env = bw.marker_environment("3.12")
    assert "brotli" not in bw.closure(ROOTS, GRAPH, set(), env)
    assert "brotli" in bw.closure([Requirement("fonttools[woff]")], GRAPH, set(), env)


def test_closure_names_a_needed_distribution_that_pip_did_not_resolve():
    graph = dict(GRAPH, click=[Requirement("colorama")])
    with pytest.raises(SystemExit, match="colorama.*Python 3.12"):
        bw.closure(ROOTS, graph, {"numpy"}, bw.marker_environment("3.12"))


def test_refuses_a_non_empty_output_folder_before_building_anything(tmp_path):
    (tmp_path / "old.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="is not empty"):
        bw.main(["--output", str(tmp_path), "--exclude", "torch"])


def test_install_detectron2_wheel_only_without_a_folder_prints_usage():
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_detectron2.sh"), "--wheel-only"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "usage: install_detectron2.sh [--wheel-only DIR] PYTHON" in result.stderr
    assert "--wheel-only needs a folder" in result.stderr


def test_make_wheelhouse_passes_its_variables_to_the_script():
    def dry_run(*variables):
        result = subprocess.run(
            ["make", "-n", "wheelhouse", *variables],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return " ".join(result.stdout.replace("\\\n", " ").split())

    default = dry_run()
    assert (
        "scripts/build_wheelhouse.py --output wheelhouse --exclude torch torchvision numpy pillow"
        in default
    )
    custom = dry_run(
        "PYTHON_VERSION=3.12",
        "WHEELHOUSE=wheelhouse-gpu",
        "WHEELHOUSE_EXCLUDE=torch opencv-python-headless",
        "WHEELHOUSE_EXTRAS=deploy",
    )
    assert (
        "--python-version 3.12 --output wheelhouse-gpu --exclude torch opencv-python-headless "
        "--extras deploy" in custom
    )


def _tiny_wheel(folder, body="VALUE = 1\n", name="tinypkg", metadata=""):
    """A minimal pure-Python wheel `name` 1.0 (`metadata`: more METADATA lines), written without a
    build backend."""
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/__init__.py", body)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{metadata}"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def _pip_dry_run(folder):
    """The documented install (build_wheelhouse.install_command), as a dry run: nothing is installed."""
    command = bw.install_command(folder).split()[1:]
    return subprocess.run(
        [sys.executable, "-m", "pip", *command[:1], "--dry-run", "--no-cache-dir", *command[1:]],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manifest_pins_every_wheel_by_hash_and_a_tampered_wheel_is_refused(tmp_path):
    wheel = _tiny_wheel(tmp_path)
    manifest = bw.write_manifest(tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert manifest.read_text() == f"tinypkg==1.0 --hash=sha256:{digest}\n"
    result = _pip_dry_run(tmp_path)
    assert result.returncode == 0 and "Would install tinypkg-1.0" in result.stdout, result.stderr
    _tiny_wheel(tmp_path, body="import os; os.system('echo pwned')\n")  # same name, new content
    result = _pip_dry_run(tmp_path)
    assert result.returncode != 0 and "DO NOT MATCH THE HASHES" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "version, message",
    [("three", "not a CPython version of the form 3.N"), ("3.8", "needs Python 3.10 or newer")],
)
def test_a_bad_python_version_is_a_usage_error_not_a_traceback(tmp_path, capsys, version, message):
    with pytest.raises(SystemExit) as exited:
        bw.main(["--python-version", version, "--output", str(tmp_path), "--exclude", "torch"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--python-version" in error and message in error and "Traceback" not in error
    assert not any(tmp_path.iterdir())


def test_install_detectron2_help_and_bad_arguments_print_usage():
    def script(*arguments):
        return subprocess.run(
            ["bash", str(REPO / "scripts" / "install_detectron2.sh"), *arguments],
            capture_output=True,
            text=True,
        )

    help_ = script("--help")
    assert help_.returncode == 0 and "--wheel-only DIR" in help_.stdout and not help_.stderr
    for arguments, message in [
        (("--frob",), "unknown option --frob"),
        (("/nonexistent/python",), "is not a Python interpreter"),
        (("a", "b"), "give one PYTHON (got 2 arguments)"),
    ]:
        result = script(*arguments)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
        assert "usage: install_detectron2.sh" in result.stderr


def test_extras_add_acm_d2s_extra_requirements_and_an_unknown_extra_is_named(tmp_path):
    own = _tiny_wheel(
        tmp_path,
        name="acm_d2",
        metadata="Requires-Dist: fvcore\nProvides-Extra: deploy\n"
        'Requires-Dist: onnx>=1.16; extra == "deploy"\nRequires-Dist: torch>=2.1\n',
    )
    other = _tiny_wheel(
        tmp_path, name="sal_detectron2", metadata='Requires-Dist: black; extra == "deploy"\n'
    )
    env = bw.marker_environment("3.12")

    def names(extras):
        return sorted(r.name for r in bw.root_requirements([own, other], extras, {"torch"}, env))

    assert names([]) == ["fvcore"]
    assert names(["deploy"]) == ["fvcore", "onnx"]  # acm_d2's extra only, torch excluded
    with pytest.raises(SystemExit, match="--extras gpu: acm_d2 has the extras deploy"):
        names(["gpu"])
