"""Faults injected into evaluate.py, predict.py, visualize_attention.py and export_onnx.py: each stops with exit code
1 and one line naming the flag or the file at fault, before any work where it can be known before, and no input is
changed (the checksums of the data folder before and after)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import engine.evaluation
import evaluate
import export_onnx
import predict
import visualize_attention
from dataset.labels import label_ids_to_train_ids
from dataset.segmentation import read_list
from networks import build_model
from utils.checkpoint import save_checkpoint

NUM_VAL = 5


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("snap") / "CS_scenes_10.pth"
    save_checkpoint({"model": build_model(backbone="tiny", norm="bn").state_dict(), "iteration": 10,
                     "args": {"backbone": "tiny"}}, path)
    return str(path)


@pytest.fixture
def data(demo_data, tmp_path):
    """A copy (the tests change files) of 5 generated val scenes, 32x64: ``(root, val list)``."""
    demo = demo_data(num_train=0, num_val=NUM_VAL, height=32, width=64, seed=2)
    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    return root, root / os.path.basename(demo.val_list)


@pytest.fixture
def forward_passes(monkeypatch):
    """How many times evaluate.py (through ``engine.evaluation``) and predict.py ran the model (their
    ``predict_logits`` calls)."""
    calls = []
    for module in (engine.evaluation, predict):
        original = module.predict_logits
        monkeypatch.setattr(module, "predict_logits", lambda *args, _run=original, **kwargs: calls.append(1) or
                            _run(*args, **kwargs))
    return calls


def checksums(folder) -> dict:
    """``{relative path: sha256}`` of every file under ``folder`` (links: of the link's text, not followed)."""
    sums = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            sums[str(path.relative_to(folder))] = "link -> " + os.readlink(path)
        elif path.is_file():
            sums[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def _evaluate_args(snapshot, root, data_list, *extra):
    return ["--data-dir", str(root), "--data-list", str(data_list), "--restore-from", snapshot, "--whole",
            "--num-workers", "0", "--gpu", "cpu", *extra]


def test_save_pred_into_the_image_folder_is_refused(snapshot, data, failed_run, forward_passes):
    root, data_list = data
    before = checksums(root)
    first = read_list(str(root), str(data_list))[0]
    city = os.path.dirname(first.image_path)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", city))
    assert message == f"--save-pred {city}: writing {first.image_path} would replace the input {first.image_path}; " \
                      "choose another output"  # <stem>.png = <city>_..._leftImg8bit.png: the image itself
    assert checksums(root) == before and not forward_passes


def test_two_listed_images_with_one_file_name_are_refused_before_the_first_image(snapshot, data, tmp_path, failed_run,
                                                                                 forward_passes):
    """The same file name in two folders: with --save-pred the second prediction would replace the first."""
    root, data_list = data
    first_line = data_list.read_text().splitlines()[0]
    image, label = first_line.split("\t")
    other_city = root / "leftImg8bit" / "val" / "other"
    other_city.mkdir()
    shutil.copy(root / image, other_city / os.path.basename(image))
    twice = tmp_path / "twice.lst"
    twice.write_text(f"{first_line}\nleftImg8bit/val/other/{os.path.basename(image)}\t{label}\n")
    output = tmp_path / "predictions"
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, twice, "--save-pred", str(output)))
    assert message == (f"--save-pred {output}: the listed images {image} (line 1) and leftImg8bit/val/other/"
                       f"{os.path.basename(image)} (line 2) would both be written to "
                       f"{output / os.path.basename(image)}; give them different file names")
    assert not forward_passes and not output.exists()


def test_save_pred_with_labelids_in_the_label_folder_is_refused(snapshot, data, failed_run, forward_passes):
    """``--save-pred gtFine/val``: labelIds/<stem>.png would go into a folder named labelIds that holds labels."""
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    label_folder = root / "labels" / "labelIds"
    label_folder.mkdir(parents=True)
    lines = []
    for entry in entries:
        shutil.copy(entry.label_path, label_folder / os.path.basename(entry.label_path))
        lines.append(f"{entry.name}\tlabels/labelIds/{os.path.basename(entry.label_path)}\n")
    data_list.write_text("".join(lines))
    before = checksums(root)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(root / "labels")))
    assert message.startswith(f"--save-pred {root / 'labels'}: {label_folder} holds the input {label_folder}")
    assert checksums(root) == before and not forward_passes


def test_save_pred_through_a_link_to_an_input_is_refused(snapshot, data, tmp_path, failed_run, forward_passes):
    root, data_list = data
    first = read_list(str(root), str(data_list))[0]
    out = tmp_path / "out"
    out.mkdir()
    link = out / (os.path.splitext(os.path.basename(first.name))[0] + ".png")
    link.symlink_to(first.image_path)  # writing out/<stem>.png would write through the link into the image
    before = checksums(root)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(out)))
    assert message == f"--save-pred {out}: writing {link} would replace the input {first.image_path}; choose " \
                      "another output"
    assert checksums(root) == before and link.is_symlink() and not forward_passes


def test_save_pred_naming_a_file_is_refused(snapshot, data, tmp_path, failed_run, forward_passes):
    root, data_list = data
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(existing)))
    assert message == f"--save-pred {existing} is a file, not a folder: name a folder for the outputs"
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred",
                                                       str(existing / "sub")))
    assert message == f"--save-pred {existing / 'sub'} is a file (under the file {existing}), not a folder: name a " \
                      "folder for the outputs"
    assert existing.read_text() == "keep me" and not forward_passes


def test_missing_last_listed_file_stops_before_the_first_image(snapshot, data, tmp_path, failed_run, forward_passes):
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    os.remove(entries[-1].label_path)
    before = checksums(root)
    out = tmp_path / "out"
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(out)))
    assert message == f"{data_list} line {NUM_VAL}: file not found: {entries[-1].label_path}"
    assert not forward_passes and not out.exists() and checksums(root) == before
    Path(entries[-1].label_path).write_bytes(b"")  # there, but empty
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--save-pred", str(out)))
    assert message == f"{data_list} line {NUM_VAL}: empty file: {entries[-1].label_path}"
    assert not forward_passes and not out.exists()


def test_scales_that_shrink_an_image_to_nothing_are_one_line(snapshot, data, tmp_path, failed_run):
    root, data_list = data
    first = read_list(str(root), str(data_list))[0]
    before = checksums(root)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list, "--scales", "1.0,0.001"))
    assert message == f"{first.name}: --scales 0.001 resizes its 32x64 pixels to 0x0; choose a scale that leaves " \
                      "every side at least 1 pixel"
    assert checksums(root) == before


def test_an_image_too_small_for_a_scale_is_one_line(snapshot, tmp_path, failed_run):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "dot.png"), np.full((1, 1, 3), 200, np.uint8))
    before = checksums(images)
    args = ["--restore-from", snapshot, "--gpu", "cpu", "--whole", "--output", str(tmp_path / "out"),
            str(images / "dot.png")]
    assert predict.main(args) == 0  # 1x1 itself is fine
    message = failed_run(predict.main, args + ["--scales", "0.75,0.4"])
    assert message == f"{images / 'dot.png'}: --scales 0.4 resizes its 1x1 pixels to 0x0; choose a scale that " \
                      "leaves every side at least 1 pixel"
    message = failed_run(visualize_attention.main, ["--restore-from", snapshot, "--gpu", "cpu", "--point", "0,0",
                                                    "--scale", "0.1", "--output", str(tmp_path / "a.png"),
                                                    str(images / "dot.png")])
    assert message.startswith(f"{images / 'dot.png'}: --scale 0.1 resizes its 1x1 pixels to 0x0")
    assert checksums(images) == before


def test_predict_output_into_the_input_folder_is_refused(snapshot, tmp_path, failed_run, forward_passes):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    before = checksums(images)
    args = ["--restore-from", snapshot, "--gpu", "cpu", "--whole", str(images)]
    message = failed_run(predict.main, args + ["--output", str(images)])
    assert message == f"--output {images}: {images} holds the input {images / 'a.jpg'}; write the outputs to a " \
                      "folder without inputs"
    elsewhere = tmp_path / "elsewhere"  # the same folder through a link
    elsewhere.symlink_to(images)
    message = failed_run(predict.main, args + ["--output", str(elsewhere)])
    assert message.startswith(f"--output {elsewhere}: ") and f"holds the input {images / 'a.jpg'}" in message
    assert checksums(images) == before and not forward_passes


def test_predict_output_naming_a_file_is_refused(snapshot, tmp_path, failed_run, forward_passes):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    existing = tmp_path / "result.png"
    existing.write_bytes(b"not mine to replace")
    message = failed_run(predict.main, ["--restore-from", snapshot, "--gpu", "cpu", "--output", str(existing),
                                        str(image)])
    assert message == f"--output {existing} is a file, not a folder: name a folder for the outputs"
    assert existing.read_bytes() == b"not mine to replace" and not forward_passes


def test_visualize_and_export_refuse_to_write_over_their_input(snapshot, tmp_path, failed_run):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    before = checksums(tmp_path)
    message = failed_run(visualize_attention.main, ["--restore-from", snapshot, "--gpu", "cpu", "--point", "0,0",
                                                    "--output", str(image), str(image)])
    assert message == f"--output {image}: writing {image} would replace the input {image}; choose another output"
    message = failed_run(visualize_attention.main, ["--restore-from", snapshot, "--gpu", "cpu", "--point", "0,0",
                                                    "--output", str(tmp_path), str(image)])
    assert message == f"--output {tmp_path} is a folder: name the file to write"
    message = failed_run(export_onnx.main, ["--restore-from", snapshot, "--output", snapshot, "--skip-check"])
    assert message == f"--output {snapshot}: name a .onnx file (this tool writes that kind only)"
    assert checksums(tmp_path) == before


def test_rgb_label_is_refused_naming_the_file_before_the_first_image(snapshot, data, failed_run, forward_passes):
    """A colour label on the last line: found in the labels' headers when the list is read, before any image."""
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    label = cv2.imread(entries[-1].label_path, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(entries[-1].label_path, cv2.merge([label, label, label]))  # a grey label saved as colour
    before = checksums(root)
    message = failed_run(evaluate.main, _evaluate_args(snapshot, root, data_list))
    assert message == f"{data_list} line {NUM_VAL}: label {entries[-1].label_path} has 3 channels (a colour image?): " \
                      "a label file holds one id per pixel in a single channel, e.g. *_gtFine_labelIds.png, not " \
                      "*_gtFine_color.png"
    assert checksums(root) == before and not forward_passes


def test_train_id_labels_are_counted_across_workers_and_the_first_named(snapshot, data, tmp_path, capsys):
    """Labels holding train ids (0..18, 255) where label ids belong: unknown values (255) in every label. Two
    DataLoader workers read them; the main process counts all 5 and names the first. (The workers' own warning
    lines are not checked here: their stderr is not the captured one; test_data checks the line in one process.)"""
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    for entry in entries:
        cv2.imwrite(entry.label_path, label_ids_to_train_ids(cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)))
    before = checksums(root)
    args = _evaluate_args(snapshot, root, data_list, "--save-pred", str(tmp_path / "out"))
    args[args.index("--num-workers") + 1] = "2"
    capsys.readouterr()
    assert evaluate.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert f"warning: {NUM_VAL} of {NUM_VAL} labels hold values outside the dataset's label table (read as void) " \
           f"(train-id labels? pass the label-id files, *_labelIds.png); the first: {data_list} line 1, " \
           f"{entries[0].label_path}" in warnings
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["label_problems"] == {"unknown_values": NUM_VAL, "no_valid_pixel": 0}
    assert checksums(root) == before


def test_label_without_a_valid_pixel_is_named_and_counted(snapshot, data, tmp_path, capsys):
    root, data_list = data
    entries = read_list(str(root), str(data_list))
    cv2.imwrite(entries[3].label_path, np.zeros((32, 64), np.uint8))  # label id 0: unlabeled, void everywhere
    capsys.readouterr()
    assert evaluate.main(_evaluate_args(snapshot, root, data_list, "--save-pred", str(tmp_path / "out"))) == 0
    err = capsys.readouterr().err
    assert f"warning: {data_list} line 4: label {entries[3].label_path} has no valid pixel: all void, nothing to " \
           "learn or score (further labels like it are counted, not named)" in err
    assert f"warning: 1 of {NUM_VAL} labels have no valid pixel (all void); the first: {data_list} line 4, " \
           f"{entries[3].label_path}" in err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["label_problems"] == {"unknown_values": 0, "no_valid_pixel": 1}
