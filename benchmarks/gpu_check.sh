#!/usr/bin/env bash
# GPU checks of tap_fast, run on the GPU machine from the repository root:
#     OUT=/some/empty/dir bash benchmarks/gpu_check.sh          (QUICK=1: a smaller kernel table)
# Uses that machine's own python (python3, or $PYTHON; no venv) with torch, triton and pytest.
# Each step is one call of `step NAME COMMAND...`: it is logged with timestamps to $OUT/gpu_check.log;
# a failing step is recorded and the next steps still run; the script exits 1 if any step failed.
# Only a few files come back from $OUT (at most 8): steps append to the log and write one markdown
# file per section. Add new sections at the end, each under its own "Section" banner.
# SECTIONS picks sections (default "kernels feeds steps"): one device call of 10 minutes at most fits
# one or two; e.g. SECTIONS=kernels QUICK=1 OUT=... bash benchmarks/gpu_check.sh
set -euo pipefail

: "${OUT:?set OUT to an (empty) output directory}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compile for the GPU; tests/conftest.py keeps a value that is already set
LOG="$OUT/gpu_check.log"
TMP="$(mktemp -d)"
FAILED=()
SECTIONS="${SECTIONS:-kernels feeds steps}"
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

step() {  # step NAME COMMAND... : run COMMAND, tee its output to the log, record a failure
    local name=$1 start=$SECONDS
    shift
    echo "=== [$(date +%T)] step $name: $*" | tee -a "$LOG"
    if "$@" 2>&1 | tee -a "$LOG"; then
        echo "=== [$(date +%T)] ok $name ($((SECONDS - start)) s)" | tee -a "$LOG"
    else
        echo "=== [$(date +%T)] FAILED $name ($((SECONDS - start)) s)" | tee -a "$LOG"
        FAILED+=("$name")
    fi
}

# ---------------------------------------------------------------------------------------------------
# Section: environment
# ---------------------------------------------------------------------------------------------------
step environment "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__,
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), '|', torch.cuda.get_device_properties(0))"

# ---------------------------------------------------------------------------------------------------
# Section: fused Triton TAP (issue 4) -> $OUT/kernel_table.md
# CUDA tests of the kernels and of a compiled (CUDA-graph) training step, then the timing tables
# (estimated 5-8 min in all, mostly Triton and Inductor compilation; QUICK=1 trims the l1 table).
# ---------------------------------------------------------------------------------------------------
if want kernels; then
step test_kernels "$PY" -m pytest tests/test_kernels.py -q -rfE -p no:cacheprovider
step test_compiled_step_cuda "$PY" -m pytest tests/test_compiled_step.py -q -rfE -p no:cacheprovider -k cuda
if [[ "${QUICK:-0}" == 1 ]]; then
    TABLE_ARGS=(--models cnn2 resnet18 --memory-dtypes fp32)
else
    TABLE_ARGS=()
fi
step kernel_table_l1 "$PY" benchmarks/kernel_table.py ${TABLE_ARGS[@]+"${TABLE_ARGS[@]}"} --out "$TMP/1_l1.md"
step kernel_table_l2sq "$PY" benchmarks/kernel_table.py --norm l2sq --models resnet18 --batches 128 \
    --memory-batch 0 --out "$TMP/2_l2sq.md"
step kernel_table_channels_last "$PY" benchmarks/kernel_table.py --channels-last --models resnet18 \
    --batches 128 --impls fused eager --memory-batch 0 --out "$TMP/3_channels_last.md"
cat "$TMP"/*.md > "$OUT/kernel_table.md" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------------
# Section: data feeds (issue 5) -> $OUT/feeds_table.md
# GPU-resident feed and the folder feed (torchvision/nvJPEG fallback here: the device has no DALI).
# ---------------------------------------------------------------------------------------------------
if want feeds; then
step test_feeds "$PY" -m pytest tests/test_feeds.py tests/test_dali_feed.py -q -rfE -p no:cacheprovider
step feeds_table "$PY" benchmarks/bench_feeds.py --out "$OUT/feeds_table.md"
fi

# ---------------------------------------------------------------------------------------------------
# Section: training steps, Table 1 setting, MNIST protocol (issue 5) -> $OUT/step_table.md
# ---------------------------------------------------------------------------------------------------
if want steps; then
step test_compiled_engine_cuda "$PY" -m pytest tests/test_compiled_engine.py -q -rfE -p no:cacheprovider -m gpu
step step_table_b16 "$PY" benchmarks/step_table.py --configs cnn2@28:256 resnet18@224:16 vgg16@224:16 \
    densenet121@224:16 --dtypes fp32,bf16 --time-budget 90 --out "$TMP/steps_b16"
step mnist_protocol "$PY" benchmarks/step_table.py --configs --mnist --mnist-methods tap,none \
    --time-budget 60 --out "$TMP/mnist"
step step_table_max "$PY" benchmarks/step_table.py --configs resnet18@224:max vgg16@224:max \
    densenet121@224:max --dtypes bf16,fp32 --channels-last --time-budget 50 --out "$TMP/steps_max"
cat "$TMP/steps_b16/steps.md" "$TMP/mnist/mnist.md" "$TMP/steps_max/steps.md" > "$OUT/step_table.md" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------------
# (new sections go here)
# ---------------------------------------------------------------------------------------------------

rm -rf "$TMP"
if ((${#FAILED[@]})); then
    echo "=== failed steps: ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi
echo "=== all steps passed" | tee -a "$LOG"
