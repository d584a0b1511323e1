"""Writes a folder of wheels that installs acm_d2 into an existing torch environment without an index.

    python scripts/build_wheelhouse.py --python-version 3.12 --output wheelhouse --exclude torch torchvision

and then, on the machine without a package index:

    pip install --no-index --find-links wheelhouse --require-hashes -r wheelhouse/requirements.txt

The folder's requirements.txt pins every wheel in it to its version and sha256, so pip refuses a wheel
changed after the build (in transit, or in a shared folder) instead of installing it.

The folder holds the acm_d2 wheel built from this checkout, the repacked pure-Python detectron2 wheel
(scripts/install_detectron2.sh --wheel-only) and the dependency closure of both for the target Python
on manylinux x86_64, minus the excluded distributions and whatever only they need: the target
environment must already have those (pip then leaves them alone).

Dependencies that PyPI has only as source (fvcore, iopath, antlr4-python3-runtime) are built here
into pure-Python wheels, which install on any Python; a source-only dependency that would build a
binary wheel is refused, since it would be built for this Python, not the target's.
"""

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "requirements.txt"  # the wheels' versions and sha256, for pip install --require-hashes
# Wheel tags that pip accepts for the target: CPython on glibc x86_64 (the GPU clusters), newest
# first; pure-Python wheels (py3-none-any) match any of them.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def target_pip_options(python_version):
    """pip options that select wheels for CPython `python_version` on manylinux x86_64."""
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in PLATFORMS:
        options += ["--platform", tag]
    return options


def marker_environment(python_version):
    """The values of environment markers (PEP 508) on the target: CPython `python_version`, Linux x86_64."""
    env = default_environment()
    env.update(
        python_version=python_version,
        python_full_version=python_version + ".0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        implementation_version=python_version + ".0",
        os_name="posix",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
    )
    return env


def requires_dist(wheel):
    """The Requires-Dist lines of a wheel's METADATA, as Requirements."""
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(metadata).decode().splitlines()
    return [
        Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")
    ]


def provided_extras(wheel):
    """The extras a wheel offers (its METADATA's Provides-Extra lines)."""
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra:")]


def root_requirements(wheels, extras, exclude, env):
    """What the wheelhouse's own wheels need on the target: acm_d2's requirements with `extras` (e.g.
    deploy), the others' plain ones, minus the distributions in `exclude`."""
    roots = []
    for wheel in wheels:
        if canonicalize_name(parse_wheel_filename(wheel.name)[0]) == "acm-d2":
            unknown = set(extras) - set(provided_extras(wheel))
            if unknown:
                raise SystemExit(
                    f"error: --extras {' '.join(sorted(unknown))}: acm_d2 has the extras "
                    f"{' '.join(provided_extras(wheel))} (setup.py's extras_require)"
                )
            wanted = tuple(extras)
        else:
            wanted = ()
        roots += [
            r
            for r in requires_dist(wheel)
            if applies(r, wanted, env) and canonicalize_name(r.name) not in exclude
        ]
    return roots


def applies(requirement, extras, env):
    """Whether `requirement` is needed on the target when its dependent was asked for with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(dict(env, extra=extra)) for extra in ("", *extras))


def closure(roots, requires, exclude, env):
    """Names of the distributions the wheelhouse needs.

    roots: Requirements to satisfy; requires: canonical name -> its Requirements (pip's resolution,
    which must hold every name reached); exclude: canonical names the target already has. A
    distribution reached only through excluded ones is left out with them.
    """
    needed, pending = {}, [(r, ()) for r in roots]
    while pending:
        requirement, extras = pending.pop()
        if not applies(requirement, extras, env):
            continue
        name = canonicalize_name(requirement.name)
        if name in exclude:
            continue
        new_extras = set(requirement.extras) - needed.get(name, set())
        if name in needed and not new_extras:
            continue
        if name not in requires:
            raise SystemExit(
                f"error: {requirement} is needed on Python {env['python_version']} but pip did not "
                "resolve it (a dependency under an environment marker that differs between this "
                "Python and the target?); add it to the wheelhouse by hand or exclude it with --exclude"
            )
        needed[name] = needed.get(name, set()) | new_extras
        pending += [(r, tuple(needed[name])) for r in requires[name]]
    return sorted(needed)


def write_manifest(folder):
    """Writes folder/requirements.txt: each wheel in `folder` as `name==version --hash=sha256:...`.
    Returns its path."""
    lines = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{name}=={version} --hash=sha256:{digest}\n")
    manifest = folder / MANIFEST
    manifest.write_text("".join(lines))
    return manifest


def install_command(folder):
    return f"pip install --no-index --find-links {folder} --require-hashes -r {folder / MANIFEST}"


def python_version(text):
    """argparse type of --python-version: a CPython version 3.N that acm_d2 supports (setup.py)."""
    match = re.fullmatch(r"3\.(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CPython version of the form 3.N (e.g. 3.12: the target's "
            "`python3 -c 'import sys; print(sys.version[:4])'`)"
        )
    if int(match[1]) < 10:
        raise argparse.ArgumentTypeError(f"{text}: acm_d2 needs Python 3.10 or newer (setup.py)")
    return text.strip()


def run(*command):
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True)


def pip(*arguments):
    run(sys.executable, "-m", "pip", *arguments)


def resolve(roots, python_version, find_links, work):
    """pip's resolution of `roots` for the target: canonical name -> (version, its Requirements)."""
    report = work / "report-target.json"
    pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
        *target_pip_options(python_version), "--find-links", find_links, *map(str, roots),
    )  # fmt: skip
    items = json.loads(report.read_text())["install"]
    return {
        canonicalize_name(item["metadata"]["name"]): (
            item["metadata"]["version"],
            [Requirement(r) for r in item["metadata"].get("requires_dist", [])],
        )
        for item in items
    }


def source_only(roots, work):
    """Distributions that pip resolves to a source archive for this Python: name -> version."""
    report = work / "report-source.json"
    pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        report,
        *map(str, roots),
    )
    return {
        item["metadata"]["name"]: item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
        if not item["download_info"]["url"].endswith(".whl")
    }


def build_pure_wheels(distributions, wheel_dir):
    """Builds each source-only distribution into a wheel; refuses those that are not pure Python."""
    if not distributions:
        return
    pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "-w",
        wheel_dir,
        *(f"{n}=={v}" for n, v in distributions.items()),
    )
    binary = [w.name for w in wheel_dir.glob("*.whl") if not w.name.endswith("-none-any.whl")]
    if binary:
        raise SystemExit(
            f"error: {', '.join(binary)} built from source here as binary wheels, which would only fit "
            "this Python; get wheels built for the target (pip wheel on a machine with that Python), "
            "put them in the target's wheelhouse, and pass their names to --exclude here"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python-version",
        type=python_version,
        default=platform.python_version_tuple()[0] + "." + platform.python_version_tuple()[1],
        help="target CPython version, e.g. 3.12 (default: the Python running this script)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for the wheels (new or empty)"
    )
    parser.add_argument(
        "--exclude",
        nargs="*",
        required=True,
        help="distributions the target environment already has (the Makefile's WHEELHOUSE_EXCLUDE); "
        "what only they need is left out too",
    )
    parser.add_argument(
        "--extras",
        nargs="*",
        default=[],
        help="acm_d2 extras whose dependencies go in too, e.g. deploy (ONNX export and its check)",
    )
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        raise SystemExit(f"error: {args.output} is not empty; remove it or choose another --output")
    exclude = {canonicalize_name(name) for name in args.exclude}
    env = marker_environment(args.python_version)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Built from a copy of what setup.py packages: setuptools reuses an existing build/ folder,
        # so modules deleted from the checkout since the last build would end up in the wheel.
        source = work / "source"
        shutil.copytree(
            REPO / "acm_d2", source / "acm_d2", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(REPO / "setup.py", source)
        own = work / "own"
        pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", own, source)
        run("bash", REPO / "scripts" / "install_detectron2.sh", "--wheel-only", own, sys.executable)
        roots = root_requirements(sorted(own.glob("*.whl")), args.extras, exclude, env)

        built = work / "built"
        built.mkdir()
        build_pure_wheels(source_only(roots, work), built)
        resolution = resolve(roots, args.python_version, built, work)
        needed = closure(roots, {n: reqs for n, (_, reqs) in resolution.items()}, exclude, env)

        args.output.mkdir(parents=True, exist_ok=True)
        for wheel in own.glob("*.whl"):
            shutil.copy2(wheel, args.output)
        pins = [f"{name}=={resolution[name][0]}" for name in needed]
        pip("download", "--quiet", "--no-deps", *target_pip_options(args.python_version),
            "--find-links", built, "-d", args.output, *pins)  # fmt: skip

    manifest = write_manifest(args.output)
    wheels = sorted(args.output.glob("*.whl"), key=lambda w: w.stat().st_size, reverse=True)
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB in {len(wheels)} wheels in {args.output}")
    print(f"excluded (the target must have them): {' '.join(sorted(exclude)) or 'nothing'}")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    print(f"hashes: {manifest} (its own sha256: {digest}; compare it on the target)")
    print(f"install: {install_command(args.output)}")


if __name__ == "__main__":
    main()
