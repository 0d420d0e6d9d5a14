#!/usr/bin/env bash
# The GPU check: one run on a CUDA machine that builds the kernels, runs the GPU tests and prints the benchmarks'
# tables, each step under its own time limit so that a failing or slow step cannot take the others down.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # everything (three parts, about 15 minutes on one H100)
#   bash benchmarks/gpu_check.sh OUT_DIR op          # build, GPU tests, op benchmark with the design choices' A/B
#   bash benchmarks/gpu_check.sh OUT_DIR ab          # build (cached after the first), the A/B training steps:
#                                                    # BN + channels_last vs InPlaceABN in NCHW; each kernel design
#                                                    # choice switched (CCNET_CC_* settings, docs/op.md)
#   bash benchmarks/gpu_check.sh OUT_DIR throughput  # build, training/loader/inference tables
#
# Each part fits one 10-minute command (its steps' limits add up to less) on a machine that stays warm between
# them. Writes OUT_DIR/log.txt (everything), OUT_DIR/results.md (the tables of the op and ab parts) and the
# throughput tables of benchmarks/gpu_check_throughput.sh. Set QUICK=1 to run every step on tiny sizes (to try the
# script on a CPU).
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [all|op|throughput]}
part=${2:-all}
case "$part" in all | op | ab | throughput) ;; *) echo "gpu_check.sh: error: PART must be all, op, ab or throughput, not '$part'" >&2; exit 2 ;; esac
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
    op_args=(--batch 1 --size 9 --channels 16 --repeats 2 --design-choices energy_dtype --dtype fp32,bf16)
    step_args=(--backbone tiny --size 65 --steps 1 --warmup 1 --no-mfu)
    norm_batch=1
    choice_row=1:bf16:nhwc:0
else
    op_args=(--design-choices energy_dtype,column_gemm,softmax_loads)
    step_args=(--backbone resnet101 --size 769 --steps 5 --warmup 3 --no-mfu)
    norm_batch=8
    choice_row=8:bf16:nhwc:0
fi

step "machine" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'"
step "build the kernels" 200 "$PYTHON" -c "from cc_attention import library; print(library.load())"
if [[ "$part" == all || "$part" == op ]]; then
    step "GPU tests" 150 "$PYTHON" -m pytest -q -m "not slow" -k "cuda or gpu" -p no:cacheprovider \
        tests/test_cc_attention.py tests/test_train.py tests/test_loss.py tests/test_eval.py tests/test_benchmarks.py
    table "criss-cross attention op (with each kernel design choice switched)" 200 \
        "$PYTHON" -m benchmarks.cc_attention_op "${op_args[@]}"
fi
if [[ "$part" == all || "$part" == ab ]]; then
    # InPlaceABN rows say "inplace_abn not installed" where the optional package is missing (pip install
    # --no-build-isolation inplace-abn==1.1.0 where a registry is reachable, or a wheel carried in)
    table "training step: BatchNorm + channels_last vs InPlaceABN in NCHW (fp32)" 170 \
        "$PYTHON" -m benchmarks.train_step "${step_args[@]}" --batch-size "$norm_batch" --norm bn,inplace_abn \
        --amp off --layouts nhwc,nchw
    table "training step: the attention kernels' design choices, each switched" 170 \
        "$PYTHON" -m benchmarks.train_step "${step_args[@]}" --rows "$choice_row" \
        --design-choices default,column_gemm=per_image,softmax_loads=scalar,energy_dtype=input
fi
if [[ "$part" == all || "$part" == throughput ]]; then
    step "throughput" 330 bash benchmarks/gpu_check_throughput.sh "$out"
fi
echo "== done: tables in $out"
cat "$results"
