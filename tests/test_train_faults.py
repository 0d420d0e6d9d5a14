"""train.py when something goes wrong (issue 10): each fault injected, the exit code and the one-line message
checked, and that nothing was lost (the last good snapshot finite and loadable, the CSV rows present)."""
import csv
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import evaluate
import train
from networks import build_model
from utils.checkpoint import (CheckpointError, FolderLock, load_checkpoint, load_model_weights, non_finite_tensors,
                              save_checkpoint)
from utils.cli import EXIT_USAGE

ROOT = Path(__file__).resolve().parent.parent


def csv_rows(snapshot_dir):
    with open(Path(snapshot_dir) / "logs" / "train_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def checksums(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(folder).glob("*.pth")}


def assert_good_snapshot(path):
    """A snapshot that exists, holds only finite tensors and loads into the tiny model."""
    snapshot = load_checkpoint(path)
    assert non_finite_tensors(snapshot) == []
    load_model_weights(build_model(backbone="tiny", norm="bn"), snapshot, name=str(path))


@pytest.fixture(scope="module")
def one_step_snapshot(training_demo, tmp_path_factory):
    """A snapshot of one training step (the tiny model)."""
    folder = tmp_path_factory.mktemp("one_step")
    assert train.main(training_demo.training_argv(folder, steps=1)) == 0
    return folder / "CS_scenes_1.pth"


# ------------------------------------------------------------------------------------ non-finite values
def test_nan_loss_names_the_last_finite_snapshot(training_demo, tmp_path, failed_run):
    """lr 1e10: the first step's weights are huge but finite (saved), the second loss is NaN."""
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--learning-rate", "1e10",
                                                                  "--save-pred-every", "1"))
    assert error == (f"non-finite loss at iteration 2 (on 1 process(es)); stopped. Last good snapshot: "
                     f"{tmp_path / 'CS_scenes_1.pth'}")
    assert_good_snapshot(tmp_path / "CS_scenes_1.pth")
    assert [row["iteration"] for row in csv_rows(tmp_path)] == ["1"]


def test_a_snapshot_with_infinite_buffers_is_not_written(training_demo, tmp_path, failed_run):
    """lr 1e4: the loss stays finite but the third step's BatchNorm running_var overflows (the issue's case)."""
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--learning-rate", "1e4",
                                                                  "--save-pred-every", "1"))
    assert error == (f"iteration 3: 1 tensor(s) hold NaN or infinite values (first: model.head.convb.1.running_var); "
                     f"{tmp_path / 'CS_scenes_3.pth'} not written, training stopped. Last good snapshot: "
                     f"{tmp_path / 'CS_scenes_2.pth'}")
    assert sorted(path.name for path in tmp_path.glob("*.pth")) == ["CS_scenes_1.pth", "CS_scenes_2.pth"]
    assert_good_snapshot(tmp_path / "CS_scenes_2.pth")
    assert [row["iteration"] for row in csv_rows(tmp_path)] == ["1", "2", "3"]


def test_evaluate_refuses_a_checkpoint_with_infinite_weights(training_demo, one_step_snapshot, tmp_path, failed_run):
    snapshot = load_checkpoint(one_step_snapshot)
    snapshot["model"]["layer1.0.bn1.running_var"][0] = float("inf")
    bad = tmp_path / "diverged.pth"
    torch.save(snapshot, bad)
    error = failed_run(evaluate.main, ["--data-dir", training_demo.root, "--data-list", training_demo.val_list,
                                       "--restore-from",
                                       str(bad), "--gpu", "cpu", "--whole", "--num-workers", "0"])
    assert error == (f"checkpoint {bad}: 1 tensor(s) hold NaN or infinite values (model.layer1.0.bn1.running_var): "
                     "the weights of a diverged run, unusable")


# ------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_keeps_the_last_snapshot(training_demo, tmp_path, monkeypatch, failed_run):
    """The second snapshot's write fails half-way with ENOSPC: one line, no temporary file, the first intact."""
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(state, file, *args, **kwargs):
        calls.append(state["iteration"])
        if len(calls) == 2:
            file.write(b"half a snapshot")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--save-pred-every", "2"))
    assert error == (f"checkpoint {tmp_path / 'CS_scenes_4.pth'}: not written: no space left on device; training "
                     f"stopped at iteration 4. Last good snapshot: {tmp_path / 'CS_scenes_2.pth'}")
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == [".lock", "CS_scenes_2.pth"]
    monkeypatch.undo()
    assert_good_snapshot(tmp_path / "CS_scenes_2.pth")
    assert len(csv_rows(tmp_path)) == 4


# ----------------------------------------------------------------------- the snapshot folder: one run at a time
# A training process that stops itself at an iteration: SIGKILL half-way through writing that iteration's snapshot
# ("kill"), or a long sleep after logging it ("hold", holding the folder's lock).
STOPPED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
import train
from utils.logger import TrainingLogger
mode, at = sys.argv[1], int(sys.argv[2])
real_save, real_log = torch.save, TrainingLogger.log
def save(state, file, *args, **kwargs):
    if mode == "kill" and state["iteration"] == at:
        file.write(b"half a snapshot")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, file, *args, **kwargs)
def log(self, iteration, **scalars):
    real_log(self, iteration, **scalars)
    if mode == "hold" and iteration == at:
        time.sleep(120)
torch.save, TrainingLogger.log = save, log
sys.exit(train.main(sys.argv[3:]))
"""


def start_stopped_run(mode, at, argv):
    return subprocess.Popen([sys.executable, "-c", STOPPED_RUN.format(root=str(ROOT)), mode, str(at), *argv],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_keeps_the_log_and_resume_continues_it(training_demo, tmp_path):
    """Killed while writing snapshot 12 (of 14; every 4): the CSV keeps rows 1..12, the temporary file is removed
    at the next start, the lock is free; resumed from 8, the CSV holds 1..14 once each, rows 9..12 as the killed run
    wrote them (the resumed run is the same computation)."""
    argv = training_demo.training_argv(tmp_path, "--save-pred-every", "4", steps=14)
    killed = start_stopped_run("kill", 12, argv)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    rows_of_killed_run = csv_rows(tmp_path)
    assert [int(row["iteration"]) for row in rows_of_killed_run] == list(range(1, 13))
    leftovers = list(tmp_path.glob(".CS_scenes_12.pth.*.tmp"))
    assert len(leftovers) == 1 and sorted(path.name for path in tmp_path.glob("*.pth")) == ["CS_scenes_4.pth",
                                                                                           "CS_scenes_8.pth"]
    assert train.main(argv + ["--resume", str(tmp_path / "CS_scenes_8.pth")]) == 0
    assert not leftovers[0].exists()
    rows = csv_rows(tmp_path)
    assert [int(row["iteration"]) for row in rows] == list(range(1, 15))
    assert [row["loss"] for row in rows[:12]] == [row["loss"] for row in rows_of_killed_run]
    assert_good_snapshot(tmp_path / "CS_scenes_14.pth")


def test_a_second_run_on_a_locked_snapshot_dir_is_refused(training_demo, tmp_path, failed_run):
    """Another training holds the folder: one line naming it and the holder; the first run's files untouched. Once
    that run is killed, the kernel has released its lock."""
    argv = training_demo.training_argv(tmp_path, "--save-pred-every", "1", steps=6)
    first = start_stopped_run("hold", 2, argv)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "logs" / "train_log.csv").exists() or len(csv_rows(tmp_path)) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        before = checksums(tmp_path)
        assert list(before) == ["CS_scenes_1.pth"]
        error = failed_run(train.main, argv + ["--resume", str(tmp_path / "CS_scenes_1.pth")])
        assert error == (f"--snapshot-dir {tmp_path} is in use by another training run ({tmp_path / '.lock'} is "
                         f"held by process {first.pid}): wait for it to end, or choose another --snapshot-dir")
        assert checksums(tmp_path) == before and len(csv_rows(tmp_path)) == 2
    finally:
        first.kill()
        first.communicate()
    FolderLock(tmp_path).release()  # free again: no stale lock after a SIGKILL


def test_a_fresh_run_into_a_used_snapshot_dir_is_refused(training_demo, one_step_snapshot, tmp_path, failed_run):
    shutil.copytree(one_step_snapshot.parent, tmp_path, dirs_exist_ok=True)
    before = checksums(tmp_path)
    error = failed_run(train.main, training_demo.training_argv(tmp_path, steps=1))
    snapshot = tmp_path / "CS_scenes_1.pth"
    assert error == (f"--snapshot-dir {tmp_path} holds another run's snapshots (1, the last {snapshot}): pass "
                     f"--resume {snapshot} to continue that run, or choose another --snapshot-dir "
                     "(--overwrite-snapshots deletes them and starts afresh)")
    assert checksums(tmp_path) == before and len(csv_rows(tmp_path)) == 1
    # the log of a run killed before its first snapshot counts too
    snapshot.unlink()
    error = failed_run(train.main, training_demo.training_argv(tmp_path, steps=1))
    assert error.startswith(f"--log-dir {tmp_path / 'logs'} holds another run's train_log.csv")
    # --overwrite-snapshots: the earlier run's files go first, the folder holds the new run only
    assert train.main(training_demo.training_argv(tmp_path, "--overwrite-snapshots", "--random-mirror", steps=2)) == 0
    assert sorted(path.name for path in tmp_path.glob("*.pth")) == ["CS_scenes_2.pth"]
    assert [row["iteration"] for row in csv_rows(tmp_path)] == ["1", "2"]
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1


def test_a_snapshot_dir_that_cannot_be_written_is_one_line(training_demo, tmp_path, failed_run):
    not_a_folder = tmp_path / "snapshots"
    not_a_folder.write_text("a file")
    error = failed_run(train.main, training_demo.training_argv(not_a_folder))
    assert error.startswith(f"--snapshot-dir {not_a_folder}: cannot be written (")
    assert not_a_folder.read_text() == "a file"


# --------------------------------------------------------------------------------------------- the labels
def void_copy(training_demo, folder, void, valid):
    """A copy of the training data and a list of its first ``void`` training samples, their labels made void (label id
    0, 'unlabeled'), then ``valid`` others as they are: (data dir, list file)."""
    shutil.copytree(training_demo.root, folder)
    lines = Path(training_demo.train_list).read_text().splitlines()[:void + valid]
    for line in lines[:void]:
        label = folder / line.split("\t")[1]
        cv2.imwrite(str(label), np.zeros_like(cv2.imread(str(label), cv2.IMREAD_GRAYSCALE)))
    (folder / "mixed.lst").write_text("\n".join(lines) + "\n")
    return str(folder), str(folder / "mixed.lst")


def test_all_void_batches_are_skipped_not_trained_on(training_demo, tmp_path, capsys):
    root, train_list = void_copy(training_demo, tmp_path / "void_data", void=2, valid=0)
    argv = training_demo.training_argv(tmp_path / "run", steps=2)
    argv[argv.index("--data-dir") + 1], argv[argv.index("--data-list") + 1] = root, train_list
    assert train.main(argv) == 0
    output = capsys.readouterr()
    assert "iteration 1 skipped: no valid label pixel in the batch of 1 process(es) (every pixel --ignore-label " \
           "255)" in output.out
    assert "2 iteration(s) skipped, their batch without a valid label pixel: 1, 2" in output.out
    torch.manual_seed(1234)  # --random-seed: the initial weights, unchanged (a step on loss 0 still decays them)
    initial = build_model(backbone="tiny", norm="bn").state_dict()
    saved = load_checkpoint(tmp_path / "run" / "CS_scenes_2.pth")["model"]
    assert all(torch.equal(saved[key], value) for key, value in initial.items())


def test_num_classes_below_the_labels_train_ids_is_one_line(training_demo, tmp_path, failed_run):
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--num-classes", "5"))
    pattern = (rf"iteration 1: the label of leftImg8bit/train/\S+\.png \({re.escape(training_demo.train_list)}\) holds "
               r"train id (\d+), outside 0\.\.4 of --num-classes 5 \(the void label 255 aside\): pass the dataset's "
               r"number of classes, or fix the label")
    match = re.fullmatch(pattern, error)
    assert match and int(match.group(1)) >= 5, error
    assert list(tmp_path.glob("*.pth")) == []


# ----------------------------------------------------------------------------------------- flags and files
def test_a_gpu_this_machine_lacks_is_an_error(training_demo, tmp_path, monkeypatch, failed_run, capsys):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after the test
    if torch.cuda.device_count() <= 7:
        error = failed_run(train.main, training_demo.training_argv(tmp_path, "--gpu", "7"))
        assert error.startswith("--gpu 7: ") and error.endswith("or pass --gpu cpu to run on the CPU")
        assert "CUDA_VISIBLE_DEVICES" not in os.environ and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--gpu", "abc"])
    assert exit_info.value.code == EXIT_USAGE
    assert "--gpu: expected GPU ids like 0 or 0,1,2,3" in capsys.readouterr().err


def test_a_missing_restore_from_is_an_error(training_demo, tmp_path, failed_run):
    typo = tmp_path / "resnet101-imagnet.pth"
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--restore-from", str(typo)))
    assert error == (f"--restore-from {typo}: no such file (ImageNet weights: see the README's Weights for "
                     "resnet101-imagenet.pth); pass --restore-from '' to train from scratch")
    default = train.parse_args([]).restore_from
    if not os.path.exists(default):
        argv = training_demo.training_argv(tmp_path)
        del argv[argv.index("--restore-from"):argv.index("--restore-from") + 2]
        assert failed_run(train.main, argv).startswith(f"--restore-from {default}: no such file")
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_bare_state_dict_says_to_restore_from(training_demo, one_step_snapshot, tmp_path, failed_run):
    bare = tmp_path / "weights.pth"
    torch.save(load_checkpoint(one_step_snapshot)["model"], bare)
    error = failed_run(train.main, training_demo.training_argv(tmp_path / "run", "--resume", str(bare)))
    assert error == (f"--resume {bare}: holds no optimizer state (a bare state dict, not a snapshot of train.py): to "
                     f"start from its weights, pass --restore-from {bare} instead")


def test_resume_mismatch_names_the_file(training_demo, one_step_snapshot, tmp_path, failed_run):
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--resume", str(one_step_snapshot),
                                                                  "--num-classes", "21"))
    assert error.startswith(f"checkpoint {one_step_snapshot}: shape mismatch") and "num_classes=19" in error


def test_learning_rate_must_be_positive(capsys):
    for value in ("0", "-0.01"):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(["--learning-rate", value])
        assert exit_info.value.code == EXIT_USAGE
        assert f"--learning-rate: expected a number > 0, got '{value}'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the same, under torchrun
def torchrun(tmp_path, training_demo, *extra, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *training_demo.training_argv(tmp_path / "run", "--batch-size", "4", *extra, steps=2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_skips_void_batches_and_stops_on_a_locked_dir_together(training_demo, tmp_path):
    """Two CPU processes, one sample each, one of them void: both ranks skip every iteration (a rank that stepped
    alone would wait forever for the other's gradients); when rank 0 finds --snapshot-dir locked, both processes
    stop with one line instead of waiting for rank 0."""
    root, train_list = void_copy(training_demo, tmp_path / "void_data", void=1, valid=1)
    result = torchrun(tmp_path, training_demo, "--data-dir", root, "--data-list", train_list, "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 1 skipped: no valid label pixel in the batch of 1 process(es)" in result.stdout
    assert "2 iteration(s) skipped" in result.stdout
    lock = FolderLock(tmp_path / "run")
    try:
        result = torchrun(tmp_path, training_demo, "--resume", str(tmp_path / "run" / "CS_scenes_2.pth"))
    finally:
        lock.release()
    assert result.returncode != 0, result.stderr[-3000:]
    assert f"train.py: error: --snapshot-dir {tmp_path / 'run'} is in use by another training run" in result.stderr
    assert "train.py: error: stopped by the main process (rank 0): see its error line" in result.stderr


# ------------------------------------------------------------------------------------------ the helpers
def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    """A file-size limit (RLIMIT_FSIZE) as torch reports it: a RuntimeError raised while handling the OSError."""
    path = tmp_path / "CS_scenes_2.pth"
    save_checkpoint({"iteration": 2}, path)
    before = path.read_bytes()

    def too_large(state, file):
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos") from None

    monkeypatch.setattr(torch, "save", too_large)
    with pytest.raises(CheckpointError, match=f"^checkpoint {path}: not written: file too large$"):
        save_checkpoint({"iteration": 4}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_log_keeps_earlier_rows_and_drops_a_cut_one(tmp_path):
    from utils.logger import _truncate_csv
    log = tmp_path / "train_log.csv"
    log.write_text("iteration,loss,lr,elapsed_s\n1,2.5,0.01,0.1\n2,2.4,0.01,0.2\n3,2.3,0.01,0.3\n4,2.")
    _truncate_csv(str(log), 2)
    assert log.read_text().splitlines() == ["iteration,loss,lr,elapsed_s", "1,2.5,0.01,0.1", "2,2.4,0.01,0.2"]
    log.write_text("iteration,loss,lr,elapsed_s\n1,2.5,0.01,0.1\n2,2.")
    _truncate_csv(str(log), 9)
    assert log.read_text().splitlines() == ["iteration,loss,lr,elapsed_s", "1,2.5,0.01,0.1"]


def test_a_full_disk_while_logging_stops_the_log_not_the_training(tmp_path, capsys, monkeypatch):
    """A CSV row that cannot be written (ENOSPC): one warning line, the rows before it kept, no exception (rank 0
    alone stopping would leave the other processes waiting; a snapshot that cannot be written stops them all)."""
    from utils.logger import TrainingLogger
    logger = TrainingLogger(str(tmp_path), total_steps=4)
    logger.log(1, loss=2.5, lr=0.01)
    logger.log(2, loss=2.4, lr=0.01)

    def full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logger.csv_file, "flush", full_disk)
    logger.log(3, loss=2.3, lr=0.01)
    logger.log(4, loss=2.2, lr=0.01)
    logger.close()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [f"warning: {tmp_path / 'train_log.csv'}: rows from iteration 3 on not written (No space left "
                        "on device); training goes on"]
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[:3]] == ["iteration", "1", "2"] and "4" not in [r[:1] for r in rows]
