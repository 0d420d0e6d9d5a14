#!/usr/bin/env bash
# Train and evaluate CCNet in one go.
#
#   ./run_local.sh DATA_PATH the original recipe on Cityscapes: torchrun over the GPUs in GPU_IDS (default: all
#                            visible), ResNet-101 from ImageNet weights, --random-mirror --random-scale, OHEM
#                            0.7 / 100000, R=2, 769x769 crops, batch 8, 60000 steps, lr 1e-2, weight decay 1e-4;
#                            then evaluates snapshots/CS_scenes_60000.pth on the val list (sliding window).
#                            DATASET=ade20k: the same on ADEChallengeData2016 with ADE20K's numbers (512x512 crops,
#                            batch 16, 80000 steps, lr 1e-2, weight decay 5e-4: dataset/ade20k.py), evaluated on
#                            whole images. DATASET=lip: on the LIP folder with CE2P's numbers (473x473 crops,
#                            batch 40, 115000 steps, lr 7e-3, weight decay 5e-4: dataset/lip.py), whole images.
#   ./run_local.sh           the demo, on the CPU: generates a small synthetic dataset (in the format of DATASET,
#                            default cityscapes) in demo_data/DATASET/, trains the tiny configuration for a few
#                            minutes, evaluates it, prints the mIoU table and the folder of colorized predictions.
#                            Each dataset's demo has its own demo_run/DATASET/ (snapshots/, predictions/); a rerun
#                            of the same dataset's demo replaces that folder's, and says so in one line.
#
# GPU_IDS=cpu (with NPROC processes, default 1) runs the same recipe on the CPU, e.g. to check a set-up.
# RESTORE_FROM (default ./dataset/resnet101-imagenet.pth): a file, a URL or a weights-table name (train.py's
# --restore-from; RESTORE_FROM=resnet101-imagenet downloads the ImageNet weights); empty: from scratch.
# RESUME=SNAPSHOT_DIR/CS_scenes_<iter>.pth continues an interrupted run (train.py --resume), then evaluates.
# CCL=1 trains with the category consistent loss of the TPAMI version (train.py --ccl 1), the demo too.
# CLIP_LENGTH=T (odd; FRAME_STRIDE=S) trains the video CCNet on clips of T frames (DATASET=camvid, train.py
# --clip-length), the demo too: `DATASET=camvid CLIP_LENGTH=3 ./run_local.sh`.
# Every number is an environment variable, e.g. `STEPS=40000 BS=16 GPU_IDS=0,1 ./run_local.sh /data/cityscapes`
# or `DEMO_STEPS=50 ./run_local.sh`. PYTHON (default .venv/bin/python if present, else python3) runs everything.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
start=$SECONDS
# OpenMP threads that wait passively: with the default busy-waiting, a CPU that is shared with any other process
# (even a data-loading worker) makes PyTorch many times slower (measured on 2 cores: 14 s instead of 0.5 s a step).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DATASET=${DATASET:-cityscapes}
CCL=${CCL:-0}
CLIP_LENGTH=${CLIP_LENGTH:-1}
FRAME_STRIDE=${FRAME_STRIDE:-1}

if [[ $# -ge 1 ]]; then
    DATA_PATH=$1
    # the dataset's numbers (what train.py takes for it; `python -m dataset.registry DATASET` prints them)
    read -r DATASET_LR DATASET_WD DATASET_BS DATASET_STEPS DATASET_SIZE < <("$PYTHON" -m dataset.registry "$DATASET")
    LR=${LR:-$DATASET_LR}
    WD=${WD:-$DATASET_WD}
    BS=${BS:-$DATASET_BS}
    STEPS=${STEPS:-$DATASET_STEPS}
    INPUT_SIZE=${INPUT_SIZE:-$DATASET_SIZE}  # S or H,W
    RECURRENCE=${RECURRENCE:-2}
    OHEM=${OHEM:-1}
    OHEM_THRES=${OHEM_THRES:-0.7}
    OHEM_KEEP=${OHEM_KEEP:-100000}
    BACKBONE=${BACKBONE:-resnet101}
    RESTORE_FROM=${RESTORE_FROM-./dataset/resnet101-imagenet.pth}  # empty: from scratch
    SNAPSHOT_DIR=${SNAPSHOT_DIR:-snapshots}
    RESUME=${RESUME:-}  # a snapshot of an interrupted run in SNAPSHOT_DIR: continue it
    NUM_WORKERS=${NUM_WORKERS:-4}
    TRAIN_LIST=${TRAIN_LIST:-./dataset/list/$DATASET/train.lst}
    VAL_LIST=${VAL_LIST:-./dataset/list/$DATASET/val.lst}
    if [[ -z "${GPU_IDS:-}" ]]; then
        GPU_IDS=$("$PYTHON" -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")
    fi
    if [[ -z "$GPU_IDS" ]]; then
        echo "run_local.sh: no GPU visible (set GPU_IDS; GPU_IDS=cpu runs NPROC CPU processes; or run" \
             "./run_local.sh without arguments for the CPU demo)" >&2
        exit 1
    fi
    if [[ "$GPU_IDS" == cpu ]]; then   # e.g. to check a set-up on a small dataset
        NPROC=${NPROC:-1}
        DEVICE=(--gpu cpu)
    else
        NPROC=$(awk -F, '{print NF}' <<<"$GPU_IDS")
        DEVICE=(--gpu "$GPU_IDS")
    fi
    # a URL or a name of the weights table (no folder, no .pth: train.py downloads it) passes; a missing file stops
    if [[ -n "$RESTORE_FROM" && ! -f "$RESTORE_FROM" && "$RESTORE_FROM" != *://* \
          && ( "$RESTORE_FROM" == */* || "$RESTORE_FROM" == *.pth ) ]]; then
        echo "run_local.sh: RESTORE_FROM=$RESTORE_FROM: no such file (the ImageNet weights: see the README's" \
             "Weights; RESTORE_FROM=resnet101-imagenet downloads them); RESTORE_FROM= trains from scratch" >&2
        exit 1
    fi
    last_snapshot=$(ls -1v "$SNAPSHOT_DIR"/CS_scenes_[0-9]*.pth 2>/dev/null | tail -n 1 || true)
    if [[ -z "$RESUME" && -n "$last_snapshot" ]]; then
        echo "run_local.sh: SNAPSHOT_DIR=$SNAPSHOT_DIR holds another run's snapshots: RESUME=$last_snapshot" \
             "continues that run, or set another SNAPSHOT_DIR" >&2
        exit 1
    fi
    written=""   # the folders already written (TRAIN_LIST and VAL_LIST may live in different ones)
    for list in "$TRAIN_LIST" "$VAL_LIST"; do
        if [[ ! -f "$list" ]]; then
            dir=$(dirname "$list")
            if [[ "$written" != *"|$dir|"* ]]; then
                echo "run_local.sh: $list is missing: writing the lists to $dir with dataset.make_lists $DATA_PATH"
                "$PYTHON" -m dataset.make_lists "$DATA_PATH" --dataset "$DATASET" --out-dir "$dir"
                written="$written|$dir|"
            fi
            if [[ ! -f "$list" ]]; then
                echo "run_local.sh: $list is still missing (dataset.make_lists writes train/val/trainval.lst, and" \
                     "test.lst for Cityscapes, to $dir): name one of those, or write the list yourself" >&2
                exit 1
            fi
        fi
    done
    set -x
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py \
        --dataset "$DATASET" --data-dir "$DATA_PATH" --data-list "$TRAIN_LIST" --model ccnet --backbone "$BACKBONE" \
        --restore-from "$RESTORE_FROM" --random-mirror --random-scale \
        --input-size "$INPUT_SIZE" --learning-rate "$LR" --weight-decay "$WD" --batch-size "$BS" \
        --num-steps "$STEPS" --recurrence "$RECURRENCE" \
        --ohem "$OHEM" --ohem-thres "$OHEM_THRES" --ohem-keep "$OHEM_KEEP" --ccl "$CCL" \
        --clip-length "$CLIP_LENGTH" --frame-stride "$FRAME_STRIDE" \
        --num-workers "$NUM_WORKERS" --snapshot-dir "$SNAPSHOT_DIR" ${RESUME:+--resume "$RESUME"} "${DEVICE[@]}"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" evaluate.py \
        --dataset "$DATASET" --data-dir "$DATA_PATH" --data-list "$VAL_LIST" --model ccnet --backbone "$BACKBONE" \
        --restore-from "$SNAPSHOT_DIR/CS_scenes_$STEPS.pth" --recurrence "$RECURRENCE" \
        --input-size "$INPUT_SIZE" --batch-size 1 --num-workers "$NUM_WORKERS" "${DEVICE[@]}"
    { set +x; } 2>/dev/null
    echo "done in $(( (SECONDS - start) / 60 )) min"
    exit 0
fi

# ---- the demo: CPU only, a few minutes ----
DEMO_DATA=${DEMO_DATA:-demo_data/$DATASET}
DEMO_RUN=${DEMO_RUN:-demo_run/$DATASET}
DEMO_TRAIN=${DEMO_TRAIN:-24}
DEMO_VAL=${DEMO_VAL:-8}
DEMO_HEIGHT=${DEMO_HEIGHT:-128}
DEMO_WIDTH=${DEMO_WIDTH:-256}
DEMO_CROP=${DEMO_CROP:-128,256}
DEMO_BS=${DEMO_BS:-8}
DEMO_STEPS=${DEMO_STEPS:-300}
DEMO_LR=${DEMO_LR:-1e-2}
export CUDA_VISIBLE_DEVICES=""

echo "== 1/3 generating $DEMO_TRAIN + $DEMO_VAL synthetic ${DEMO_HEIGHT}x${DEMO_WIDTH} scenes ($DATASET format) in" \
     "$DEMO_DATA/"
"$PYTHON" -m dataset.generate_demo "$DEMO_DATA" --dataset "$DATASET" --num-train "$DEMO_TRAIN" --num-val "$DEMO_VAL" \
    --height "$DEMO_HEIGHT" --width "$DEMO_WIDTH"
if [[ -e "$DEMO_RUN/snapshots" || -e "$DEMO_RUN/predictions" ]]; then  # a fresh run, not a resumed one
    echo "== replacing the earlier $DATASET demo's snapshots and predictions in $DEMO_RUN/"
    rm -rf "$DEMO_RUN/snapshots" "$DEMO_RUN/predictions"
fi
echo "== 2/3 training the tiny CCNet (R=2$([[ "$CCL" == 1 ]] && echo ", CCL")$([[ "$CLIP_LENGTH" != 1 ]] \
     && echo ", clips of $CLIP_LENGTH frames")) on the CPU: $DEMO_STEPS steps," \
     "batch $DEMO_BS, crops $DEMO_CROP"
"$PYTHON" train.py --dataset "$DATASET" --data-dir "$DEMO_DATA" --data-list "$DEMO_DATA/train.lst" --backbone tiny \
    --restore-from '' \
    --random-mirror --random-scale --input-size "$DEMO_CROP" --batch-size "$DEMO_BS" --num-steps "$DEMO_STEPS" \
    --learning-rate "$DEMO_LR" --recurrence 2 --num-workers 1 --snapshot-dir "$DEMO_RUN/snapshots" \
    --save-pred-every "$DEMO_STEPS" --ccl "$CCL" --clip-length "$CLIP_LENGTH" --frame-stride "$FRAME_STRIDE"
echo "== 3/3 evaluating $DEMO_RUN/snapshots/CS_scenes_$DEMO_STEPS.pth on $DEMO_DATA/val.lst"
"$PYTHON" evaluate.py --data-dir "$DEMO_DATA" --data-list "$DEMO_DATA/val.lst" --backbone tiny --recurrence 2 \
    --restore-from "$DEMO_RUN/snapshots/CS_scenes_$DEMO_STEPS.pth" --whole --num-workers 0 \
    --save-pred "$DEMO_RUN/predictions"
echo "colorized predictions: $(cd "$DEMO_RUN/predictions" && pwd)"
echo "demo done in $((SECONDS - start)) s"
