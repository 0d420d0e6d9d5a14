"""Training losses: cross-entropy on both heads (``CriterionDSN``), optionally with OHEM on the main head.

Logits ``(N, K, h, w)`` are first upsampled to the label size ``(N, H, W)`` with ``utils.logits.upsample_logits``
(bilinear, align_corners=True) and computed on in float32 (also under autocast).

OHEM ("online hard example mining", the original ``OhemCrossEntropy2d``): of the valid pixels, keep those whose
softmax probability of the ground-truth class is at most ``max(thresh, p_k)``, where ``p_k`` is the k-th smallest
such probability, ``k = min_kept``; all valid pixels are kept when there are no more than ``min_kept``. The others
become ``ignore_label`` and the loss is the mean cross-entropy over the kept pixels. The threshold is computed
per process on its local batch, as in the original.

Like the original (its ``factor=8``), the threshold is estimated on the predictions and labels subsampled by
``factor`` in each direction (probabilities linearly, labels nearest, corners aligned: ``scipy.ndimage.zoom``
with order 1 / 0) with ``k = min_kept // factor**2``, and then applied to every full-resolution pixel. The
subsampling was a speed trick of the numpy original; ``factor=1`` computes the threshold on all pixels instead
(the paper's definition, cheap on a GPU). We keep 8 by default so that training matches the original.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.logits import upsample_logits


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_label: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels; 0 (with a gradient path) when every pixel is ignored.

    logits (N, K, H, W) float, target (N, H, W) int64.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_label, reduction="sum")
    count = (target != ignore_label).sum()
    return total / count.clamp(min=1)


def _zoom_nearest_indices(size_in: int, size_out: int, device) -> torch.Tensor:
    """Indices of ``scipy.ndimage.zoom(order=0)``: output o reads input ``floor(o * (in-1)/(out-1) + 0.5)``."""
    if size_out == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    coords = torch.arange(size_out, device=device, dtype=torch.float64) * (size_in - 1) / (size_out - 1)
    return torch.floor(coords + 0.5).long().clamp(max=size_in - 1)


def subsample_for_ohem(probs: torch.Tensor, target: torch.Tensor, factor: int):
    """``(N, K, H, W)`` probs, ``(N, H, W)`` target -> both at ``(round(H/factor), round(W/factor))``."""
    if factor == 1:
        return probs, target
    height, width = target.shape[-2:]
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=True)
    rows = _zoom_nearest_indices(height, size[0], target.device)
    cols = _zoom_nearest_indices(width, size[1], target.device)
    return probs, target[:, rows][:, :, cols]


def ohem_threshold(probs: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
                   ignore_label: int = 255) -> torch.Tensor:
    """Scalar ``max(thresh, k-th smallest ground-truth probability)``, or 1.0 if ``min_kept >= #valid``.

    probs (N, K, H, W) softmax probabilities, target (N, H, W) int64.
    """
    valid = target != ignore_label
    num_valid = int(valid.sum())
    if min_kept >= num_valid:
        return probs.new_tensor(1.0)
    threshold = probs.new_tensor(thresh)
    if min_kept > 0:
        gt_probs = probs.permute(0, 2, 3, 1)[valid].gather(1, target[valid].unsqueeze(1)).squeeze(1)
        kth_smallest = torch.kthvalue(gt_probs, min_kept).values
        threshold = torch.maximum(threshold, kth_smallest)
    return threshold


def ohem_target(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000,
                ignore_label: int = 255, factor: int = 8) -> torch.Tensor:
    """The target with the easy pixels set to ``ignore_label``. logits (N, K, H, W), target (N, H, W) int64."""
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=1)
        small_probs, small_target = subsample_for_ohem(probs, target, factor)
        threshold = ohem_threshold(small_probs, small_target, thresh, min_kept // (factor * factor), ignore_label)
        valid = target != ignore_label
        gt_probs = probs.gather(1, target.clamp(min=0).masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        keep = valid & (gt_probs <= threshold)
        return target.masked_fill(~keep, ignore_label)


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only (see the module docstring). logits (N, K, H, W), target (N, H, W)."""

    def __init__(self, thresh: float = 0.7, min_kept: int = 100000, ignore_label: int = 255, factor: int = 8):
        super().__init__()
        if not 0.0 <= thresh <= 1.0:
            raise ValueError(f"OHEM threshold must lie in [0, 1], got {thresh}")
        if min_kept < 0 or factor < 1:
            raise ValueError(f"OHEM needs min_kept >= 0 and factor >= 1, got {min_kept} and {factor}")
        self.thresh, self.min_kept, self.ignore_label, self.factor = thresh, min_kept, ignore_label, factor

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hard_target = ohem_target(logits, target, self.thresh, self.min_kept, self.ignore_label, self.factor)
        return cross_entropy(logits, hard_target, self.ignore_label)


class CriterionDSN(nn.Module):
    """``loss(main) + aux_weight * loss(aux)``: the main head with plain or OHEM cross-entropy, the DSN head plain.

    forward(preds, target): preds ``[main (N, K, h, w), aux (N, K, h, w)]``, target ``(N, H, W)`` int64 train ids
    -> scalar loss.
    """

    def __init__(self, ignore_label: int = 255, aux_weight: float = 0.4, ohem: bool = False,
                 ohem_thresh: float = 0.7, ohem_keep: int = 100000, ohem_factor: int = 8):
        super().__init__()
        self.ignore_label = ignore_label
        self.aux_weight = aux_weight
        self.ohem = OhemCrossEntropy(ohem_thresh, ohem_keep, ignore_label, ohem_factor) if ohem else None

    def forward(self, preds, target: torch.Tensor) -> torch.Tensor:
        main, aux = preds
        size = target.shape[-2:]
        main = upsample_logits(main.float(), size)
        aux = upsample_logits(aux.float(), size)
        main_loss = self.ohem(main, target) if self.ohem is not None else cross_entropy(main, target, self.ignore_label)
        return main_loss + self.aux_weight * cross_entropy(aux, target, self.ignore_label)
