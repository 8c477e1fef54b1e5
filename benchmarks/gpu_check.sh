#!/usr/bin/env bash
# GPU checks of tap_fast in one device call: the CUDA tests and every benchmark table, within a deadline.
# Run on the GPU machine from the repository root (its own python3 with torch, triton and pytest; no venv):
#     OUT=/some/empty/dir bash benchmarks/gpu_check.sh
# Environment:
#     DEADLINE_S  seconds the whole script may take (default 450, so a device call of 8 minutes holds it);
#                 every step runs under `timeout` with the smaller of its own cap and the time left, and a
#                 step that would start with under 20 s left is skipped and listed.
#     ONLY        a bash regex over step names: run only the matching steps (e.g. ONLY='kernels_.*').
#     GPU_CHECK_PLAN=1  run nothing: write each step's name, cap and command to $OUT/plan.txt
#                 (tests/test_gpu_check.py checks on the CPU that every command's arguments parse and every
#                 pytest selection is non-empty).
# Steps run in priority order (the issues' targets first), each logged with timestamps to
# $OUT/gpu_check.log; a failing or cut step is recorded and the next steps still run; exit status 1 if any
# step failed, was cut or was skipped. After every step the tables gathered so far are (re)written, so
# whatever ends the call, $OUT holds: kernel_table.md (issue 4), step_table.md (issue 5: steps, largest
# batch, MNIST protocol), feeds_table.md (issue 5), results.json (every record) and targets.md (the issues'
# targets judged from results.json by benchmarks/check_targets.py). At most 8 files come back from a
# device call: keep it to these five and the log.
set -uo pipefail

: "${OUT:?set OUT to an (empty) output directory}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compile for the GPU; tests/conftest.py keeps a value that is already set
DEADLINE_S="${DEADLINE_S:-450}"
ONLY="${ONLY:-.*}"
PLAN="${GPU_CHECK_PLAN:-0}"
LOG="$OUT/gpu_check.log"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILED=()
SKIPPED=()
# pytest-xdist (on the device image) runs the compile-bound CUDA tests on several processes, and
# pytest-timeout (there too) stops a hung test after 100 s with its traceback instead of the whole step.
XDIST=()
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
if [[ "$PLAN" != 1 ]]; then
    if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout=100); fi
fi

collect() {  # (re)write the tables under $OUT from the per-step files under $TMP
    cat "$TMP"/kernel_*.md > "$OUT/kernel_table.md" 2>/dev/null
    cat "$TMP"/steps_*/steps.md "$TMP"/mnist_*/mnist.md > "$OUT/step_table.md" 2>/dev/null
    cat "$TMP"/feeds_*.md > "$OUT/feeds_table.md" 2>/dev/null
    "$PY" - "$TMP" "$OUT/results.json" <<'EOF' 2>/dev/null
import json, pathlib, sys
tmp = pathlib.Path(sys.argv[1])
files = sorted(tmp.glob("*.json")) + sorted(tmp.glob("*/*.json"))
merged = {str(p.relative_to(tmp)): json.loads(p.read_text()) for p in files}
if merged:
    pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1) + "\n")
EOF
    [[ -f "$OUT/results.json" ]] && "$PY" benchmarks/check_targets.py "$OUT/results.json" --out "$OUT/targets.md" \
        > /dev/null 2>> "$LOG"
    find "$OUT" -maxdepth 1 -empty -type f -delete
}

step() {  # step NAME MAX_S COMMAND... : run COMMAND under the deadline, tee it to the log, record failures
    local name=$1 max=$2
    shift 2
    [[ "$name" =~ ^($ONLY)$ ]] || return 0
    if [[ "$PLAN" == 1 ]]; then
        { printf '%s\x1f' "$name" "$max" "$@"; printf '\x1e'; } >> "$OUT/plan.txt"  # unit / record separators
        return 0
    fi
    local left=$((DEADLINE_S - SECONDS - 5))
    if ((left < 20)); then
        echo "=== [$(date +%T)] skipped $name: deadline (${DEADLINE_S} s) reached" | tee -a "$LOG"
        SKIPPED+=("$name")
        return 0
    fi
    local limit=$((max < left ? max : left)) start=$SECONDS
    echo "=== [$(date +%T)] step $name (at most $limit s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        echo "=== [$(date +%T)] ok $name ($((SECONDS - start)) s)" | tee -a "$LOG"
    elif ((rc == 124 || rc == 137)); then
        echo "=== [$(date +%T)] CUT $name at $limit s (partial tables kept)" | tee -a "$LOG"
        FAILED+=("$name(cut)")
    else
        echo "=== [$(date +%T)] FAILED $name (exit $rc, $((SECONDS - start)) s)" | tee -a "$LOG"
        FAILED+=("$name")
    fi
    collect
}

KT=("$PY" benchmarks/kernel_table.py)
ST=("$PY" benchmarks/step_table.py)

# 1. Where we are.
step environment 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__,
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), '|', torch.cuda.get_device_properties(0))"
# 2. Issue 4: the fused kernels equal the reference on CUDA (fp32, bf16), then the target shapes:
#    ResNet-18 batch 128 (fused vs eager vs torch.compile of the reference) and the peak-memory table.
step tests_kernels 150 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} tests/test_kernels.py tests/test_compiled_step.py \
    tests/test_tap_identity_step.py -m gpu
step kernels_resnet18 100 "${KT[@]}" --models resnet18 --batches 128 --dtypes bf16 fp32 --memory-batch 64 \
    --out "$TMP/kernel_1.md" --json "$TMP/kernel_1.json"
# 3. Issue 5: training steps at the paper's Table 1 setting (batch 16, 224 x 224) and MNIST shapes.
step steps_b16_fp32 100 "${ST[@]}" --configs resnet18@224:16 cnn2@28:256 vgg16@224:16 densenet121@224:16 \
    --dtypes fp32 --out "$TMP/steps_1"
step mnist_protocol 60 "${ST[@]}" --configs --mnist --mnist-methods tap,none --out "$TMP/mnist_1"
step steps_max_bf16 50 "${ST[@]}" --configs resnet18@224:max --dtypes bf16 --channels-last --out "$TMP/steps_2"
step steps_b16_bf16 70 "${ST[@]}" --configs resnet18@224:16 cnn2@28:256 vgg16@224:16 densenet121@224:16 \
    --dtypes bf16 --out "$TMP/steps_3"
# 4. Issue 5: the data feeds (torchvision / nvJPEG fallback: the device has no DALI) and the engine's CUDA tests.
step feeds 45 "$PY" benchmarks/bench_feeds.py --out "$TMP/feeds_1.md"
step tests_engine 120 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} tests/test_compiled_engine.py tests/test_feeds.py \
    tests/test_dali_feed.py tests/test_training.py -m gpu
# 5. With the time left: the identity form of the fused op (TAP inside the forward) beside the separate one,
#    the other kernel shapes, l2sq, channels_last, compiled steps, the other largest batches (RRR and RBR
#    each at their own), the pytest-benchmark kernel cases.
step steps_identity 60 "${ST[@]}" --configs resnet18@224:16 cnn2@28:256 --rows none,tap,tap-id --dtypes fp32,bf16 \
    --out "$TMP/steps_6"
step kernels_rest 100 "${KT[@]}" --models cnn2 resnet18 vgg16 densenet121 --batches 16 128 --memory-batch 0 \
    --skip resnet18:128 --impls fused eager --out "$TMP/kernel_2.md" --json "$TMP/kernel_2.json"
step kernels_l2sq 40 "${KT[@]}" --norm l2sq --models resnet18 --batches 128 --impls fused eager \
    --memory-batch 0 --out "$TMP/kernel_3.md" --json "$TMP/kernel_3.json"
step kernels_channels_last 40 "${KT[@]}" --channels-last --models resnet18 --batches 128 --impls fused eager \
    --memory-batch 0 --out "$TMP/kernel_4.md" --json "$TMP/kernel_4.json"
step mnist_protocol_compiled 60 "${ST[@]}" --configs --mnist --mnist-methods tap --compile --out "$TMP/mnist_2"
step steps_b16_compiled 60 "${ST[@]}" --configs resnet18@224:16 --rows none,tap --compile --dtypes bf16,fp32 \
    --out "$TMP/steps_4"
step steps_max_rest 60 "${ST[@]}" --configs vgg16@224:max densenet121@224:max --dtypes bf16,fp32 \
    --channels-last --out "$TMP/steps_5"
step steps_max_baselines 60 "${ST[@]}" --configs resnet18@224:max --dtypes bf16 --channels-last \
    --max-rows tap,rrr,rbr --out "$TMP/steps_7"
step bench_kernels 60 "${PYTEST[@]}" benchmarks/bench_kernels.py -k "resnet18-128 and bf16" \
    --benchmark-columns=min,median,rounds --benchmark-json="$TMP/bench_kernels.json"
# 6. DALI, when it was carried (benchmarks/dali_wheels.sh; PYTHONPATH=/tmp/site): its tests, CPU ones included,
#    under the device's python and numpy (feeds and tests_engine above already took its GPU path).
if [[ "$PLAN" == 1 ]] || "$PY" -c "import nvidia.dali" 2>/dev/null; then
    step tests_dali 90 "${PYTEST[@]}" tests/test_dali_feed.py -m "not gpu"
fi

if [[ "$PLAN" == 1 ]]; then exit 0; fi
collect
if ((${#FAILED[@]} + ${#SKIPPED[@]})); then
    echo "=== failed or cut: ${FAILED[*]:-none}; skipped at the deadline: ${SKIPPED[*]:-none}" \
        "($SECONDS s)" | tee -a "$LOG"
    exit 1
fi
echo "=== all steps passed ($SECONDS s)" | tee -a "$LOG"
