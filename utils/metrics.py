"""THE confusion matrix and the scores derived from it (IoU per class, mean IoU, pixel accuracy, mean accuracy).

Everything that scores a segmentation (evaluate.py, training-time validation, tests) goes through
:func:`confusion_matrix` and :func:`scores_from_confusion`. The matrix is a torch tensor so that distributed
evaluation can sum it across ranks with one ``all_reduce``.

Convention: ``conf[g, p]`` counts the pixels whose ground truth is class ``g`` and whose prediction is class ``p``;
pixels whose ground truth is the ignore label are not counted.

Classes absent from both the ground truth and the prediction (row and column of the matrix all zero) have no
defined IoU: they are reported as ``NaN`` (``null`` in ``result.json``, ``n/a`` in the table) and left out of the mean
IoU. The original code scored them ``0`` and divided by all 19 classes; on the Cityscapes val set every class
occurs, so both conventions give the same mean there. A class that occurs only in the prediction (false
positives only) is a genuine ``IoU = 0`` and counts in the mean.

Mean accuracy (LIP's second figure) is the mean over the classes of their accuracy, the share of a class's ground
truth pixels predicted as that class (``conf[g, g] / conf[g, :].sum()``, its recall). It is defined for the classes
that occur in the ground truth; the others are left out of the mean (CE2P's LIP evaluation scores them 0 and divides
by all classes; on LIP's val set every class occurs, so both give the same mean there).
"""
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from utils.outputs import atomic_output


def confusion_matrix(prediction, ground_truth, num_classes: int, ignore_label: int = 255) -> torch.Tensor:
    """Count (ground truth, prediction) pairs over the valid pixels.

    Args:
        prediction: integer tensor / array of any shape, values in ``[0, num_classes)`` (e.g. ``(N, H, W)``).
        ground_truth: same shape, values in ``[0, num_classes)`` or ``ignore_label``.
        num_classes: ``K``.
        ignore_label: ground-truth value of pixels that are not scored.
    Returns:
        ``(K, K)`` int64 tensor on the device of ``prediction``; ``conf[g, p]``.
    """
    prediction = torch.as_tensor(prediction)
    ground_truth = torch.as_tensor(ground_truth, device=prediction.device)
    if prediction.shape != ground_truth.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} differs from ground truth shape {tuple(ground_truth.shape)}"
        )
    ground_truth = ground_truth.long().reshape(-1)
    prediction = prediction.long().reshape(-1)
    valid = ground_truth != ignore_label
    ground_truth, prediction = ground_truth[valid], prediction[valid]
    if ground_truth.numel() and (ground_truth.min() < 0 or ground_truth.max() >= num_classes):
        raise ValueError(
            f"ground truth has values outside [0, {num_classes}) other than the ignore label {ignore_label}: "
            f"min {int(ground_truth.min())}, max {int(ground_truth.max())}"
        )
    if prediction.numel() and (prediction.min() < 0 or prediction.max() >= num_classes):
        raise ValueError(
            f"prediction has values outside [0, {num_classes}): min {int(prediction.min())}, max {int(prediction.max())}"
        )
    counts = torch.bincount(ground_truth * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass
class SegmentationScores:
    """Scores of one confusion matrix.

    Attributes:
        iou: ``(K,)`` float64 tensor, ``tp / (gt + pred - tp)`` per class; NaN for a class absent from both.
        mean_iou: mean of the defined entries of ``iou`` (NaN when none is defined).
        pixel_accuracy: correctly labelled valid pixels / valid pixels (NaN when there are none).
        num_pixels: number of valid (scored) pixels.
        accuracy: ``(K,)`` float64 tensor, ``tp / gt`` per class; NaN for a class absent from the ground truth.
        mean_accuracy: mean of the defined entries of ``accuracy`` (NaN when none is defined).
    """

    iou: torch.Tensor
    mean_iou: float
    pixel_accuracy: float
    num_pixels: int
    accuracy: torch.Tensor
    mean_accuracy: float

    @property
    def present(self) -> torch.Tensor:
        """``(K,)`` bool: the classes that occur in the ground truth or in the prediction."""
        return ~torch.isnan(self.iou)


def scores_from_confusion(conf: torch.Tensor) -> SegmentationScores:
    """IoU and accuracy per class, their means, and the pixel accuracy of a ``(K, K)`` confusion matrix
    (``conf[gt, pred]``)."""
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {tuple(conf.shape)}")
    conf = conf.detach().to("cpu", torch.float64)
    true_positive = conf.diagonal()
    ground_truth = conf.sum(dim=1)
    iou = _ratio(true_positive, ground_truth + conf.sum(dim=0) - true_positive)
    accuracy = _ratio(true_positive, ground_truth)
    total = float(conf.sum())
    pixel_accuracy = float(true_positive.sum()) / total if total > 0 else math.nan
    return SegmentationScores(iou=iou, mean_iou=_defined_mean(iou), pixel_accuracy=pixel_accuracy,
                              num_pixels=int(total), accuracy=accuracy, mean_accuracy=_defined_mean(accuracy))


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` elementwise, NaN where the denominator is 0."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.full_like(denominator, math.nan))


def _defined_mean(values: torch.Tensor) -> float:
    """The mean of the entries of ``values`` that are not NaN; NaN when all are."""
    defined = ~torch.isnan(values)
    return float(values[defined].mean()) if defined.any() else math.nan


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:6.2f}"


def format_scores_table(scores: SegmentationScores, class_names: Sequence[str]) -> str:
    """A plain-text table: one line per class with its IoU in percent (``n/a`` if absent), then mean IoU, pixel
    accuracy and mean accuracy."""
    if len(class_names) != scores.iou.numel():
        raise ValueError(f"{len(class_names)} class names for {scores.iou.numel()} classes")
    width = max(len("pixel accuracy"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {_percent(float(value)):>7}" for name, value in zip(class_names, scores.iou)]
    lines.append("-" * (width + 9))
    absent = int((~scores.present).sum())
    note = f"   (over {scores.iou.numel() - absent} classes; {absent} absent: n/a)" if absent else ""
    lines.append(f"{'mean IoU':<{width}}  {_percent(scores.mean_iou):>7}{note}")
    lines.append(f"{'pixel accuracy':<{width}}  {_percent(scores.pixel_accuracy):>7}")
    unseen = int(torch.isnan(scores.accuracy).sum())
    note = f"   (over {scores.accuracy.numel() - unseen} classes; {unseen} not in the ground truth)" if unseen else ""
    lines.append(f"{'mean accuracy':<{width}}  {_percent(scores.mean_accuracy):>7}{note}")
    return "\n".join(lines)


def _json_number(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def scores_to_dict(scores: SegmentationScores, class_names: Sequence[str]) -> dict:
    """JSON-ready dict: ``mean_iou``, ``pixel_accuracy``, ``mean_accuracy``, ``num_pixels``, ``iou`` by class name
    (``None`` for an absent class) and the absent classes."""
    if len(class_names) != scores.iou.numel():
        raise ValueError(f"{len(class_names)} class names for {scores.iou.numel()} classes")
    return {
        "mean_iou": _json_number(scores.mean_iou),
        "pixel_accuracy": _json_number(scores.pixel_accuracy),
        "mean_accuracy": _json_number(scores.mean_accuracy),
        "num_pixels": scores.num_pixels,
        "iou": {name: _json_number(float(value)) for name, value in zip(class_names, scores.iou)},
        "absent_classes": [name for name, present in zip(class_names, scores.present) if not present],
    }


def write_result_json(path: str, scores: SegmentationScores, class_names: Sequence[str], extra: Optional[dict] = None):
    """Write :func:`scores_to_dict` (plus ``extra`` entries, e.g. the evaluation settings) to ``path`` as JSON, whole
    or not at all (``utils.outputs.atomic_output``: a failure is an ``OutputError`` naming ``path``)."""
    result = scores_to_dict(scores, class_names)
    if extra:
        result.update(extra)
    with atomic_output(path) as temporary, open(temporary, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")

