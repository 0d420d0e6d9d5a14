"""What the tools never lose, by cause: each class of fault injected into evaluate.py, predict.py,
visualize_attention.py, export_onnx.py and train.py -- an output that is an input under another name (a hard link),
a checkpoint as an output, a full disk or a read-only folder (mocked: the tests may run as root, whom chmod does not
stop), a poisoned or damaged checkpoint, sizes whose tensors cannot fit, a damaged image, two runs in one folder, bad
flags -- and the one line that reports it checked, and that no input changed."""
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import evaluate
import export_onnx
import predict
import train
import visualize_attention
from dataset.segmentation import DataError, read_image_file, read_list
from networks import build_model
from utils import outputs
from utils.checkpoint import (CHECKSUM_KEY, CheckpointError, FolderLock, load_checkpoint, load_model_weights,
                              save_checkpoint)
from utils.cli import EXIT_USAGE, path_problem
from utils.logger import TrainingLogger

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """One of our snapshots (tiny model), with its tensor checksum."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("snap") / "CS_scenes_10.pth"
    save_checkpoint({"model": build_model(backbone="tiny", norm="bn").state_dict(), "iteration": 10,
                     "args": {"backbone": "tiny"}}, path)
    return str(path)


@pytest.fixture
def data(demo_data, tmp_path):
    """A copy (the tests change files) of 3 generated val scenes, 32x64: ``(root, val list)``."""
    demo = demo_data(num_train=0, num_val=3, height=32, width=64, seed=3)
    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    return root, root / os.path.basename(demo.val_list)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "images" / "photo.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    return path


def _evaluate_args(snapshot, root, data_list, *extra):
    return ["--data-dir", str(root), "--data-list", str(data_list), "--restore-from", snapshot, "--whole",
            "--num-workers", "0", "--gpu", "cpu", *extra]


def _predict_args(snapshot, output, *inputs):
    return ["--restore-from", snapshot, "--gpu", "cpu", "--whole", "--output", str(output), *map(str, inputs)]


def _visualize_args(snapshot, output, image, *extra):
    return ["--restore-from", snapshot, "--gpu", "cpu", "--point", "0,0", "--output", str(output), str(image),
            *extra]


def _bytes(path) -> bytes:
    return Path(path).read_bytes()


# ------------------------------------------------------------------ 1. an input under another name: a hard link
def test_a_hard_link_of_an_input_among_the_outputs_is_refused_by_every_tool(snapshot, data, image, tmp_path,
                                                                             failed_run):
    root, data_list = data
    first = read_list(str(root), str(data_list))[0]
    image_bytes, first_bytes = _bytes(image), _bytes(first.image_path)
    save_pred = tmp_path / "save_pred"
    save_pred.mkdir()
    linked = save_pred / (Path(first.name).stem + ".png")
    os.link(first.image_path, linked)  # evaluate would write <stem>.png: the image itself
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(save_pred)))
    assert message == (f"--save-pred {save_pred}: writing {linked} would replace the input {first.image_path} (the "
                       "same file under another name: a hard link); choose another output")
    out = tmp_path / "out"
    out.mkdir()
    os.link(image, out / "photo_overlay.jpg")
    message = failed_run(predict.main, _predict_args(snapshot, out, image))
    assert message.startswith(f"--output {out}: writing {out / 'photo_overlay.jpg'} would replace the input {image} "
                              "(the same file under another name")
    figure = tmp_path / "figure.png"
    os.link(image, figure)
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, figure, image))
    assert message.startswith(f"--output {figure}: writing {figure} would replace the input {image} (the same file")
    onnx_link = tmp_path / "model.onnx"
    os.link(snapshot, onnx_link)
    message = failed_run(export_onnx.main, ["--restore-from", snapshot, "--output", str(onnx_link), "--skip-check"])
    assert message.startswith(f"--output {onnx_link}: writing {onnx_link} would replace the input {snapshot}")
    assert _bytes(image) == image_bytes and _bytes(first.image_path) == first_bytes


# ------------------------------------------------------------------------- 2. a checkpoint is an input too
def test_the_snapshot_is_never_an_output(snapshot, data, image, tmp_path, failed_run):
    root, data_list = data
    snapshot_bytes = _bytes(snapshot)
    folder = tmp_path / "runs"
    folder.mkdir()
    own = folder / "photo.png"  # the tools' own snapshot, under the name of an output
    shutil.copy(snapshot, own)
    message = failed_run(predict.main, ["--restore-from", str(own), "--gpu", "cpu", "--whole", "--backbone", "tiny",
                                        "--output", str(folder), str(image)])
    assert message == f"--output {folder}: writing {own} would replace the input {own}; choose another output"
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, snapshot, image))
    assert message == f"--output {snapshot}: name a .png or .jpg or .jpeg file (this tool writes that kind only)"
    sibling = Path(snapshot).parent / "CS_scenes_25.pth"
    shutil.copy(snapshot, sibling)
    message = failed_run(export_onnx.main, ["--restore-from", snapshot, "--output", str(sibling), "--skip-check"])
    assert message == f"--output {sibling}: name a .onnx file (this tool writes that kind only)"
    renamed = tmp_path / "old.onnx"  # a checkpoint under an ONNX name is still a checkpoint
    shutil.copy(snapshot, renamed)
    message = failed_run(export_onnx.main, ["--restore-from", snapshot, "--output", str(renamed), "--skip-check"])
    assert message == f"--output {renamed}: {renamed} is a checkpoint, never an output of this tool; choose " \
                      "another output"
    result_link = tmp_path / "scores"
    result_link.mkdir()
    os.link(snapshot, result_link / "result.json")
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(result_link)))
    assert message.startswith(f"--save-pred {result_link}: writing {result_link / 'result.json'} would replace the "
                              f"input {snapshot}")
    assert _bytes(snapshot) == snapshot_bytes and _bytes(own) == snapshot_bytes and _bytes(renamed) == snapshot_bytes
    notes = Path(snapshot).parent / "result.json"  # beside the snapshot, not a result of ours: checked first
    notes.write_text("my notes")
    try:
        message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list))
        assert message == f"result.json {notes}: {notes} exists and is not a .json file this tool writes; it is not " \
                          "replaced: move it or choose another output"
        assert notes.read_text() == "my notes"
    finally:
        notes.unlink()


def test_a_file_of_another_kind_is_never_replaced(snapshot, image, tmp_path, failed_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo_overlay.jpg").write_text("my notes")
    message = failed_run(predict.main, _predict_args(snapshot, out, image))
    assert message == f"--output {out}: {out / 'photo_overlay.jpg'} exists and is not a .jpg file this tool writes; " \
                      "it is not replaced: move it or choose another output"
    assert (out / "photo_overlay.jpg").read_text() == "my notes"
    (out / "photo_overlay.jpg").unlink()
    assert predict.main(_predict_args(snapshot, out, image)) == 0
    assert predict.main(_predict_args(snapshot, out, image)) == 0  # its own outputs: replaced


# ---------------------------------------------------------------- 4. full disks and read-only folders (mocked)
def _failing_mkstemp(monkeypatch, error_number, folder=None):
    """``tempfile.mkstemp`` of utils.outputs fails with ``error_number`` (in ``folder`` only, if given)."""
    real = outputs.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if folder is None or os.path.abspath(dir) == os.path.abspath(folder):
            raise OSError(error_number, os.strerror(error_number))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(snapshot, image, tmp_path, monkeypatch,
                                                                           failed_run):
    out = tmp_path / "out"
    real_replace = outputs.os.replace

    def full_disk(source, target):  # the file was written, then the disk is full: the partial file must go
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "replace", full_disk)
    message = failed_run(predict.main, _predict_args(snapshot, out, image))
    assert message == f"{out / 'photo.png'}: not written: no space left on device"
    assert sorted(os.listdir(out)) == [".lock"]  # no partial file, no 0-byte PNG
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    monkeypatch.setattr(predict.cv2, "imwrite", lambda *args: False)  # OpenCV reports a failed write only so
    message = failed_run(predict.main, _predict_args(snapshot, out, image))
    assert message == (f"{out / 'photo_overlay.jpg'}: not written: the image encoder reported a failure (a full "
                       "disk, or a format it cannot write)")
    assert sorted(os.listdir(out)) == [".lock", "photo.png"]


def test_visualize_reports_no_figure_when_the_encoder_fails(snapshot, image, tmp_path, monkeypatch, failed_run,
                                                            capsys):
    monkeypatch.setattr(visualize_attention.cv2, "imwrite", lambda *args: False)
    figure = tmp_path / "figure.png"
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, figure, image))
    assert message.startswith(f"{figure}: not written: the image encoder reported a failure")
    assert not figure.exists() and os.listdir(tmp_path) == ["images"]


def test_a_read_only_output_folder_is_one_line(snapshot, data, tmp_path, monkeypatch, failed_run):
    root, data_list = data
    save_pred = tmp_path / "save_pred"
    _failing_mkstemp(monkeypatch, errno.EROFS)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(save_pred)))
    first = read_list(str(root), str(data_list))[0]
    assert message == f"{save_pred / (Path(first.name).stem + '.png')}: not written: read-only file system"


def test_a_read_only_output_folder_is_refused_before_any_work(snapshot, image, tmp_path, monkeypatch, failed_run):
    """A read-only file system (mocked: os.access and statvfs say so for one folder) is found before the model."""
    read_only = tmp_path / "mounted"
    read_only.mkdir()
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False if os.path.abspath(path) == str(read_only)
                        else real_access(path, mode))
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: type("Status", (), {"f_flag": os.ST_RDONLY})()
                        if os.path.abspath(path) == str(read_only) else real_statvfs(path))
    monkeypatch.setattr(predict, "load_snapshot", lambda *args: pytest.fail("the snapshot was read"))
    monkeypatch.setattr(visualize_attention, "load_snapshot", lambda *args: pytest.fail("the snapshot was read"))
    message = failed_run(predict.main, _predict_args(snapshot, read_only / "predictions", image))
    assert message == f"--output {read_only / 'predictions'}: {read_only} cannot be written (read-only file system)"
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, read_only / "figure.png", image))
    assert message == f"--output {read_only / 'figure.png'}: {read_only} cannot be written (read-only file system)"
    assert os.listdir(read_only) == []


def test_result_json_beside_a_read_only_snapshot_goes_to_the_current_folder(snapshot, data, tmp_path, monkeypatch,
                                                                            capsys):
    root, data_list = data
    _failing_mkstemp(monkeypatch, errno.EROFS, folder=os.path.dirname(snapshot))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    capsys.readouterr()
    assert evaluate.main(_evaluate_args(snapshot, root, data_list)) == 0
    captured = capsys.readouterr()
    assert f"warning: {os.path.dirname(snapshot)} cannot be written (read-only): result.json goes to the current " \
           "folder instead" in captured.err
    assert f"result: {here / 'result.json'}" in captured.out
    result = json.loads((here / "result.json").read_text())
    assert result["snapshot"] == snapshot
    assert result["snapshot_checksum"] == load_checkpoint(snapshot)[CHECKSUM_KEY]


def test_a_failing_tensorboard_writer_stops_its_log_not_the_training(tmp_path, capsys, monkeypatch):
    """The event writer's thread hits a full disk: one warning line (no thread traceback), the CSV goes on."""
    from tensorboard.summary.writer import record_writer

    logger = TrainingLogger(str(tmp_path), total_steps=4)
    logger.log(1, loss=2.5, lr=0.01)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    for iteration in (2, 3, 4):
        time.sleep(0.2)  # the writer thread fails meanwhile
        logger.log(iteration, loss=2.0, lr=0.01)
    logger.close()
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() + captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {tmp_path}: TensorBoard events from iteration ")
    assert warnings[0].endswith("not written (No space left on device); training goes on")
    assert "Traceback" not in captured.err
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["iteration", "1", "2", "3", "4"]


def test_an_unwritable_log_dir_does_not_stop_the_logger(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("utils.logger.os.makedirs", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))))
    logger = TrainingLogger(str(tmp_path / "logs"), total_steps=2)
    logger.log(1, loss=1.0, lr=0.1)
    logger.close()
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'logs'}: TensorBoard events from iteration 1 on not written (Read-only file " \
           "system); training goes on" in out
    assert f"warning: {tmp_path / 'logs' / 'train_log.csv'}: rows from iteration 1 on not written" in out


# ------------------------------------------------------------------------ 5. poisoned and damaged checkpoints
def _flip_bytes_of_first_tensor(path, count: int = 64):
    """Invert ``count`` bytes in the middle of the first tensor's data inside the snapshot's zip archive."""
    with zipfile.ZipFile(path) as archive:
        entry = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > count)
    raw = bytearray(Path(path).read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2 - count // 2
    raw[start:start + count] = bytes(value ^ 0xFF for value in raw[start:start + count])
    Path(path).write_bytes(raw)


def test_flipped_bytes_in_a_snapshot_are_refused_by_every_loader(snapshot, tmp_path, failed_run, image):
    damaged = tmp_path / "damaged.pth"
    shutil.copy(snapshot, damaged)
    _flip_bytes_of_first_tensor(damaged)
    expected = f"checkpoint {damaged}: its tensors do not match the checksum written with them: the file was " \
               "damaged or altered after it was saved"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(damaged)
    assert str(error.value) == expected
    message = failed_run(predict.main, ["--restore-from", str(damaged), "--gpu", "cpu", "--output",
                                        str(tmp_path / "out"), str(image)])
    assert message == expected
    message = failed_run(export_onnx.main, ["--restore-from", str(damaged), "--output", str(tmp_path / "m.onnx")])
    assert message == expected


@pytest.mark.parametrize("poison", ["optimizer_nan", "scaler_inf", "negative_running_var", "sparse"])
def test_every_tensor_of_a_checkpoint_is_checked(tmp_path, poison):
    state = build_model(backbone="tiny", norm="bn").state_dict()
    snapshot = {"model": state, "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": []},
                "scaler": {"scale": torch.tensor(1024.0)}, "iteration": 1}
    if poison == "optimizer_nan":
        snapshot["optimizer"]["state"][0]["momentum_buffer"][1] = float("nan")
        expected = "1 tensor(s) hold NaN or infinite values (optimizer.state.0.momentum_buffer)"
    elif poison == "scaler_inf":
        snapshot["scaler"]["scale"] = torch.tensor(float("inf"))
        expected = "1 tensor(s) hold NaN or infinite values (scaler.scale)"
    elif poison == "negative_running_var":
        state["layer1.0.bn1.running_var"][0] = -1.0
        expected = "1 BatchNorm variance(s) below zero (model.layer1.0.bn1.running_var)"
    else:
        snapshot["extra"] = torch.eye(2).to_sparse()
        expected = "1 sparse tensor(s) (extra): a snapshot holds dense tensors only"
    path = tmp_path / "poisoned.pth"
    torch.save(snapshot, path)  # as an older or foreign writer would: no checksum
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"checkpoint {path}: {expected}")


def test_the_load_summary_says_whether_a_checksum_was_verified(snapshot, tmp_path):
    model = build_model(backbone="tiny", norm="bn")
    assert load_model_weights(model, snapshot).summary().endswith("; tensor checksum verified")
    released = tmp_path / "CS_scenes_60000.pth"  # the original's format: a raw state dict, no checksum
    torch.save({f"module.{key}": value for key, value in model.state_dict().items()}, released)
    older = tmp_path / "older.pth"  # one of ours from before checksums
    torch.save({"model": model.state_dict(), "iteration": 3}, older)
    for path in (released, older):
        assert load_model_weights(model, str(path)).summary().endswith(
            "; no tensor checksum (a released checkpoint, or a snapshot older than checksums): its bytes are not "
            "verified")


def test_resume_refuses_a_nan_optimizer_buffer_and_a_hand_edited_rng(training_demo, tmp_path, failed_run):
    first = tmp_path / "first"
    assert train.main(training_demo.training_argv(first, steps=1)) == 0
    good = load_checkpoint(first / "CS_scenes_1.pth")
    poisoned = dict(good, optimizer={**good["optimizer"], "state": {
        key: {name: torch.full_like(value, float("nan")) if torch.is_tensor(value) and value.is_floating_point()
              else value for name, value in state.items()} for key, state in good["optimizer"]["state"].items()}})
    save_checkpoint(poisoned, tmp_path / "nan.pth")
    message = failed_run(train.main, training_demo.training_argv(tmp_path / "a", "--resume", str(tmp_path / "nan.pth"),
                                                                  steps=2))
    assert message.startswith(f"checkpoint {tmp_path / 'nan.pth'}: ") and "optimizer.state." in message
    edited = dict(good, rng={"world_size": 1, "ranks": []})
    save_checkpoint(edited, tmp_path / "rng.pth")
    message = failed_run(train.main, training_demo.training_argv(tmp_path / "b", "--resume", str(tmp_path / "rng.pth"),
                                                                  steps=2))
    assert message == f"--resume {tmp_path / 'rng.pth'}: its 'rng' entry is not the random states train.py saves " \
                      "({'world_size', 'ranks'}): process 0's state is missing or incomplete"


# ------------------------------------------------------------------------------------------ 6. unbounded work
def test_sizes_whose_tensors_cannot_fit_are_refused_before_any_allocation(snapshot, data, image, tmp_path,
                                                                          failed_run, capsys, training_demo):
    root, data_list = data
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--no-whole", "--input-size",
                                                       "100000,100000"))
    assert message == ("--input-size 100000,100000: 100000x100000 pixels = 1e+10, more than --max-pixels 33554432 in "
                       "one forward pass: its tensors would not fit in memory (raise --max-pixels if this machine "
                       "holds them)")
    message = failed_run(predict.main, _predict_args(snapshot, tmp_path / "out", image) + ["--scales", "1,1e9"])
    assert message.startswith(f"{image}: --scales 1e+09: 24000000000x40000000000 pixels = 9.6e+20, more than "
                              "--max-pixels")
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, tmp_path / "a.png", image,
                                                                   "--scale", "1000"))
    assert message.startswith(f"{image}: --scale 1000: 24000x40000 pixels = 9.6e+08, more than --max-pixels 16777216")
    message = failed_run(export_onnx.main, ["--restore-from", snapshot, "--output", str(tmp_path / "m.onnx"),
                                            "--input-size", "100000,100000"])
    assert message.startswith("--input-size 100000,100000: 100000x100000 pixels = 1e+10, more than --max-pixels")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        train.main(training_demo.training_argv(tmp_path / "t", "--input-size", "100000,100000"))
    assert exit_code.value.code == EXIT_USAGE
    assert "error: --input-size 100000,100000: 100000x100000 pixels = 1e+10, more than --max-pixels" in \
           capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == [".lock"] and not (tmp_path / "m.onnx").exists()  # nothing written


# ------------------------------------------------------------------------------------- 8. silent bad data
def test_a_truncated_jpeg_is_an_error_naming_the_list_line(data, snapshot, tmp_path, failed_run):
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    lines = data_list.read_text().splitlines()
    jpeg = Path(entries[-1].image_path).with_suffix(".jpg")
    cv2.imwrite(str(jpeg), cv2.imread(entries[-1].image_path))
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])  # the lower half is missing
    name = os.path.relpath(jpeg, root)
    lines[-1] = f"{name}\t{lines[-1].split(chr(9))[1]}"
    data_list.write_text("\n".join(lines) + "\n")
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list))
    assert message == (f"{data_list} line {len(lines)}: image {jpeg} is damaged: the decoder says 'Premature end of "
                       "JPEG file'")


def test_a_png_with_a_broken_colour_profile_is_read_a_corrupt_one_is_not(tmp_path):
    """libpng warns about both; only damage to what carries the pixels is an error."""
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = tmp_path / "profile.png"
    Image.fromarray(pixels).save(path, icc_profile=b"not a profile")  # libpng: "iCCP: too short"
    assert np.array_equal(read_image_file(str(path))[..., ::-1], pixels)
    raw = bytearray(path.read_bytes())
    header = raw.index(b"IDAT")
    raw[header + 6] ^= 0xFF  # a byte of the compressed pixels: the chunk's CRC no longer matches
    path.write_bytes(raw)
    with pytest.raises(DataError) as error:
        read_image_file(str(path))
    assert str(error.value).startswith(f"image {path} is damaged: the decoder says 'libpng error: IDAT: ")


# ---------------------------------------------------------------------------- 9. two runs, one output folder
def test_an_output_folder_in_use_by_another_run_is_refused(snapshot, data, image, tmp_path, failed_run):
    root, data_list = data
    folder = tmp_path / "shared"
    lock = FolderLock(folder)  # another run writing there
    try:
        message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(folder)))
        assert message == f"--save-pred {folder} is in use by another run ({folder / '.lock'} is held by process " \
                          f"{os.getpid()}): wait for it to end, or choose another folder"
        message = failed_run(predict.main, _predict_args(snapshot, folder, image))
        assert message.startswith(f"--output {folder} is in use by another run")
    finally:
        lock.release()
    assert sorted(os.listdir(folder)) == [".lock"]
    killed_mid_write = folder / ".photo.png.ab12_XYZ.partial.png"  # what a SIGKILL during atomic_output leaves
    killed_mid_write.write_bytes(b"\x89PNG half")
    notes = folder / ".notes.partial"  # not of that form: not ours
    notes.write_text("keep")
    assert predict.main(_predict_args(snapshot, folder, image)) == 0
    assert sorted(os.listdir(folder)) == [".lock", ".notes.partial", "photo.png", "photo_overlay.jpg"]


# ------------------------------------------------------------------------------------------------ 10. wording
@pytest.mark.parametrize("script, argv, flag", [
    (predict, ["--restore-from", "s.pth", "--output", "", "x.png"], "--output"),
    (evaluate, ["--restore-from", "s.pth", "--save-pred", ""], "--save-pred"),
    (visualize_attention, ["--restore-from", "s.pth", "--point", "0,0", "--output", "", "x.png"], "--output"),
    (export_onnx, ["--restore-from", "", "--output", "m.onnx"], "--restore-from"),
    (train, ["--random-seed", "-1"], "--random-seed"),
    (train, ["--momentum", "nan"], "--momentum"),
    (train, ["--power", "nan"], "--power"),
    (train, ["--weight-decay", "inf"], "--weight-decay"),
    (predict, ["--restore-from", "s.pth", "--scales", "1,inf", "x.png"], "--scales"),
])
def test_bad_flag_values_name_the_flag(script, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_code:
        script.main(argv)
    assert exit_code.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: argument {flag}: " in err[0]


def test_a_dangling_link_as_output_is_named_as_one(snapshot, image, tmp_path, failed_run):
    link = tmp_path / "predictions"
    link.symlink_to(tmp_path / "gone")
    message = failed_run(predict.main, _predict_args(snapshot, link, image))
    assert message == f"--output {link}: {link} is a symbolic link to the missing {tmp_path / 'gone'}: name an " \
                      "existing folder or a new path"
    figure = tmp_path / "figure.png"
    figure.symlink_to(tmp_path / "elsewhere.png")
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, figure, image))
    assert message == f"--output {figure}: {figure} is a symbolic link to the missing {tmp_path / 'elsewhere.png'}: " \
                      "writing would create that file; remove the link or choose another output"
    assert not (tmp_path / "gone").exists() and not (tmp_path / "elsewhere.png").exists()


def test_visualize_refuses_an_output_without_an_image_suffix_before_the_computation(snapshot, image, tmp_path,
                                                                                    failed_run, monkeypatch):
    monkeypatch.setattr(visualize_attention, "load_snapshot", lambda *args: pytest.fail("the model was loaded"))
    message = failed_run(visualize_attention.main, _visualize_args(snapshot, tmp_path / "noext", image))
    assert message == f"--output {tmp_path / 'noext'}: name a .png or .jpg or .jpeg file (this tool writes that " \
                      "kind only)"


def test_a_folder_that_cannot_be_entered_is_not_a_missing_file(tmp_path, monkeypatch):
    """Mode 000 (mocked: root enters any folder): its files are hidden, not missing."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("utils.cli.os.access", lambda path, mode: False if os.path.abspath(path) == str(locked)
                        else real_access(path, mode))
    assert path_problem(str(locked / "image.png")) == f"no permission to enter the folder {locked}"
    assert path_problem(str(tmp_path / "absent.png")) == "no such file"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {locked / 's.pth'}: no permission to enter the folder "):
        load_checkpoint(locked / "s.pth")


def test_ade20k_decoding_of_other_labels_names_the_likely_cause(demo_data, tmp_path):
    from dataset.registry import get_dataset
    demo = demo_data(num_train=0, num_val=1, height=32, width=64, seed=3)
    entry = read_list(demo.root, demo.val_list)[0]
    label = tmp_path / "label.png"
    cv2.imwrite(str(label), np.full((32, 64), 255, np.uint8))  # Cityscapes train-id labels: void is 255
    listed = tmp_path / "one.lst"
    listed.write_text(f"{entry.name}\t{label}\n")
    with pytest.raises(DataError, match=r"another dataset's labels\? \(check --dataset\)"):
        get_dataset("ade20k").dataset(demo.root, str(listed), training=False)[0]


# ----------------------------------------------------------------------------------- 7. a stalled rank (slow)
def _child_with_rank(parent: int, rank: int) -> int:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(child)
    raise AssertionError(f"no rank {rank} under process {parent}")


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_with_one_line(training_demo, tmp_path):
    """kill -STOP of rank 1 under torchrun: rank 0 gives up after --collective-timeout (5 s) with one line; torchrun
    then ends the stopped rank (SIGTERM, which a stopped process only takes with SIGKILL, 30 s later)."""
    argv = training_demo.training_argv(tmp_path, "--collective-timeout", "5", "--save-pred-every", "100000",
                                       steps=100000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"), *argv]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    stopped = None
    try:
        log = tmp_path / "logs" / "train_log.csv"
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) > 2):
            time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()[-3000:]
        stopped = _child_with_rank(process.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        started = time.time()
        output, _ = process.communicate(timeout=90)
        seconds = time.time() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    errors = [line for line in output.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("train.py: error: process 0 of 2: a peer process stopped answering (it died, or "
                                "stalled past --collective-timeout 5 s); the run ends here")
    assert process.returncode != 0 and seconds < 60
