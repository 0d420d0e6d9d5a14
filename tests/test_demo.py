"""run_local.sh's demo path end to end with a very small configuration (the real demo takes minutes)."""
import json
import os
import subprocess
import sys

import shutil

import pytest

# A stand-in for the Python that run_local.sh's demo calls: it logs each call and creates the folders and the
# snapshot that generate_demo, train.py and evaluate.py would, in no time.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> calls.log
arguments=("$@")
for ((i = 0; i < ${#arguments[@]}; i++)); do
    value=${arguments[i + 1]:-}
    case "${arguments[i]}" in
        -m) [[ "$value" == dataset.generate_demo ]] && mkdir -p "${arguments[i + 2]}" ;;
        --snapshot-dir) mkdir -p "$value" && echo "$DATASET" > "$value/CS_scenes_300.pth" ;;
        --save-pred) mkdir -p "$value" ;;
    esac
done
"""


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k", "lip"])
def test_demo_generates_trains_evaluates_and_prints_the_table(tmp_path, repo_root, dataset):
    env = dict(os.environ, PYTHON=sys.executable, DEMO_DATA=str(tmp_path / "data"), DEMO_RUN=str(tmp_path / "run"), DEMO_TRAIN="4",
               DEMO_VAL="2", DEMO_HEIGHT="64", DEMO_WIDTH="128", DEMO_CROP="64,128", DEMO_BS="2", DEMO_STEPS="3",
               DATASET=dataset)
    done = subprocess.run([str(repo_root / "run_local.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "mean IoU" in done.stdout and "pixel accuracy" in done.stdout and "mean accuracy" in done.stdout
    predictions = tmp_path / "run" / "predictions"
    assert f"colorized predictions: {predictions}" in done.stdout
    assert len([name for name in os.listdir(predictions) if name.endswith(".png")]) == 2
    assert len(os.listdir(predictions / "labelIds")) == 2
    assert (tmp_path / "run" / "snapshots" / "CS_scenes_3.pth").is_file()
    result = json.loads((predictions / "result.json").read_text())
    assert result["num_images"] == 2 and result["recurrence"] == 2 and result["dataset"] == dataset


@pytest.mark.slow
@pytest.mark.parametrize("dataset, processes", [("cityscapes", 2), ("ade20k", 1)])
def test_the_recipe_runs_train_then_evaluate_under_torchrun(tmp_path, repo_root, demo_data, dataset, processes):
    """`./run_local.sh DATA_PATH` on a generated dataset, CPU processes, 2 steps: the whole chain works."""
    data = demo_data(num_train=4, num_val=3, height=64, width=128, dataset=dataset)
    env = dict(os.environ, PYTHON=sys.executable, GPU_IDS="cpu", NPROC=str(processes), STEPS="2", BS="2",
               INPUT_SIZE="48", DATASET=dataset,
               BACKBONE="tiny", RESTORE_FROM="", NUM_WORKERS="0", TRAIN_LIST=data.train_list, VAL_LIST=data.val_list,
               SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    done = subprocess.run([str(repo_root / "run_local.sh"), data.root], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "--ohem 1 --ohem-thres 0.7 --ohem-keep 100000" in done.stderr  # the original's settings, traced by set -x
    assert "--recurrence 2" in done.stderr and "--random-mirror --random-scale" in done.stderr
    assert "--learning-rate 0.01 --weight-decay " + {"cityscapes": "0.0001", "ade20k": "0.0005"}[dataset] in done.stderr
    result = json.loads((tmp_path / "snapshots" / "result.json").read_text())
    assert result["num_images"] == 3 and result["input_size"] == [48, 48] and result["dataset"] == dataset
    assert result["whole"] is (dataset == "ade20k")  # each dataset's evaluation mode
    if processes == 1:  # a second run into the same SNAPSHOT_DIR: refused unless RESUME continues the first
        done = subprocess.run([str(repo_root / "run_local.sh"), data.root], env=env, capture_output=True, text=True,
                              timeout=300)
        last = tmp_path / "snapshots" / "CS_scenes_2.pth"
        assert done.returncode == 1 and done.stderr.strip() == (
            f"run_local.sh: SNAPSHOT_DIR={tmp_path / 'snapshots'} holds another run's snapshots: RESUME={last} "
            "continues that run, or set another SNAPSHOT_DIR")
        env.update(RESUME=str(last), STEPS="3")
        done = subprocess.run([str(repo_root / "run_local.sh"), data.root], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"--resume {last}" in done.stderr
        result = json.loads((tmp_path / "snapshots" / "result.json").read_text())
        assert result["snapshot"].endswith("CS_scenes_3.pth")


def test_each_demo_dataset_has_its_own_folders_and_a_rerun_says_what_it_replaces(tmp_path, repo_root):
    """run_local.sh's demo folders (a copy of the script in an empty folder, a fake Python: a second)."""
    shutil.copy(repo_root / "run_local.sh", tmp_path)
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)

    def demo(dataset):
        env = dict(os.environ, PYTHON=str(fake_python), DATASET=dataset)
        for name in ("DEMO_DATA", "DEMO_RUN"):
            env.pop(name, None)
        done = subprocess.run([str(tmp_path / "run_local.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line for line in done.stdout.splitlines() if "replacing" in line]

    assert demo("cityscapes") == []
    assert demo("ade20k") == []  # the Cityscapes demo's snapshot stays
    for dataset in ("cityscapes", "ade20k"):
        snapshot = tmp_path / "demo_run" / dataset / "snapshots" / "CS_scenes_300.pth"
        assert snapshot.read_text().strip() == dataset
        assert (tmp_path / "demo_run" / dataset / "predictions").is_dir() and (tmp_path / "demo_data" / dataset).is_dir()
    assert demo("cityscapes") == ["== replacing the earlier cityscapes demo's snapshots and predictions in "
                                  "demo_run/cityscapes/"]
    assert (tmp_path / "demo_run" / "ade20k" / "snapshots" / "CS_scenes_300.pth").is_file()
    assert "--data-dir demo_data/cityscapes --data-list demo_data/cityscapes/train.lst" in \
        (tmp_path / "calls.log").read_text()


def test_the_recipe_stops_at_a_missing_restore_from_file_but_passes_names_on(tmp_path, repo_root):
    env = dict(os.environ, PYTHON=sys.executable, GPU_IDS="cpu", SNAPSHOT_DIR=str(tmp_path / "snapshots"),
               RESTORE_FROM=str(tmp_path / "resnet101-imagnet.pth"))
    done = subprocess.run([str(repo_root / "run_local.sh"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.startswith(f"run_local.sh: RESTORE_FROM={env['RESTORE_FROM']}: no such")
    # a name goes on to train.py (which downloads it): here the missing list files stop the run instead
    env.update(RESTORE_FROM="resnet101-imagenet", TRAIN_LIST=str(tmp_path / "lists" / "train.lst"))
    done = subprocess.run([str(repo_root / "run_local.sh"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "RESTORE_FROM" not in done.stderr
    assert done.stderr.strip() == f"make_lists.py: error: not a Cityscapes folder (no leftImg8bit/ inside): {tmp_path}"
