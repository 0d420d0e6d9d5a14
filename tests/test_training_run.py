"""engine.training_run's policies, each without running train.py: the folder locks (snapshot and log folder), the
refusal or clearing of an earlier run, the run identity that refuses a --resume into another run's folders, the
clean-up of our own temporary files only, resume (weights, optimizer, scaler, RNG, the argument diff), the finite
save, the rank-0 relay and the label checks; and, through train.py's main, a --resume into another run's folder."""
import argparse
import errno
import os
from pathlib import Path

import pytest
import torch

from engine.train_step import make_sgd
from engine.training_run import (RUN_ID_FILE, TrainingError, check_resumed_args, claim_run_folders, label_problems,
                                 load_scaler_state, log_run_id, on_main_process, resume_or_start, save_snapshot,
                                 snapshot_path, snapshot_run_id, snapshot_state)
from networks import build_model
from utils.checkpoint import CHECKSUM_KEY, TEMPORARY_NAME, FolderLock, load_checkpoint, save_checkpoint
from utils.rng import gather_rng_states


def tiny_model():
    torch.manual_seed(0)
    return build_model(backbone="tiny", num_classes=4, norm="bn")


def run_args(**overrides):
    """The train.py args the policies read (a tiny run of 4 steps)."""
    values = dict(snapshot_dir="", log_dir="", resume=None, overwrite_snapshots=False, random_seed=1234,
                  num_steps=4, dataset="cityscapes", input_size=(48, 96), amp="off", backbone="tiny",
                  num_classes=4, ignore_label=255, data_list="train.lst")
    values.update(overrides)
    return argparse.Namespace(**values)


def write_snapshot(folder, iteration, run_id, model=None, optimizer=None, scaler=None, **args):
    """A snapshot of ``model`` (a fresh tiny one by default) as train.py writes it, for run ``run_id``."""
    model = model or tiny_model()
    optimizer = optimizer or make_sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    state = snapshot_state(model, optimizer, scaler, iteration, run_args(**args), run_id,
                           gather_rng_states(torch.device("cpu"), 1))
    path = snapshot_path(str(folder), iteration)
    save_checkpoint(state, path)
    return Path(path)


def write_log(log_dir, run_id=None):
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train_log.csv").write_text("iteration,loss,lr,elapsed_s\n1,2.5,0.01,0.1\n")
    (log_dir / "events.out.tfevents.1.host").write_bytes(b"events")
    if run_id:
        (log_dir / RUN_ID_FILE).write_text(run_id + "\n")


def claim(snapshot_dir, log_dir=None, resume=None, overwrite=False, messages=None):
    return claim_run_folders(str(snapshot_dir), str(log_dir or Path(snapshot_dir) / "logs"),
                             None if resume is None else str(resume), overwrite,
                             (messages if messages is not None else []).append)


# ------------------------------------------------------------------------------------------------ the locks
def test_a_run_locks_its_snapshot_and_log_folders(tmp_path):
    folders = claim(tmp_path / "a", tmp_path / "logs")
    try:
        held = rf"\({tmp_path / 'a' / '.lock'} is held by process {os.getpid()}\)"
        with pytest.raises(TrainingError, match=rf"^--snapshot-dir {tmp_path / 'a'} is in use by another training "
                                                rf"run {held}"):
            claim(tmp_path / "a", tmp_path / "other_logs")
        # a second run elsewhere that names the live run's log folder (with --overwrite-snapshots) is refused too
        write_log(tmp_path / "logs")
        with pytest.raises(TrainingError, match=rf"^--log-dir {tmp_path / 'logs'} is in use by another training"):
            claim(tmp_path / "b", tmp_path / "logs", overwrite=True)
        assert (tmp_path / "logs" / "train_log.csv").is_file()
        FolderLock(tmp_path / "b").release()  # the refused run released the lock it had taken
    finally:
        folders.release()
    claim(tmp_path / "a", tmp_path / "logs", overwrite=True).release()  # free again


def test_the_default_log_folder_inside_the_snapshot_folder_is_locked_too(tmp_path):
    folders = claim(tmp_path / "run")
    try:
        with pytest.raises(TrainingError, match="^--log-dir .* is in use by another training run"):
            claim(tmp_path / "elsewhere", tmp_path / "run" / "logs")
    finally:
        folders.release()


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match=rf"^--snapshot-dir {tmp_path / 'file'}: cannot be written \("):
        claim(tmp_path / "file")
    with pytest.raises(TrainingError, match=rf"^--log-dir {tmp_path / 'file'}: cannot be written \("):
        claim(tmp_path / "run", tmp_path / "file")
    FolderLock(tmp_path / "run").release()  # the snapshot folder's lock was released on the error


# ---------------------------------------------------------------------------------- refuse or clear (fresh run)
def test_a_fresh_run_refuses_an_earlier_runs_files(tmp_path):
    snapshot = write_snapshot(tmp_path, 2, "aaaa")
    with pytest.raises(TrainingError, match=rf"holds another run's snapshots \(1, the last {snapshot}\): pass "
                                            rf"--resume {snapshot}"):
        claim(tmp_path)
    snapshot.unlink()
    write_log(tmp_path / "logs", "aaaa")
    with pytest.raises(TrainingError, match=rf"^--log-dir {tmp_path / 'logs'} holds another run's train_log.csv"):
        claim(tmp_path)
    assert log_run_id(tmp_path / "logs") == "aaaa"  # nothing deleted, nothing rewritten


def test_overwrite_deletes_the_earlier_runs_files_only(tmp_path):
    write_snapshot(tmp_path, 2, "aaaa")
    write_log(tmp_path / "logs", "aaaa")
    mine = [tmp_path / "notes.txt", tmp_path / ".notes.tmp", tmp_path / "logs" / "notes.txt"]
    for path in mine:
        path.write_text("the user's")
    messages = []
    folders = claim(tmp_path, overwrite=True, messages=messages)
    folders.release()
    assert list(tmp_path.glob("*.pth")) == [] and not (tmp_path / "logs" / "train_log.csv").exists()
    assert list((tmp_path / "logs").glob("events.*")) == []
    assert all(path.read_text() == "the user's" for path in mine)
    assert messages == ["--overwrite-snapshots: deleted 4 files of an earlier run (snapshots CS_scenes_2.pth; its "
                        "logs)"]
    assert log_run_id(tmp_path / "logs") == folders.run_id != "aaaa"


def test_only_our_temporary_files_are_removed(tmp_path, monkeypatch):
    """What an interrupted save leaves (its name as save_checkpoint makes it) goes; a user's .tmp files stay."""
    names = []
    real_save = torch.save

    def record(state, file, *args, **kwargs):
        names.extend(path.name for path in tmp_path.iterdir())  # the temporary file, being written
        return real_save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", record)
    save_checkpoint({"iteration": 1}, tmp_path / "CS_scenes_1.pth")
    monkeypatch.undo()
    assert TEMPORARY_NAME.fullmatch(names[0]) and names[0].startswith(".CS_scenes_1.pth.")
    leftover = tmp_path / names[0]
    leftover.write_bytes(b"half a snapshot")
    kept = [".notes.tmp", ".CS_scenes_1.pth.tmp", ".CS_scenes_1.pth.notes.tmp", ".model.pth.0123abcd.tmp",
            "CS_scenes_1.pth.0123abcd.tmp"]
    for name in kept:
        (tmp_path / name).write_text("the user's")
    messages = []
    claim(tmp_path, resume=tmp_path / "CS_scenes_1.pth", messages=messages).release()
    assert not leftover.exists() and all((tmp_path / name).read_text() == "the user's" for name in kept)
    assert messages == [f"removed {leftover}: the temporary file of an interrupted snapshot save"]


# ------------------------------------------------------------------------------------------ the run identity
def test_resume_keeps_the_run_id_and_its_own_folder(tmp_path):
    snapshot = write_snapshot(tmp_path, 2, "aaaa")
    write_log(tmp_path / "logs", "aaaa")
    folders = claim(tmp_path, resume=snapshot)
    folders.release()
    assert folders.run_id == "aaaa" == log_run_id(tmp_path / "logs") == snapshot_run_id(snapshot)
    # into a new folder: the same run continues there
    folders = claim(tmp_path / "continued", resume=snapshot)
    folders.release()
    assert folders.run_id == "aaaa" == log_run_id(tmp_path / "continued" / "logs")


def test_resume_into_another_runs_folder_is_refused(tmp_path):
    run_a = write_snapshot(tmp_path / "a", 2, "aaaa")
    run_b = write_snapshot(tmp_path / "b", 4, "bbbb")
    write_log(tmp_path / "b" / "logs", "bbbb")
    before = run_b.read_bytes(), (tmp_path / "b" / "logs" / "train_log.csv").read_text()
    with pytest.raises(TrainingError, match=rf"^--snapshot-dir {tmp_path / 'b'} holds snapshots of another run \(run "
                                            rf"bbbb, the last {run_b}\) than --resume {run_a} \(run aaaa\)"):
        claim(tmp_path / "b", resume=run_a)
    # only its log there (run B killed before its first snapshot): refused as well
    run_b.rename(tmp_path / "kept.pth")
    with pytest.raises(TrainingError, match=rf"^--log-dir {tmp_path / 'b' / 'logs'} holds the log of another run "
                                            r"\(run bbbb\) than --resume"):
        claim(tmp_path / "b", resume=run_a)
    assert ((tmp_path / "kept.pth").read_bytes(), (tmp_path / "b" / "logs" / "train_log.csv").read_text()) == before
    assert log_run_id(tmp_path / "b" / "logs") == "bbbb"


def test_snapshots_without_a_run_id_identify_no_run(tmp_path):
    """Snapshots written before runs had ids (and the original's) are not compared; resuming one starts a new id."""
    legacy = write_snapshot(tmp_path, 2, "aaaa")
    state = load_checkpoint(legacy)
    del state["args"]["run_id"]
    torch.save(state, legacy)
    assert snapshot_run_id(legacy) is None and snapshot_run_id(tmp_path / "absent.pth") is None
    folders = claim(tmp_path, resume=legacy)
    folders.release()
    assert len(folders.run_id) == 16 and log_run_id(tmp_path / "logs") == folders.run_id


# ---------------------------------------------------------------------------------------------------- resume
def trained_one_step(model, optimizer, scaler):
    model.train()
    loss = model(torch.randn(2, 3, 32, 32))[0].square().mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_resume_restores_weights_optimizer_scaler_and_rng(tmp_path):
    model = tiny_model()
    optimizer = make_sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    trained_one_step(model, optimizer, scaler)
    torch.manual_seed(99)
    snapshot = write_snapshot(tmp_path, 2, "aaaa", model, optimizer, scaler, amp="fp16")
    expected_draw = torch.rand(3)

    resumed = build_model(backbone="tiny", num_classes=4, norm="bn")
    resumed_optimizer = make_sgd(resumed.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    resumed_scaler = torch.amp.GradScaler("cpu", enabled=True)
    messages = []
    args = run_args(resume=str(snapshot), amp="fp16", input_size=(48, 64))
    start = resume_or_start(args, resumed, resumed_optimizer, resumed_scaler, 0, 1, torch.device("cpu"),
                            messages.append)
    assert start == 2 and torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(value, resumed.state_dict()[key]) for key, value in model.state_dict().items())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if p in optimizer.state]
    resumed_momentum = [resumed_optimizer.state[p]["momentum_buffer"] for p in resumed.parameters()
                        if p in resumed_optimizer.state]
    assert len(momentum) == len(resumed_momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum))
    assert resumed_scaler.get_scale() == scaler.get_scale()
    assert messages == ["warning: the resumed run differs from the snapshot's: --input-size (48, 96) -> (48, 64)",
                        f"resumed from {snapshot} at iteration 2"]


def test_resume_warnings_and_refusals(tmp_path):
    messages = []
    check_resumed_args({"input_size": [48, 96], "amp": "off"}, run_args(), messages.append)
    assert messages == []  # a tuple saved as a list is the same; flags the snapshot does not name are not compared
    check_resumed_args({"amp": "bf16", "random_seed": 1}, run_args(), messages.append)
    assert messages == ["warning: the resumed run differs from the snapshot's: --random-seed 1 -> 1234; --amp 'bf16' "
                        "-> 'off'"]
    enabled, disabled = torch.amp.GradScaler("cpu", enabled=True), torch.amp.GradScaler("cpu", enabled=False)
    messages.clear()
    load_scaler_state(enabled, {}, messages.append)
    assert messages == ["warning: --amp changed to or from fp16 since the snapshot: the gradient scaler starts afresh"]

    model = tiny_model()
    optimizer = make_sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    at_the_end = write_snapshot(tmp_path, 4, "aaaa")

    def resume(path):
        return resume_or_start(run_args(resume=str(path)), model, optimizer, disabled, 0, 1, torch.device("cpu"),
                               messages.append)

    with pytest.raises(TrainingError, match=r"is at iteration 4, --num-steps is 4: nothing to do"):
        resume(at_the_end)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(TrainingError, match=rf"^--resume {bare}: holds no optimizer state"):
        resume(bare)
    no_rng = tmp_path / "no_rng.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 1}, no_rng)
    with pytest.raises(TrainingError, match=rf"^--resume {no_rng}: not a snapshot of train.py \(no rng\)"):
        resume(no_rng)
    # a fresh run: iteration 0, the generators seeded with --random-seed + rank
    assert resume_or_start(run_args(), model, optimizer, disabled, 1, 2, torch.device("cpu"), messages.append) == 0
    draw = torch.rand(2)
    torch.manual_seed(1235)
    assert torch.equal(draw, torch.rand(2))


# ------------------------------------------------------------------------------------------------- the save
def test_save_writes_finite_snapshots_only(tmp_path):
    model = tiny_model()
    optimizer = make_sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trained_one_step(model, optimizer, scaler)
    rng = gather_rng_states(torch.device("cpu"), 1)
    path = snapshot_path(str(tmp_path), 3)
    state = snapshot_state(model, optimizer, scaler, 3, run_args(), "aaaa", rng)
    save_snapshot(state, path, None)
    saved = load_checkpoint(path)
    assert set(saved) == {"model", "optimizer", "iteration", "rng", "scaler", "args", CHECKSUM_KEY}
    assert saved["args"]["run_id"] == "aaaa" and saved["iteration"] == 3

    # a NaN in a momentum buffer (the loss and the weights finite): not written, the last good one named
    next(iter(optimizer.state.values()))["momentum_buffer"][0] = float("nan")
    bad = snapshot_state(model, optimizer, scaler, 4, run_args(), "aaaa", rng)
    later = snapshot_path(str(tmp_path), 4)
    with pytest.raises(TrainingError, match=rf"^iteration 4: 1 tensor\(s\) hold NaN or infinite values \(first: "
                                            rf"optimizer\.state\.\d+\.momentum_buffer\); {later} not written, "
                                            rf"training stopped\. Last good snapshot: {path}$"):
        save_snapshot(bad, later, path)
    assert not os.path.exists(later) and sorted(p.name for p in tmp_path.iterdir()) == ["CS_scenes_3.pth"]


def test_a_refused_write_names_the_last_snapshot(tmp_path, monkeypatch):
    def full_disk(state, file, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    path = tmp_path / "CS_scenes_2.pth"
    with pytest.raises(TrainingError, match=rf"^checkpoint {path}: not written: no space left on device; training "
                                            r"stopped at iteration 2\. Last good snapshot: none written yet$"):
        save_snapshot({"model": {}, "optimizer": {}, "iteration": 2}, str(path), None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ the relay and the labels
def test_the_main_process_relays_its_result_and_its_failure():
    assert on_main_process(lambda: 42, torch.device("cpu")) == 42

    def fails():
        raise TrainingError("the folder is refused")

    with pytest.raises(TrainingError, match="^the folder is refused$"):
        on_main_process(fails, torch.device("cpu"))
    with pytest.raises(KeyError):  # not one of the one-line failures: a bug, raised as it is
        on_main_process(lambda: {}["x"], torch.device("cpu"))


def test_label_problems():
    args = run_args()
    labels = torch.full((2, 3, 3), 255)
    assert label_problems(labels, ["a.png", "b.png"], args, 1) == (True, None)
    labels[1, 0, 0] = 2
    assert label_problems(labels, ["a.png", "b.png"], args, 1) == (False, None)
    labels[1, 2, 2] = 7
    all_void, message = label_problems(labels, ["a.png", "b.png"], args, 5)
    assert not all_void and message == ("iteration 5: the label of b.png (train.lst) holds train id 7, outside 0..3 "
                                        "of --num-classes 4 (the void label 255 aside): pass the dataset's number of "
                                        "classes, or fix the label")


# ------------------------------------------------------------------------------------------- through train.py
def test_train_refuses_to_resume_run_a_into_run_bs_folder(training_demo, tmp_path, failed_run):
    import train  # the one test here that runs the script's main (in-process), for the whole path
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert train.main(training_demo.training_argv(run_a, steps=1)) == 0
    assert train.main(training_demo.training_argv(run_b, "--random-seed", "7", steps=2)) == 0
    before = {path: path.read_bytes() for path in [*run_b.glob("*.pth"), run_b / "logs" / "train_log.csv"]}
    error = failed_run(train.main, training_demo.training_argv(run_b, "--resume", str(run_a / "CS_scenes_1.pth"),
                                                               steps=2))
    assert error.startswith(f"--snapshot-dir {run_b} holds snapshots of another run (run ")
    assert {path: path.read_bytes() for path in before} == before
    # into its own folder it continues
    assert train.main(training_demo.training_argv(run_a, "--resume", str(run_a / "CS_scenes_1.pth"), steps=2)) == 0
    assert snapshot_run_id(run_a / "CS_scenes_2.pth") == snapshot_run_id(run_a / "CS_scenes_1.pth") is not None
