"""The confusion matrix, mIoU and mean accuracy on hand-made examples whose answers are worked out by hand."""
import json
import math

import numpy as np
import pytest
import torch

from utils.metrics import (
    confusion_matrix,
    format_scores_table,
    scores_from_confusion,
    write_result_json,
)

# 2x3 image, 4 classes, class 3 in neither map; the last pixel is ignored (its prediction must not count).
GT = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])
NAMES = ["road", "car", "sky", "bus"]


def test_confusion_matrix_counts_gt_rows_pred_columns_and_skips_ignored():
    conf = confusion_matrix(PRED, GT, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)


def test_confusion_matrix_accepts_numpy_and_batches_add_up():
    batch_pred = torch.stack([PRED, PRED.flip(-1)])
    batch_gt = torch.stack([GT, GT.flip(-1)])
    conf = confusion_matrix(batch_pred.numpy(), batch_gt.numpy().astype(np.uint8), num_classes=4)
    assert torch.equal(conf, 2 * confusion_matrix(PRED, GT, num_classes=4))


def test_scores_known_answer_with_absent_class():
    scores = scores_from_confusion(confusion_matrix(PRED, GT, num_classes=4))
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 0 -> 0; class 3 absent.
    assert scores.iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(float(scores.iou[3]))
    assert scores.present.tolist() == [True, True, True, False]
    assert scores.mean_iou == pytest.approx(1 / 3)  # mean over the 3 defined classes, not 4
    assert scores.pixel_accuracy == pytest.approx(3 / 5)
    assert scores.num_pixels == 5
    # accuracy: class 0 1 of 2, class 1 2 of 2, class 2 0 of 1; class 3 has no ground truth
    assert scores.accuracy[:3].tolist() == pytest.approx([1 / 2, 1.0, 0.0]) and math.isnan(float(scores.accuracy[3]))
    assert scores.mean_accuracy == pytest.approx(1 / 2)


def test_class_only_in_prediction_is_zero_and_counts_in_the_mean():
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])
    scores = scores_from_confusion(confusion_matrix(pred, gt, num_classes=3))
    assert scores.iou.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert scores.mean_iou == pytest.approx(0.5)
    # accuracy is per ground-truth class: class 2 has no ground truth, so no accuracy, and stays out of the mean
    assert scores.accuracy[:2].tolist() == pytest.approx([1.0, 0.5]) and math.isnan(float(scores.accuracy[2]))
    assert scores.mean_accuracy == pytest.approx(0.75)


def test_mean_accuracy_of_a_hand_made_confusion_matrix():
    conf = torch.tensor([[5, 1, 0],   # class 0: 6 pixels, 5 right
                         [2, 6, 2],   # class 1: 10 pixels, 6 right
                         [0, 0, 4]])  # class 2: 4 pixels, all right
    scores = scores_from_confusion(conf)
    assert scores.accuracy.tolist() == pytest.approx([5 / 6, 6 / 10, 4 / 4])
    assert scores.mean_accuracy == pytest.approx((5 / 6 + 6 / 10 + 1) / 3)  # 81.11 %, not the pixel accuracy:
    assert scores.pixel_accuracy == pytest.approx(15 / 20)  # a rare class weighs as much as a common one
    assert scores.iou.tolist() == pytest.approx([5 / (6 + 7 - 5), 6 / (10 + 7 - 6), 4 / (4 + 6 - 4)])
    table = format_scores_table(scores, ["a", "b", "c"])
    assert table.splitlines()[-1].split() == ["mean", "accuracy", "81.11"]


def test_perfect_prediction_scores_one():
    gt = torch.randint(0, 5, (3, 7, 9))
    scores = scores_from_confusion(confusion_matrix(gt, gt, num_classes=5))
    assert scores.mean_iou == pytest.approx(1.0) and scores.pixel_accuracy == pytest.approx(1.0)


def test_bad_values_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="ground truth"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=4)
    with pytest.raises(ValueError, match="prediction has values"):
        confusion_matrix(torch.tensor([0, 4]), torch.tensor([0, 1]), num_classes=4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), num_classes=4)


def test_table_and_result_json_show_absent_class(tmp_path):
    scores = scores_from_confusion(confusion_matrix(PRED, GT, num_classes=4))
    table = format_scores_table(scores, NAMES)
    assert "bus" in table and "n/a" in table
    assert "33.33" in table and "66.67" in table and "60.00" in table  # mean IoU, class 1, pixel accuracy
    assert table.splitlines()[-1].split() == ["mean", "accuracy", "50.00", "(over", "3", "classes;", "1", "not", "in",
                                              "the", "ground", "truth)"]
    path = tmp_path / "sub" / "result.json"
    write_result_json(str(path), scores, NAMES, extra={"scales": [1.0]})
    result = json.loads(path.read_text())
    assert result["iou"]["bus"] is None
    assert result["absent_classes"] == ["bus"]
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["mean_accuracy"] == pytest.approx(1 / 2) and result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["scales"] == [1.0]
