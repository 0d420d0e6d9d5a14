"""train.py --ccl 1 (the category consistent loss) in-process on the generated dataset with the tiny backbone: the
loss terms in the CSV log, the flags saved and diffed on resume, the snapshot evaluated like any other; and the CSV
log's columns when a run of another version (other terms) is resumed."""
import csv
import json

import pytest

import evaluate
import train
from utils.checkpoint import load_checkpoint
from utils.cli import EXIT_USAGE
from utils.logger import TrainingLogger, _truncate_csv

TERMS = ["seg", "dsn", "ccl_var", "ccl_dis", "ccl_reg"]


def csv_rows(log_dir):
    with open(log_dir / "train_log.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_ccl_training_logs_its_terms_and_evaluates_like_any_snapshot(training_demo, tmp_path, capsys):
    argv = training_demo.training_argv(tmp_path, "--ccl", "1", "--ccl-dim", "8", "--save-pred-every", "2", steps=3)
    assert train.main(argv) == 0
    columns, rows = csv_rows(tmp_path / "logs")
    assert columns == ["iteration", "loss", "lr", "elapsed_s", *TERMS] and len(rows) == 3
    for row in rows:
        values = {name: float(row[name]) for name in ["loss", *TERMS]}
        assert values["ccl_var"] > 0 and values["ccl_dis"] >= 0 and values["ccl_reg"] > 0
        # the total is the weighted sum of the terms (the default weights 1, 1, 0.001; the DSN head's 0.4)
        expected = (values["seg"] + 0.4 * values["dsn"] + values["ccl_var"] + values["ccl_dis"]
                    + 0.001 * values["ccl_reg"])
        assert values["loss"] == pytest.approx(expected, rel=1e-5)
    snapshot = load_checkpoint(tmp_path / "CS_scenes_3.pth")
    assert snapshot["model"]["ccl_projection.weight"].shape[0] == 8
    assert (snapshot["args"]["ccl"], snapshot["args"]["ccl_margins"], snapshot["args"]["ccl_weights"]) == \
        (True, (0.5, 1.5), (1.0, 1.0, 0.001))

    # resumed with another margin: a warning naming the flag; the log goes on under its columns
    capsys.readouterr()
    assert train.main(argv[:-2] + ["--num-steps", "4", "--resume", str(tmp_path / "CS_scenes_2.pth"),
                                   "--ccl-margins", "0.4,1.5"]) == 0
    assert "--ccl-margins (0.5, 1.5) -> (0.4, 1.5)" in capsys.readouterr().err
    columns, rows = csv_rows(tmp_path / "logs")
    assert [row["iteration"] for row in rows] == ["1", "2", "3", "4"] and all(row["ccl_var"] for row in rows)

    # the snapshot evaluates as any other (the projection is not built for inference)
    assert evaluate.main(["--data-dir", training_demo.root, "--data-list", training_demo.val_list, "--restore-from",
                          str(tmp_path / "CS_scenes_4.pth"), "--gpu", "cpu", "--whole", "--num-workers", "0"]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mean_iou"] is not None


def test_a_plain_run_logs_seg_and_dsn(training_demo, tmp_path):
    assert train.main(training_demo.training_argv(tmp_path, steps=1)) == 0
    columns, rows = csv_rows(tmp_path / "logs")
    assert columns == ["iteration", "loss", "lr", "elapsed_s", "seg", "dsn"]
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["seg"]) + 0.4 * float(rows[0]["dsn"]), rel=1e-5)


@pytest.mark.parametrize("flag, value, message", [
    ("--ccl-margins", "1.5,0.5", "--ccl-margins 1.5,0.5: delta_v must be below delta_d"),
    ("--ccl-margins", "0.5", "--ccl-margins: expected 2 comma-separated numbers >= 0, got '0.5'"),
    ("--ccl-weights", "1,1,nan", "--ccl-weights: expected 3 comma-separated numbers >= 0, got '1,1,nan'"),
    ("--ccl", "maybe", "--ccl: expected 0/1"),
])
def test_bad_ccl_flags_are_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([flag, value])
    assert exit_info.value.code == EXIT_USAGE and message in capsys.readouterr().err


def test_a_resumed_log_keeps_its_columns(tmp_path, capsys):
    """The CSV of a run without the loss terms, resumed by one with them: its header stays, the terms go to
    TensorBoard only (one warning); the other way round, the columns this run lacks stay empty, and such rows survive
    the truncation of a later resume."""
    (tmp_path / "train_log.csv").write_text("iteration,loss,lr,elapsed_s\n1,2.5,0.01,0.1\n2,2.4,0.01,0.2\n")
    logger = TrainingLogger(str(tmp_path), total_steps=3, start_step=2)
    logger.log(3, loss=2.3, lr=0.01, terms={"seg": 2.0, "dsn": 0.75})
    logger.close()
    assert (tmp_path / "train_log.csv").read_text().splitlines()[-1].startswith("3,2.3,0.01,")
    assert "lack seg, dsn: those values go to TensorBoard only" in capsys.readouterr().out

    (tmp_path / "train_log.csv").write_text("iteration,loss,lr,elapsed_s,seg,dsn,ccl_var\n1,2.5,0.01,0.1,2,1,0.5\n")
    logger = TrainingLogger(str(tmp_path), total_steps=2, start_step=1)
    logger.log(2, loss=2.4, lr=0.01, terms={"seg": 1.9, "dsn": 0.9})
    logger.close()
    _truncate_csv(str(tmp_path / "train_log.csv"), 2)
    columns, rows = csv_rows(tmp_path)
    assert [row["iteration"] for row in rows] == ["1", "2"] and rows[1]["ccl_var"] == "" and rows[1]["seg"] == "1.9"
