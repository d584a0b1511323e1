#!/usr/bin/env bash
# Installs detectron2 into the given Python only when `import detectron2` fails.
# PyPI has no official detectron2; the fallback is the pinned sal-detectron2==0.7.2 wheel
# (upstream facebookresearch/detectron2 a59f0563 plus a Python 3.11 fix, see docs/install.md), checked by sha256
# and repacked as a pure-Python wheel: its compiled _C is for CPython 3.10 only and its stray
# top-level `tools` package would shadow ours. Without _C, torchvision supplies NMS and ROIAlign.
# Its metadata pins numpy<2, which the code does not need (it runs with numpy 2) and which would make
# pip downgrade numpy, or fail without an index: the repacked wheel requires plain `numpy`.
#
# With --wheel-only DIR it installs nothing and only writes the repacked wheel into DIR
# (used by scripts/build_wheelhouse.py); PYTHON is then only the pip and wheel that do the work.
set -euo pipefail
usage="usage: install_detectron2.sh [--wheel-only DIR] PYTHON"
help="$usage

Installs the pinned, sha256-checked sal-detectron2 0.7.2 wheel, repacked as pure Python, into the
environment of PYTHON (e.g. .venv/bin/python) when it cannot import detectron2; keeps an installed one.
  --wheel-only DIR  install nothing; write the repacked wheel into DIR (PYTHON only runs pip and wheel)
  -h, --help        show this help
See docs/install.md."
fail() { printf 'error: %s\n%s\n' "$1" "$usage" >&2; exit 2; }
WHEEL_DIR=
case "${1:-}" in
  -h|--help) echo "$help"; exit 0 ;;
  --wheel-only)
    [ $# -ge 2 ] || fail "--wheel-only needs a folder"
    WHEEL_DIR=$2; shift 2 ;;
  -*) fail "unknown option $1" ;;
esac
[ $# -eq 1 ] || fail "give one PYTHON (got $# arguments)"
PY=$1
"$PY" -c "import sys; assert sys.version_info >= (3,)" 2>/dev/null ||
  fail "PYTHON '$PY' is not a Python interpreter that runs (give its path, e.g. .venv/bin/python)"
if [ -z "$WHEEL_DIR" ] && "$PY" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already importable: keeping it"; exit 0
fi
SHA=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561
WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$work/dl" sal-detectron2==0.7.2
got=$(sha256sum "$work/dl/$WHEEL" | cut -d' ' -f1)
if [ "$got" != "$SHA" ]; then
  echo "error: $WHEEL has sha256 $got, expected $SHA; refusing to install it" >&2; exit 1
fi
"$PY" -m wheel unpack -d "$work/u" "$work/dl/$WHEEL" >/dev/null
root="$work/u/sal_detectron2-0.7.2"
rm -rf "$root/tools" "$root"/detectron2/_C*.so
dist="$root/sal_detectron2-0.7.2.dist-info"
sed -i -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' -e 's/^Tag: .*/Tag: py3-none-any/' "$dist/WHEEL"
sed -i -e 's/^Requires-Dist: numpy<2$/Requires-Dist: numpy/' "$dist/METADATA"
sed -i -e '/^tools\//d' -e '/detectron2\/_C.*\.so/d' "$dist/RECORD"
if [ -n "$WHEEL_DIR" ]; then
  mkdir -p "$WHEEL_DIR"
  "$PY" -m wheel pack -d "$WHEEL_DIR" "$root" >/dev/null
  echo "wrote $WHEEL_DIR/sal_detectron2-0.7.2-py3-none-any.whl"; exit 0
fi
mkdir -p "$work/out"
"$PY" -m wheel pack -d "$work/out" "$root" >/dev/null
"$PY" -m pip install -q --no-deps "$work"/out/*.whl
"$PY" -c "import detectron2; print('installed detectron2', detectron2.__version__)"
