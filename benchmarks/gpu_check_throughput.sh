#!/usr/bin/env bash
# The throughput check of issue 9 on one GPU: the training-step table, the data-loader table and the inference table.
#
#     bash benchmarks/gpu_check_throughput.sh OUT_DIR            # CCNet-R101 on the GPU: about 5 minutes (325 s)
#     QUICK=1 bash benchmarks/gpu_check_throughput.sh OUT_DIR    # the tiny backbone and small sizes (a CPU will do)
#
# Runs from the repository root, in this order, each step under its own `timeout` (a step that fails or runs long
# loses its own rows, not the next steps'):
#   0. prepare: build (or load) the criss-cross attention kernels, so that no timed step pays for the build;
#   1. train_step: python -m benchmarks.train_step --rows ... (CCNet-R101, 769x769, rows in order of importance: a
#      timeout loses the last ones; each row in a fresh process, torch.compile rows compile there);
#   2. data_loader: python -m benchmarks.data_loader (generated 2048x1024 PNGs; 1, 2, 4, 8, 16 workers);
#   3. inference: python -m benchmarks.inference (one 1024x2048 image), then the bf16 channels_last rows with
#      cudnn.benchmark on.
# Each step's Markdown table goes to stdout and to OUT_DIR/<step>.md (train_step.md and inference.md are rewritten
# after each row, so a step stopped by its timeout keeps its finished rows); the steps' stderr goes to
# OUT_DIR/gpu_check_throughput.log, whose tail is printed when a step fails. Four files in all. Exit code 0 when
# every step finished, else 1.
#
# Environment: PYTHON (default python3), QUICK=1, TRAIN_ROWS (benchmarks.train_step --rows) to change the
# training-step rows, and the time limits: BUDGET (325 s) for the whole script, within which each step has at most
# TIMEOUT_PREPARE (150 s), TIMEOUT_TRAIN (240), TIMEOUT_LOADER (75), TIMEOUT_INFERENCE (75) and whatever the budget
# has left after keeping RESERVE_LOADER (40) and RESERVE_INFERENCE (45) for the steps after it. With the kernels
# already built the script takes about 5 minutes and ends within the budget; a first build (about a minute) comes
# out of the training step's time.
set -u

OUT=${1:?usage: bash benchmarks/gpu_check_throughput.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
LOG="$OUT/gpu_check_throughput.log"
: >"$LOG"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1

if [ "${QUICK:-0}" = 1 ]; then
    MODEL=(--backbone tiny)
    TRAIN=(--size 129 --steps 2 --warmup 2)
    ROWS_DEFAULT=2:off:nchw:0,2:bf16:nhwc:0,2:bf16:nhwc:1
    LOADER=(--images 2 --height 256 --width 512 --crop 129 --workers 1,2 --samples 4 --batches-per-worker 2)
    INFERENCE=(--image-size 256,512 --tile 129 --repeats 2 --warmup 1)
else
    MODEL=(--backbone resnet101)
    TRAIN=(--size 769 --steps 5 --warmup 3)
    # importance first: bf16 channels_last and today's default (fp32 NCHW) at batch 8 and 2, fp32 channels_last (the
    # faithful recipe's goal), the compiled bf16 recipe at batch 8 and 2; then, if the budget allows, the unfused SGD
    # step (:0 after compile) and cudnn.benchmark off (:1:0), bf16 NCHW, and compiled fp32 (an eager R101 row takes
    # about 10 s, a compiled one 40-90 s)
    ROWS_DEFAULT=8:bf16:nhwc:0,8:off:nchw:0,2:off:nchw:0,2:bf16:nhwc:0,8:off:nhwc:0,8:bf16:nhwc:1,2:bf16:nhwc:1
    ROWS_DEFAULT=$ROWS_DEFAULT,8:bf16:nhwc:0:0,2:bf16:nhwc:0:1:0,8:bf16:nchw:0,8:off:nhwc:1
    LOADER=(--images 8)
    INFERENCE=(--repeats 5 --warmup 2)
fi
ROWS=${TRAIN_ROWS:-$ROWS_DEFAULT}

failures=0
BUDGET=${BUDGET:-325} RESERVE_LOADER=${RESERVE_LOADER:-40} RESERVE_INFERENCE=${RESERVE_INFERENCE:-45}

# limit MAX KEEP: a step's time limit: MAX seconds, or less so that KEEP seconds of the budget remain (at least 10)
limit() {
    local left=$((BUDGET - SECONDS - $2))
    if [ "$left" -lt "$1" ]; then
        echo $((left > 10 ? left : 10))
    else
        echo "$1"
    fi
}

# step NAME TIMEOUT MARKDOWN COMMAND...: run COMMAND under `timeout` (its whole process group; SIGKILL 15 s after
# SIGTERM), stdout dropped (the tables go to MARKDOWN), stderr to the log; then print MARKDOWN under a heading, and
# how the step ended.
step() {
    local name=$1 limit=$2 markdown=$3
    shift 3
    local started=$SECONDS first_line
    printf '=== %s (timeout %s s): %.300s\n' "$name" "$limit" "$(echo "$*" | tr '\n' ' ')" >>"$LOG"
    first_line=$(wc -l <"$LOG")
    timeout --kill-after=15 "$limit" "$@" >/dev/null 2>>"$LOG"
    local status=$? seconds=$((SECONDS - started))
    printf '\n## %s\n\n' "$name"
    [ -s "$markdown" ] && cat "$markdown"
    if [ $status -eq 0 ]; then
        printf '\n(%s: done in %s s)\n' "$name" "$seconds"
        return
    fi
    failures=$((failures + 1))
    local what="exit code $status"
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        what="stopped by its ${limit} s timeout"
    fi
    printf '\n(%s: %s after %s s; the rows above are those it finished. Its log ends:)\n' "$name" "$what" "$seconds"
    tail -n +$((first_line + 1)) "$LOG" | tail -n 15 | sed 's/^/    /'
}

PREPARED=$(mktemp)
AUTOTUNED=$(mktemp)
trap 'rm -f "$PREPARED" "$AUTOTUNED"' EXIT
step prepare "$(limit "${TIMEOUT_PREPARE:-150}" $((RESERVE_LOADER + RESERVE_INFERENCE + 60)))" "$PREPARED" \
    "$PYTHON" -c '
import os, sys, time
import torch
from cc_attention import library
start = time.perf_counter()
state = library.load()
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
with open(sys.argv[1], "w") as out:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, {os.cpu_count()} CPU cores; criss-cross "
          f"attention kernels for {sorted(state.devices)} ready in {time.perf_counter() - start:.0f} s"
          + "".join(f"; no {device} kernels: {reason.splitlines()[0]}" for device, reason in state.missing.items()),
          file=out)
' "$PREPARED"

step train_step "$(limit "${TIMEOUT_TRAIN:-240}" $((RESERVE_LOADER + RESERVE_INFERENCE)))" "$OUT/train_step.md" \
    "$PYTHON" -m benchmarks.train_step "${MODEL[@]}" "${TRAIN[@]}" --rows "$ROWS" --output "$OUT/train_step.md"

step data_loader "$(limit "${TIMEOUT_LOADER:-75}" "$RESERVE_INFERENCE")" "$OUT/data_loader.md" \
    "$PYTHON" -m benchmarks.data_loader "${LOADER[@]}" --output "$OUT/data_loader.md"

# two runs, one table: every row with cudnn.benchmark off (the tools' setting), then bf16 channels_last with it on
step inference "$(limit "${TIMEOUT_INFERENCE:-75}" 0)" "$OUT/inference.md" bash -c '
table=$1 autotuned=$2
shift 2
"$@" --tile-batch 1,8 --output "$table" || exit
"$@" --amp bf16 --layouts nhwc --tile-batch 1,8 --cudnn-benchmark 1 --output "$autotuned" || exit
{ printf "\nThe same with cudnn.benchmark on:\n\n"; sed -n "/^| mode/,\$p" "$autotuned"; } >>"$table"
' inference "$OUT/inference.md" "$AUTOTUNED" "$PYTHON" -m benchmarks.inference "${MODEL[@]}" "${INFERENCE[@]}"

printf '\ngpu_check_throughput: %s step(s) failed or timed out; the tables are in %s\n' "$failures" "$OUT"
exit $((failures > 0))
