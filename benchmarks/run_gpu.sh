#!/usr/bin/env bash
# The checks of one GPU session, as one script: offline install from a wheelhouse (make wheelhouse),
# then the self-test. Usage on the GPU machine, from the repository root:
#   WHEELHOUSE=wheelhouse-gpu OUT=output/gpu bash benchmarks/run_gpu.sh [--quick] [--sections ...]
set -uo pipefail
export PYTHONUNBUFFERED=1
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
OUT=${OUT:-output/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-index --find-links "$WHEELHOUSE" --require-hashes -r "$WHEELHOUSE/requirements.txt" 2>&1 | tail -5
python3 -c "import detectron2, acm_d2, triton, torch; print('detectron2', detectron2.__version__, 'triton', triton.__version__, 'torch', torch.__version__)"
python3 -m acm_d2.selftest "$@" --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.log"
