#!/usr/bin/env bash
# The GPU check: one run on a CUDA machine that builds the kernels, runs the GPU tests and prints the benchmarks'
# tables, each step under its own time limit so that a failing or slow step cannot take the others down.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # everything: about 9 minutes on one H100
#   bash benchmarks/gpu_check.sh OUT_DIR op          # build, GPU tests, op benchmark: about 4 minutes
#   bash benchmarks/gpu_check.sh OUT_DIR throughput  # build (cached after the first), training/loader/inference tables
#
# The two parts fit one 10-minute command each on a machine that stays warm between them. Writes OUT_DIR/log.txt
# (everything), OUT_DIR/results.md (the op table) and the throughput tables of benchmarks/gpu_check_throughput.sh.
# Set QUICK=1 to run every step on tiny sizes (to try the script on a CPU).
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [all|op|throughput]}
part=${2:-all}
case "$part" in all | op | throughput) ;; *) echo "gpu_check.sh: error: PART must be all, op or throughput, not '$part'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
log=$out/log.txt
results=$out/results.md
: >"$log"
: >"$results"

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output appended to the log; says how it ended.
step() {
    local name=$1 limit=$2 start=$SECONDS code
    shift 2
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$log"
    return 0
}

# table NAME SECONDS COMMAND...: like step, and the command's stdout (a Markdown table) also goes to results.md.
table() {
    local name=$1 limit=$2 start=$SECONDS code
    shift 2
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    { echo "### $name"; echo; } >>"$results"
    timeout "$limit" "$@" 2>>"$log" | tee -a "$results" >>"$log"
    code=${PIPESTATUS[0]}
    echo >>"$results"
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$log"
    return 0
}

if [[ "${QUICK:-0}" == 1 ]]; then
    op_args=(--batch 1 --size 9 --channels 16 --repeats 2)
else
    op_args=()
fi

step "machine" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'"
step "build the kernels" 240 "$PYTHON" -c "from cc_attention import library; print(library.load())"
if [[ "$part" != throughput ]]; then
    step "GPU tests" 150 "$PYTHON" -m pytest -q -m "not slow" -k "cuda or gpu" -p no:cacheprovider \
        tests/test_cc_attention.py tests/test_train.py tests/test_loss.py tests/test_eval.py tests/test_benchmarks.py
    table "criss-cross attention op" 150 "$PYTHON" -m benchmarks.cc_attention_op "${op_args[@]}"
fi
if [[ "$part" != op ]]; then
    step "throughput" 330 bash benchmarks/gpu_check_throughput.sh "$out"
fi
echo "== done: tables in $out"
cat "$results"
