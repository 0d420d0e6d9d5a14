"""ADE20K: the label format, the defaults, the generated ADE20K-format set, the list maker, bad input, and the tiny
CCNet learning the set through train.py and evaluate.py (the dataset resolved from the snapshot)."""
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
import train
from dataset.ade20k import ADE20K, CLASS_NAMES, PALETTE, annotation_to_train_ids, train_ids_to_annotation
from dataset.make_lists import main as make_lists_main
from dataset.make_lists import make_lists
from dataset.registry import DATASETS, get_dataset
from dataset.segmentation import DataError, read_list
from utils.metrics import confusion_matrix, scores_from_confusion

HEIGHT, WIDTH = 64, 128
DEMO_CLASSES = {"road", "building", "tree", "sky", "person", "car"}  # what the generated scenes show


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data(num_train=8, num_val=3, height=HEIGHT, width=WIDTH, seed=1, dataset="ade20k")


def test_annotations_decode_to_train_ids_and_back():
    annotation = np.array([[0, 1, 2], [149, 150, 7]], np.uint8)
    train_ids = annotation_to_train_ids(annotation)
    assert train_ids.dtype == np.uint8 and train_ids.tolist() == [[255, 0, 1], [148, 149, 6]]
    assert np.array_equal(train_ids_to_annotation(train_ids), annotation)
    assert train_ids_to_annotation(np.array([-1, 150, 255])).tolist() == [0, 0, 0]  # not a class: void
    with pytest.raises(ValueError, match=r"holds the value 151 \(2 pixels\); ADE20K annotations hold 0 \(void\) "
                                         r"and 1..150"):
        annotation_to_train_ids(np.array([3, 151, 151, 150], np.uint8))


def test_classes_palette_and_registry():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 150 == ADE20K.num_classes
    assert CLASS_NAMES[:3] == ("wall", "building", "sky") and CLASS_NAMES[-1] == "flag"
    assert PALETTE.shape == (150, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(colour) for colour in PALETTE.tolist()}) == 150 and PALETTE.sum(axis=1).min() > 0
    assert set(DATASETS) == {"cityscapes", "ade20k", "lip", "camvid"} and get_dataset("ade20k") is ADE20K
    with pytest.raises(ValueError, match="unknown dataset 'voc'; choose from cityscapes, ade20k, lip, camvid"):
        get_dataset("voc")


def test_defaults_follow_the_dataset_unless_given():
    args = train.parse_args(["--dataset", "ade20k"])
    assert (args.data_dir, args.input_size, args.batch_size, args.learning_rate, args.weight_decay, args.num_steps,
            args.num_classes) == ("ADEChallengeData2016", (512, 512), 16, 1e-2, 5e-4, 80000, 150)
    assert args.data_list.endswith("dataset/list/ade20k/train.lst")
    args = train.parse_args(["--dataset", "ade20k", "--input-size", "64", "--num-steps", "5", "--num-classes", "7"])
    assert (args.input_size, args.num_steps, args.num_classes, args.batch_size) == ((64, 64), 5, 7, 16)
    assert train.parse_args([]).data_list.endswith("dataset/list/cityscapes/train.lst")


def test_generated_set_has_the_ade20k_layout_and_values(demo, tmp_path):
    entries = read_list(demo.root, demo.val_list)
    assert [entry.name for entry in entries] == [f"images/validation/ADE_val_{i:08d}.jpg" for i in (1, 2, 3)]
    for entry in entries:
        assert entry.label_path.endswith(entry.name.replace("images/", "annotations/").replace(".jpg", ".png"))
        assert cv2.imread(entry.image_path).shape == (HEIGHT, WIDTH, 3)
        values = set(np.unique(cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)).tolist())
        assert values - {0} <= {CLASS_NAMES.index(name) + 1 for name in DEMO_CLASSES} and 0 in values
    assert make_lists(demo.root, str(tmp_path), "ade20k") == {"train": 8, "val": 3, "trainval": 11}
    assert (tmp_path / "train.lst").read_text() == open(demo.train_list).read()
    assert (tmp_path / "val.lst").read_text() == open(demo.val_list).read()


def test_wrong_layout_and_bad_labels_are_one_line_naming_the_file(demo, demo_data, tmp_path, failed_run):
    cityscapes = demo_data(num_train=2, num_val=1, height=HEIGHT, width=WIDTH)
    message = failed_run(make_lists_main, [cityscapes.root, "--dataset", "ade20k", "--out-dir", str(tmp_path)])
    assert message == f"not an ADE20K folder (ADEChallengeData2016: no images/ and annotations/ inside): " \
                      f"{cityscapes.root}"
    entries = read_list(demo.root, demo.train_list)
    bad_list = tmp_path / "bad.lst"
    bad_list.write_text(f"{entries[0].name}\t{tmp_path / 'bad.png'}\n")  # an absolute label path: still joined
    annotation = cv2.imread(entries[0].label_path, cv2.IMREAD_UNCHANGED)
    annotation[:2] = 200
    cv2.imwrite(str(tmp_path / "bad.png"), annotation)
    with pytest.raises(DataError) as error:
        ADE20K.dataset(demo.root, str(bad_list), training=False)[0]
    assert str(error.value) == f"{bad_list} line 1: label {tmp_path / 'bad.png'} holds the value 200 " \
                               f"({2 * WIDTH} pixels); ADE20K annotations hold 0 (void) and 1..150: another " \
                               "dataset's labels? (check --dataset)"
    message = failed_run(train.main, ["--dataset", "ade20k", "--data-dir", demo.root, "--data-list", str(bad_list),
                                      "--backbone", "tiny", "--gpu", "cpu", "--input-size", "32", "--batch-size", "1",
                                      "--num-steps", "1", "--num-workers", "0", "--restore-from", "",
                                      "--snapshot-dir", str(tmp_path / "snapshots")])
    assert message == str(error.value)


def _best_constant_miou(data) -> float:
    """The mean IoU of predicting one class everywhere, for the best class: what learning must beat."""
    labels = [sample[1] for sample in ADE20K.dataset(data.root, data.val_list, training=False)]
    best = 0.0
    for class_id in range(ADE20K.num_classes):
        conf = sum(confusion_matrix(torch.full_like(label, class_id), label, ADE20K.num_classes, 255)
                   for label in labels)
        best = max(best, scores_from_confusion(conf).mean_iou)
    return best


def test_tiny_ccnet_learns_the_generated_set(demo, tmp_path, capsys):
    snapshots = tmp_path / "snapshots"
    assert train.main(["--dataset", "ade20k", "--data-dir", demo.root, "--data-list", demo.train_list,
                       "--backbone", "tiny", "--norm", "bn", "--gpu", "cpu", "--input-size", f"{HEIGHT},{WIDTH}",
                       "--batch-size", "4", "--num-steps", "30", "--learning-rate", "2e-2", "--num-workers", "0",
                       "--restore-from", "", "--random-mirror", "--snapshot-dir", str(snapshots)]) == 0
    with open(snapshots / "logs" / "train_log.csv") as handle:
        losses = [float(line.split(",")[1]) for line in handle.read().splitlines()[1:]]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    # evaluate.py and predict.py take the dataset (classes, colours, whole-image mode) from the snapshot
    assert evaluate.main(["--data-dir", demo.root, "--data-list", demo.val_list, "--restore-from",
                          str(snapshots / "CS_scenes_30.pth"), "--gpu", "cpu", "--num-workers", "0",
                          "--save-pred", str(tmp_path / "pred")]) == 0
    result = json.loads((tmp_path / "pred" / "result.json").read_text())
    assert result["dataset"] == "ade20k" and result["whole"] is True and set(result["iou"]) == set(CLASS_NAMES)
    assert result["mean_iou"] > _best_constant_miou(demo) + 0.1, result
    label_file = tmp_path / "pred" / "labelIds" / "ADE_val_00000001.png"
    values = np.asarray(Image.open(label_file))
    assert values.min() >= 1 and values.max() <= 150  # the annotation format: classes 1..150
    image = read_list(demo.root, demo.val_list)[0].image_path
    assert predict.main(["--restore-from", str(snapshots / "CS_scenes_30.pth"), "--gpu", "cpu", "--output",
                         str(tmp_path / "predict"), image]) == 0
    paletted = Image.open(tmp_path / "predict" / "ADE_val_00000001.png")
    assert np.array_equal(np.array(paletted.getpalette()[:450], np.uint8).reshape(150, 3), PALETTE)
    assert np.array_equal(np.asarray(paletted) + 1, values)  # the same prediction as evaluate.py's
