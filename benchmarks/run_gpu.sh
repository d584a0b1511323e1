#!/usr/bin/env bash
# Everything one GPU session measures, in one call (docs/performance.md, "Running the GPU checks"):
#   1. offline install of the dependencies from a wheelhouse (make wheelhouse; the checkout's own
#      acm_d2 is what runs: PYTHONPATH points at it),
#   2. the full self-test (python -m acm_d2.selftest) with the breakdown and the memory snapshot,
#   3. tools/demo.py on the GPU in AMP bf16 (generates the data, trains, evaluates),
#   4. tools/train_net.py with COCOEvaluator on the demo's data, without and with ACM,
#   5. the issue's targets, PASS/FAIL (python -m acm_d2.selftest.targets).
# Each part has a time budget (timeout), so one slow part cannot eat the call; the parts' exit statuses,
# logs and figures go to $OUT. Exit status 1 if a part failed or ran over its budget, a training run
# did not finish or report AP, or a log names a Triton warning or failure.
#
#   WHEELHOUSE=wheelhouse-gpu OUT=output/gpu bash benchmarks/run_gpu.sh    # on the GPU machine
#   bash benchmarks/run_gpu.sh --cpu-dry-run                                # the same path, tiny, CPU
#
# --cpu-dry-run: no install, no nvidia-smi; the self-test's CPU versions of env, breakdown and model,
# demo and train_net on a handful of 64 px images for a few iterations, on the CPU, with $PYTHON
# (default: python3). It checks the script, not the figures.
#
# $OUT gets at most 8 files (what the device tool brings back): run.log (everything printed),
# nvidia-smi.txt, selftest.json, e2e.json, summary.md, memory_snapshot_fp32_acm.pickle.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1
DRY_RUN=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -gt 0 ]]; then
    echo "run_gpu.sh: unknown argument(s) $*; usage: bash benchmarks/run_gpu.sh [--cpu-dry-run]" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
OUT=${OUT:-output/gpu}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/acm_run_gpu.XXXXXX")}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
: >"$WORK/parts.txt"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 1
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

# part NAME BUDGET_SECONDS COMMAND...: run it under a time budget, its output also in $WORK/NAME.log.
part() {
    local name=$1 budget=$2 start status
    shift 2
    echo "=== $(date +%H:%M:%S) $name (budget ${budget} s): $*"
    start=$(date +%s)
    timeout --kill-after=15 "$budget" "$@" 2>&1 | tee "$WORK/$name.log"
    status=${PIPESTATUS[0]}
    echo "=== $(date +%H:%M:%S) $name: exit status $status in $(($(date +%s) - start)) s"
    echo "$name $status $(($(date +%s) - start)) $budget" >>"$WORK/parts.txt"
}

DEMO_CONFIG=configs/Demo/mask_rcnn_acm_R_18_FPN_synthetic.yaml
if [[ $DRY_RUN == 1 ]]; then
    echo "run_gpu.sh --cpu-dry-run: $PYTHON on the CPU, tiny sizes; OUT=$OUT WORK=$WORK"
    DEVICE=cpu
    SELFTEST=(--sections env,breakdown,model)
    DEMO_DATA=(--num-train 8 --num-val 4 --image-size 64 --threads 1)
    DEMO_OPTS=(SOLVER.MAX_ITER 4 SOLVER.WARMUP_ITERS 1 SOLVER.STEPS "(3,)" SOLVER.IMS_PER_BATCH 2
        INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64
        DATALOADER.NUM_WORKERS 0)
    TRAIN_OPTS=(SOLVER.MAX_ITER 4 SOLVER.WARMUP_ITERS 1 SOLVER.STEPS "(3,)" SOLVER.IMS_PER_BATCH 2
        INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64
        DATALOADER.NUM_WORKERS 0 MODEL.DEVICE cpu)
    BUDGET=(0 300 180 150)  # install, self-test, demo, each train_net: generous for busy CI cores
else
    DEVICE=cuda
    # The parts that answer the issue first: a run cut by its budget keeps the sections before the cut.
    SELFTEST=(--sections env,breakdown,model,layer,correctness,amp_training --snapshot-dir "$OUT")
    DEMO_DATA=(--num-train 200 --num-val 50)
    # 300 iterations of batch 4 (the demo's schedule scaled down): AP well above 0, in about a minute.
    DEMO_OPTS=(SOLVER.MAX_ITER 300 SOLVER.WARMUP_ITERS 50 SOLVER.STEPS "(200,260)"
        SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16)
    TRAIN_OPTS=(SOLVER.MAX_ITER 200 SOLVER.WARMUP_ITERS 50 SOLVER.STEPS "(150,)" MODEL.DEVICE cuda)
    BUDGET=(30 240 75 45)  # 7.25 min at most; see docs/performance.md
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv |
        tee "$OUT/nvidia-smi.txt"
    part install "${BUDGET[0]}" "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" \
        --require-hashes -r "$WHEELHOUSE/requirements.txt"
fi

"$PYTHON" -c "import detectron2, torch; print('detectron2', detectron2.__version__, 'torch', torch.__version__)"
part selftest "${BUDGET[1]}" "$PYTHON" -m acm_d2.selftest "${SELFTEST[@]}" --json "$OUT/selftest.json"
part demo "${BUDGET[2]}" "$PYTHON" tools/demo.py --device "$DEVICE" --output "$WORK/demo" \
    "${DEMO_DATA[@]}" "${DEMO_OPTS[@]}"
for module in none ACM; do
    part "train_$module" "${BUDGET[3]}" "$PYTHON" tools/train_net.py --config-file "$DEMO_CONFIG" \
        --coco-dataset acm_synthetic_train "$WORK/demo/data/train.json" "$WORK/demo/data/train" \
        --coco-dataset acm_synthetic_val "$WORK/demo/data/val.json" "$WORK/demo/data/val" \
        MODEL.CONTEXT_MODULE "$module" OUTPUT_DIR "$WORK/train_$module" "${TRAIN_OPTS[@]}"
done
"$PYTHON" -m acm_d2.selftest.targets "$OUT" "$WORK"
status=$?
exec >&- 2>&-
wait "$TEE_PID" # run.log complete before the device tool collects $OUT
exit "$status"
