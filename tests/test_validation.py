"""Validation during training (train.py --val-every): the val rows, the best snapshot, exact resume, the checks
before the first step, the best snapshot among the run's files; the log's curves (utils.plot_log)."""
import csv
import math
import shutil
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from engine.training_run import (TrainingError, best_snapshot_path, refuse_another_runs_folders,
                                 refuse_or_clear_earlier_run, snapshots_in)
from utils import plot_log
from utils.checkpoint import CHECKSUM_KEY, load_checkpoint, save_checkpoint
from utils.cli import EXIT_USAGE
from utils.logger import TrainingLogger

AUGMENT = ("--random-mirror", "--random-scale", "--save-pred-every", "2")
VAL_COLUMNS = ["val_miou", "val_pixel_acc", "val_mean_acc"]


def run(training_demo, snapshot_dir, *extra, steps=4):
    return train.main(training_demo.training_argv(snapshot_dir, *AUGMENT, *extra, steps=steps))


def validated(training_demo, snapshot_dir, *extra):
    return run(training_demo, snapshot_dir, "--val-every", "2", "--val-list", training_demo.val_list, *extra)


def rows(snapshot_dir):
    with open(snapshot_dir / "logs" / "train_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_weights(expected: dict, got: dict):
    assert expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key


@pytest.fixture(scope="module")
def straight(training_demo, tmp_path_factory):
    """4 validated iterations straight (validation after 2 and 4, snapshots after 2 and 4)."""
    folder = tmp_path_factory.mktemp("straight")
    assert validated(training_demo, folder) == 0
    return folder


def test_val_every_writes_the_val_rows_and_the_best_snapshot(straight, training_demo, tmp_path):
    log = rows(straight)
    assert list(log[0]) == ["iteration", "loss", "lr", "elapsed_s", "seg", "dsn", *VAL_COLUMNS]
    assert [row["iteration"] for row in log] == ["1", "2", "3", "4"]
    for row in log:
        validated_here = row["iteration"] in ("2", "4")
        assert all(bool(row[name]) == validated_here for name in VAL_COLUMNS), row
        assert row["loss"]
    scores = [float(log[1]["val_miou"]), float(log[3]["val_miou"])]
    assert all(0.0 <= score <= 1.0 for score in scores)
    events = EventAccumulator(str(straight / "logs"))
    events.Reload()
    assert {"val/miou", "val/pixel_acc", "val/mean_acc", "train/loss"} <= set(events.Tags()["scalars"])
    assert [(event.step, pytest.approx(event.value)) for event in events.Scalars("val/miou")] == \
        [(2, scores[0]), (4, scores[1])]
    assert sorted(path.name for path in straight.glob("*.pth")) == ["CS_scenes_2.pth", "CS_scenes_4.pth",
                                                                     "CS_scenes_best.pth"]
    assert [path.name for path in snapshots_in(straight)] == ["CS_scenes_2.pth", "CS_scenes_4.pth"]
    best = load_checkpoint(best_snapshot_path(straight))  # finite, checksum verified
    best_iteration = 4 if scores[1] > scores[0] else 2
    assert best["iteration"] == best_iteration
    assert best["validation"] == {"best_miou": max(scores), "best_iteration": best_iteration}
    assert_same_weights(load_checkpoint(straight / f"CS_scenes_{best_iteration}.pth"), best)
    # validation draws no random number of the training: the same weights as without it
    plain = tmp_path / "plain"
    assert run(training_demo, plain) == 0
    assert_same_weights(load_checkpoint(plain / "CS_scenes_4.pth"), load_checkpoint(straight / "CS_scenes_4.pth"))
    assert "validation" not in load_checkpoint(plain / "CS_scenes_4.pth")


def test_val_every_resumes_exactly(straight, training_demo, tmp_path):
    """2 + 2 iterations (the resumed part with workers) == 4 straight: weights, the best score and its snapshot."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "CS_scenes_2.pth", resumed)
    shutil.copy(straight / "CS_scenes_2.pth", best_snapshot_path(resumed))  # what the interrupted run had written
    assert validated(training_demo, resumed, "--resume", str(resumed / "CS_scenes_2.pth"), "--num-workers", "2") == 0
    expected, got = load_checkpoint(straight / "CS_scenes_4.pth"), load_checkpoint(resumed / "CS_scenes_4.pth")
    assert_same_weights(expected, got)
    assert got["validation"] == expected["validation"]
    expected_best = load_checkpoint(best_snapshot_path(straight))
    got_best = load_checkpoint(best_snapshot_path(resumed))
    assert got_best["iteration"] == expected_best["iteration"]
    assert_same_weights(expected_best, got_best)
    assert [{name: row[name] for name in ("loss", *VAL_COLUMNS)} for row in rows(resumed)] == \
        [{name: row[name] for name in ("loss", *VAL_COLUMNS)} for row in rows(straight)[2:]]


def test_resume_restores_the_best_score(straight, training_demo, tmp_path):
    """A snapshot whose best score so far (100 %) cannot be beaten: the resumed run writes no best snapshot."""
    resumed = tmp_path / "resumed"
    snapshot = load_checkpoint(straight / "CS_scenes_2.pth")
    snapshot.pop(CHECKSUM_KEY)
    snapshot["validation"] = {"best_miou": 1.0, "best_iteration": 2}
    save_checkpoint(snapshot, resumed / "CS_scenes_2.pth")
    assert validated(training_demo, resumed, "--resume", str(resumed / "CS_scenes_2.pth")) == 0
    assert not (resumed / "CS_scenes_best.pth").exists()
    assert load_checkpoint(resumed / "CS_scenes_4.pth")["validation"] == {"best_miou": 1.0, "best_iteration": 2}


def test_a_bad_val_list_is_one_line_before_the_first_step(training_demo, tmp_path, failed_run, capsys):
    missing = tmp_path / "missing.lst"
    message = failed_run(train.main, training_demo.training_argv(tmp_path / "a", "--val-every", "2", "--val-list",
                                                                 str(missing)))
    assert str(missing) in message
    broken = tmp_path / "broken.lst"
    broken.write_text("leftImg8bit/val/nowhere.png\tgtFine/val/nowhere.png\n")
    message = failed_run(train.main, training_demo.training_argv(tmp_path / "b", "--val-every", "2", "--val-list",
                                                                 str(broken)))
    assert "nowhere.png" in message and "line 1" in message
    image_only = tmp_path / "image_only.lst"
    image_only.write_text("".join(line.split("\t")[0] + "\n" for line in open(training_demo.val_list)))
    message = failed_run(train.main, training_demo.training_argv(tmp_path / "c", "--val-every", "2", "--val-list",
                                                                 str(image_only)))
    assert message.startswith(f"--val-list {image_only}") and "no labels" in message
    for folder in ("a", "b", "c"):  # nothing trained, nothing logged
        assert not list((tmp_path / folder).glob("*.pth"))
        assert not (tmp_path / folder / "logs" / "train_log.csv").exists()
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(training_demo.training_argv(tmp_path / "e", "--val-list", str(broken)))
    assert exit_info.value.code == EXIT_USAGE and "without --val-every" in capsys.readouterr().err
    assert train.parse_args(training_demo.training_argv(tmp_path / "d", "--val-every", "5")).val_list.endswith(
        "dataset/list/cityscapes/val.lst")


def test_the_best_snapshot_is_a_run_file_but_no_iteration_snapshot(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"args": {"run_id": "another"}}, best_snapshot_path(folder))
    assert snapshots_in(folder) == []
    with pytest.raises(TrainingError, match="CS_scenes_best.pth: choose another --snapshot-dir") as error:
        refuse_or_clear_earlier_run(str(folder), str(folder / "logs"), overwrite=False, log=print)
    assert "--resume" not in str(error.value)
    with pytest.raises(TrainingError, match="another run"):  # a --resume of run "mine" into it
        refuse_another_runs_folders(str(folder), str(folder / "logs"), "x.pth", "mine")
    (folder / "CS_scenes_6.pth").write_bytes(b"")
    with pytest.raises(TrainingError, match=r"snapshots \(2, the last .*CS_scenes_6.pth\): pass --resume"):
        refuse_or_clear_earlier_run(str(folder), str(folder / "logs"), overwrite=False, log=print)
    refuse_or_clear_earlier_run(str(folder), str(folder / "logs"), overwrite=True, log=print)
    assert list(folder.glob("*.pth")) == []


def test_a_skipped_iteration_keeps_its_validation_row(tmp_path):
    logger = TrainingLogger(str(tmp_path), total_steps=3, validation_names=("miou",))
    logger.skip("no valid pixel", 1, {"miou": 0.25})  # no header yet: TensorBoard only
    logger.log(2, loss=1.5, lr=0.01, terms={"seg": 1.0})
    logger.skip("no valid pixel", 3, {"miou": 0.5})
    logger.close()
    with open(tmp_path / "train_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert list(log[0]) == ["iteration", "loss", "lr", "elapsed_s", "seg", "val_miou"]
    assert [(row["iteration"], row["loss"], row["val_miou"]) for row in log] == [("2", "1.5", ""), ("3", "", "0.5")]


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("with_validation", [False, True])
def test_plot_log_writes_the_curves(tmp_path, with_validation, capsys):
    header = ["iteration", "loss", "lr", "elapsed_s", "seg", "dsn"] + (VAL_COLUMNS if with_validation else [])
    log = tmp_path / "train_log.csv"
    with open(log, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for iteration in range(1, 21):
            validation = [0.01 * iteration] * 3 if iteration % 5 == 0 else ["", "", ""]
            writer.writerow([iteration, 3 / iteration, 0.01 * (1 - iteration / 20) ** 0.9, iteration, 2 / iteration,
                             1 / iteration] + (validation if with_validation else []))
    assert plot_log.main([str(log)]) == 0
    panels = 3 if with_validation else 2
    assert png_size(tmp_path / "train_log.png") == (plot_log.WIDTH_PX, panels * plot_log.PANEL_HEIGHT_PX)
    assert (tmp_path / "train_log.png").stat().st_size > 10_000
    assert plot_log.main([str(log), "--output", str(tmp_path / "curves.png")]) == 0
    assert png_size(tmp_path / "curves.png") == (plot_log.WIDTH_PX, panels * plot_log.PANEL_HEIGHT_PX)
    assert not math.isnan(plot_log.read_log(str(log))["loss"][0])


def test_plot_log_refuses_what_it_cannot_plot(tmp_path, failed_run):
    not_a_log = tmp_path / "other.csv"
    not_a_log.write_text("a,b\n1,2\n")
    assert "not a training log" in failed_run(plot_log.main, [str(not_a_log)])
    empty = tmp_path / "train_log.csv"
    empty.write_text("iteration,loss,lr,elapsed_s\n")
    assert "no rows to plot" in failed_run(plot_log.main, [str(empty)])
    assert "cannot be read" in failed_run(plot_log.main, [str(tmp_path / "missing.csv")])
    empty.write_text("iteration,loss,lr,elapsed_s\n1,2.0,0.01,1\n")
    text = tmp_path / "notes.png"
    text.write_text("my notes")
    assert "notes.png" in failed_run(plot_log.main, [str(empty), "--output", str(text)])
    assert text.read_text() == "my notes"
