"""LIP: the label format, the classes and their flip pairs, the defaults, the generated LIP-format set, the list
maker, and the left/right classes through mirroring: in the training augmentation and in the flip averaging of
evaluate.py and predict.py (with the swap, and without it: the left/right classes collapse)."""
import dataclasses
import json
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
import train
from dataset.lip import CLASS_NAMES, FLIP_PAIRS, LIP, PALETTE, annotation_to_train_ids, train_ids_to_annotation
from dataset.make_lists import main as make_lists_main
from dataset.make_lists import make_lists
from dataset.registry import get_dataset
from dataset.segmentation import DataError, read_list
from utils.mirror import mirrored_class_ids

HEIGHT, WIDTH = 64, 48
LEFT_RIGHT = ("left-arm", "right-arm", "left-leg", "right-leg")  # the shoes are a few pixels: too small to score
STEPS = 80


@pytest.fixture(scope="module")
def figures(demo_data):
    return demo_data(num_train=8, num_val=4, height=HEIGHT, width=WIDTH, seed=0, dataset="lip")


def test_mirrored_class_ids_swap_each_pair_and_nothing_else():
    table = mirrored_class_ids(256, FLIP_PAIRS)
    assert table[14:20].tolist() == [15, 14, 17, 16, 19, 18]
    assert table[:14].tolist() == list(range(14)) and table[20:].tolist() == list(range(20, 256))  # void 255 too
    assert np.array_equal(table[table], np.arange(256))  # its own inverse
    assert mirrored_class_ids(5, ()).tolist() == [0, 1, 2, 3, 4]
    for pairs, message in [(((14, 20),), r"flip pair \(14, 20\): ids must be in 0..19"),
                           (((3, 3),), r"flip pair \(3, 3\): each class may be in one pair, with another class"),
                           (((1, 2), (2, 3)), r"flip pair \(2, 3\): each class may be in one pair")]:
        with pytest.raises(ValueError, match=message):
            mirrored_class_ids(20, pairs)
    with pytest.raises(ValueError, match=r"^lip: flip pair \(14, 20\): ids must be in 0..19$"):
        dataclasses.replace(LIP, flip_pairs=((14, 20),))


def test_classes_flip_pairs_palette_and_defaults():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 20 == LIP.num_classes and get_dataset("lip") is LIP
    assert CLASS_NAMES[0] == "background" and CLASS_NAMES[13] == "face"
    for left, right in LIP.flip_pairs:  # every pair is a left and a right of one thing
        assert CLASS_NAMES[left].replace("left-", "right-") == CLASS_NAMES[right]
    assert LIP.flip_pairs == ((14, 15), (16, 17), (18, 19))
    assert get_dataset("cityscapes").flip_pairs == () and get_dataset("ade20k").flip_pairs == ()
    assert PALETTE.shape == (20, 3) and len({tuple(colour) for colour in PALETTE.tolist()}) == 20
    assert PALETTE.sum(axis=1).min() > 0  # black is void
    args = train.parse_args(["--dataset", "lip"])
    assert (args.data_dir, args.input_size, args.batch_size, args.learning_rate, args.weight_decay, args.num_steps,
            args.num_classes) == ("LIP", (473, 473), 40, 7e-3, 5e-4, 115000, 20)
    assert args.data_list.endswith("dataset/list/lip/train.lst")
    assert (LIP.evaluation.input_size, LIP.evaluation.whole) == ((473, 473), True)


def test_annotations_are_train_ids_with_255_void():
    annotation = np.array([[0, 1, 19], [14, 255, 7]], np.uint8)
    train_ids = annotation_to_train_ids(annotation)
    assert train_ids.dtype == np.uint8 and np.array_equal(train_ids, annotation)
    assert np.array_equal(train_ids_to_annotation(train_ids), annotation)
    assert train_ids_to_annotation(np.array([-1, 20, 255])).tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match=r"^holds the value 20 \(2 pixels\); LIP annotations hold 0..19 and 255 "
                                         r"\(void\)$"):
        annotation_to_train_ids(np.array([3, 20, 20, 255], np.uint8))


def test_generated_set_has_the_lip_layout_and_make_lists_finds_it(figures, tmp_path, failed_run):
    entries = read_list(figures.root, figures.val_list)
    assert [entry.name for entry in entries] == [f"TrainVal_images/val_images/{i:06d}_000001.jpg" for i in range(4)]
    for entry in entries:
        assert entry.label_path.endswith(f"TrainVal_parsing_annotations/val_segmentations/"
                                         f"{entry.name.split('/')[-1][:-4]}.png")
        label = cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)
        assert cv2.imread(entry.image_path).shape == (HEIGHT, WIDTH, 3) and label.shape == (HEIGHT, WIDTH)
        assert set(np.unique(label).tolist()) == {0, 2, 5, 9, 13, 14, 15, 16, 17, 18, 19}
        columns = np.arange(WIDTH)[None, :].repeat(HEIGHT, 0)
        for left, right in FLIP_PAIRS:  # the left limb left of the right one in the image
            assert columns[label == left].max() < columns[label == right].min()
    assert make_lists(figures.root, str(tmp_path), "lip") == {"train": 8, "val": 4, "trainval": 12}
    assert (tmp_path / "train.lst").read_text() == open(figures.train_list).read()
    assert (tmp_path / "val.lst").read_text() == open(figures.val_list).read()
    message = failed_run(make_lists_main, [str(tmp_path), "--dataset", "lip", "--out-dir", str(tmp_path / "lists")])
    assert message == f"not a LIP folder (no TrainVal_images/ and TrainVal_parsing_annotations/ inside): {tmp_path}"
    bad_label = tmp_path / "bad.png"
    annotation = cv2.imread(entries[0].label_path, cv2.IMREAD_UNCHANGED)
    annotation[0, :3] = 42
    cv2.imwrite(str(bad_label), annotation)
    bad_list = tmp_path / "bad.lst"
    bad_list.write_text(f"{entries[0].name}\t{bad_label}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad_list))} line 1: label {re.escape(str(bad_label))} "
                                        r"holds the value 42 \(3 pixels\); LIP annotations hold 0..19 and 255 "
                                        r"\(void\)$"):
        LIP.dataset(figures.root, str(bad_list), training=False)[0]


def test_a_mirrored_crop_keeps_the_left_limbs_left(figures):
    """--random-mirror: a mirrored sample's labels are its flipped labels with each flip pair swapped, so the left
    arm (14) is left of the right arm (15) in every sample, mirrored or not."""
    full_image, full_label, _ = LIP.dataset(figures.root, figures.train_list, training=False)[0]
    dataset = LIP.dataset(figures.root, figures.train_list, crop_size=(HEIGHT, WIDTH), mirror=True, training=True)
    swap = torch.from_numpy(mirrored_class_ids(256, FLIP_PAIRS))
    flips = 0
    for epoch in range(8):
        dataset.set_epoch(epoch)
        image, label, _ = dataset[0]
        flipped = not torch.equal(image, full_image)
        flips += flipped
        assert torch.equal(image, full_image.flip(-1) if flipped else full_image)
        assert torch.equal(label, swap[full_label.flip(-1)] if flipped else full_label)
        assert torch.nonzero(label == 14)[:, 1].max() < torch.nonzero(label == 15)[:, 1].min()
    assert 0 < flips < 8


def _train(data, snapshot_dir, *extra):
    """The tiny CCNet trained for STEPS steps on the whole generated images; the snapshot's path."""
    assert train.main(["--dataset", "lip", *data.training_argv(
        snapshot_dir, "--input-size", f"{HEIGHT},{WIDTH}", "--batch-size", "4", "--learning-rate", "5e-2",
        "--save-pred-every", str(STEPS), *extra, steps=STEPS)]) == 0
    return snapshot_dir / f"CS_scenes_{STEPS}.pth"


def _left_right_iou(data, snapshot, output, *extra) -> float:
    """evaluate.py's mean IoU of the left/right arms and legs on the generated val set (predictions to ``output``)."""
    assert evaluate.main(["--data-dir", data.root, "--data-list", data.val_list, "--restore-from", str(snapshot),
                          "--gpu", "cpu", "--num-workers", "0", "--save-pred", str(output), *extra]) == 0
    result = json.loads((output / "result.json").read_text())
    assert result["dataset"] == "lip" and result["whole"] is True and result["mean_accuracy"] is not None
    return float(np.mean([result["iou"][name] for name in LEFT_RIGHT]))


@pytest.fixture(scope="module")
def unmirrored(figures, tmp_path_factory):
    """A snapshot trained without mirroring, and its left/right IoU: what mirroring must keep."""
    folder = tmp_path_factory.mktemp("unmirrored")
    snapshot = _train(figures, folder / "snapshots")
    return snapshot, _left_right_iou(figures, snapshot, folder / "pred")


@pytest.mark.slow
def test_random_mirror_keeps_left_and_right_apart_only_with_the_swap(figures, unmirrored, tmp_path, monkeypatch):
    _, plain = unmirrored
    assert plain > 0.4, plain  # learnt at all: the sides told apart by their place in the image
    mirrored = _left_right_iou(figures, _train(figures, tmp_path / "swap", "--random-mirror"), tmp_path / "pred")
    assert mirrored > plain - 0.1, (mirrored, plain)
    # the same mirroring without the swap: each side is "left" in half the samples, and the network cannot tell
    monkeypatch.setattr("dataset.segmentation.mirrored_class_ids", lambda num_ids, flip_pairs: np.arange(num_ids))
    unswapped = _left_right_iou(figures, _train(figures, tmp_path / "no_swap", "--random-mirror"),
                                tmp_path / "pred_no_swap")
    assert unswapped < plain - 0.25, (unswapped, plain)


@pytest.mark.slow
def test_flip_keeps_left_and_right_apart_only_with_the_swap(figures, unmirrored, tmp_path, monkeypatch):
    snapshot, plain = unmirrored
    flipped = _left_right_iou(figures, snapshot, tmp_path / "flip", "--flip")
    assert flipped > plain - 0.05, (flipped, plain)
    # predict.py's flip swaps too: its predictions are evaluate.py's
    image = read_list(figures.root, figures.val_list)[0].image_path
    assert predict.main(["--restore-from", str(snapshot), "--gpu", "cpu", "--flip", "--output",
                         str(tmp_path / "predict"), image]) == 0
    name = image.split("/")[-1][:-4] + ".png"
    predicted = np.asarray(Image.open(tmp_path / "predict" / name))
    assert np.array_equal(predicted, np.asarray(Image.open(tmp_path / "flip" / name)))
    assert set(np.unique(predicted).tolist()) >= {14, 15}
    # the mirrored prediction averaged without the swap: both sides' logits tie between left and right
    monkeypatch.setattr("utils.inference.mirrored_class_ids", lambda num_ids, flip_pairs: np.arange(num_ids))
    unswapped = _left_right_iou(figures, snapshot, tmp_path / "flip_no_swap", "--flip")
    assert unswapped < plain - 0.2, (unswapped, plain)
