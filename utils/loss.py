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

The category consistent loss (:class:`CategoryConsistentLoss`, the TPAMI version of the paper) pulls the embeddings
of one class's pixels towards their mean and pushes the means of different classes apart (docs/training.md).
"""
from typing import Dict, NamedTuple, Optional

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


class CCLTerms(NamedTuple):
    """The category consistent loss of a batch: its three terms and ``total = alpha var + beta dis + gamma reg``,
    each a scalar averaged over the images that have a valid pixel."""

    var: torch.Tensor
    dis: torch.Tensor
    reg: torch.Tensor
    total: torch.Tensor


def _norm(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension whose gradient is 0 (not NaN) at the zero vector: a pixel exactly at
    its class mean (a one-pixel class) or two equal means. ``(..., D) -> (...)``."""
    squared = vectors.square().sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(),
                       torch.zeros_like(squared))


def nearest_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """``(N, H, W)`` int64 labels -> ``(N, h, w)`` by nearest-neighbour sampling (``F.interpolate``'s "nearest":
    output pixel o reads input ``floor(o * H / h)``); the labels themselves when already of that size."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class CategoryConsistentLoss(nn.Module):
    """The category consistent loss of CCNet's TPAMI version (De Brabandere et al.'s discriminative loss with a
    piece-wise variance term), per image over the classes ``C`` present among its valid pixels:

    * ``var = 1/|C| sum_c 1/N_c sum_{i in c} phi_var(||mu_c - h_i||)``, ``phi_var(d)`` = 0 for ``d <= delta_v``,
      ``(d - delta_v)^2`` up to ``delta_d``, ``d - delta_d + (delta_d - delta_v)^2`` beyond (linear, continuous);
    * ``dis = 1/(|C|(|C|-1)) sum_{a != b} phi_dis(||mu_a - mu_b||)``, ``phi_dis(d) = max(0, 2 delta_d - d)^2``
      (0 for an image with one class);
    * ``reg = 1/|C| sum_c ||mu_c||``;

    ``total = alpha var + beta dis + gamma reg``; every term averaged over the batch's images that have a valid
    pixel (0, with a gradient path, when none has). Pixels labelled ``ignore_index`` take no part.

    Vectorized over pixels and classes (``index_add`` over per-image class segments; the pair term on the small
    ``(S, S)`` matrix of the batch's S image-class segments), computed in float32 also under autocast. Under
    DistributedDataParallel each process computes the loss of its own images.

    forward(embedding ``(N, D, h, w)``, labels ``(N, h, w)`` int64) -> :class:`CCLTerms`. Labels of another size
    ``(N, H, W)`` are first brought to ``(h, w)`` by nearest-neighbour sampling (:func:`nearest_labels`).
    """

    def __init__(self, delta_v: float = 0.5, delta_d: float = 1.5, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 0.001, ignore_index: int = 255):
        super().__init__()
        if not 0 <= delta_v < delta_d:
            raise ValueError(f"the CCL margins need 0 <= delta_v < delta_d, got {delta_v} and {delta_d}")
        if min(alpha, beta, gamma) < 0:
            raise ValueError(f"the CCL weights must be >= 0, got {alpha}, {beta}, {gamma}")
        self.delta_v, self.delta_d = float(delta_v), float(delta_d)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.ignore_index = ignore_index

    def phi_var(self, distance: torch.Tensor) -> torch.Tensor:
        """The piece-wise variance penalty of a pixel's distance to its class mean (elementwise)."""
        quadratic = (distance - self.delta_v).clamp(min=0).square()
        linear = distance - self.delta_d + (self.delta_d - self.delta_v) ** 2
        return torch.where(distance > self.delta_d, linear, quadratic)

    def phi_dis(self, distance: torch.Tensor) -> torch.Tensor:
        """The hinge penalty of two class means closer than ``2 delta_d`` (elementwise)."""
        return (2 * self.delta_d - distance).clamp(min=0).square()

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> CCLTerms:
        with torch.autocast(embedding.device.type, enabled=False):
            return self._terms(embedding.float(), nearest_labels(labels, embedding.shape[-2:]))

    def _terms(self, embedding: torch.Tensor, labels: torch.Tensor) -> CCLTerms:
        num_images, dim = embedding.shape[:2]
        pixels = embedding.permute(0, 2, 3, 1).reshape(-1, dim)  # (N*h*w, D)
        flat_labels = labels.reshape(num_images, -1)
        valid = flat_labels != self.ignore_index
        image_of_pixel = torch.arange(num_images, device=labels.device)[:, None].expand_as(flat_labels)
        # one segment per (image, class) present: ids image * num_ids + class, made contiguous by unique
        num_ids = int(flat_labels[valid].max()) + 1 if bool(valid.any()) else 1
        segment_ids = (image_of_pixel * num_ids + flat_labels)[valid]
        segments, segment_of_pixel = torch.unique(segment_ids, return_inverse=True)  # (S,), (P,)
        pixels = pixels[valid.reshape(-1)]  # (P, D)
        num_segments = segments.numel()
        counts = torch.zeros(num_segments, device=pixels.device).index_add_(
            0, segment_of_pixel, torch.ones_like(segment_of_pixel, dtype=pixels.dtype))
        means = torch.zeros(num_segments, dim, device=pixels.device).index_add_(0, segment_of_pixel, pixels)
        means = means / counts[:, None]  # (S, D)

        distances = _norm(means[segment_of_pixel] - pixels)  # (P,)
        var_per_segment = torch.zeros(num_segments, device=pixels.device).index_add_(
            0, segment_of_pixel, self.phi_var(distances)) / counts
        image_of_segment = torch.div(segments, num_ids, rounding_mode="floor")  # (S,)
        classes = torch.zeros(num_images, device=pixels.device).index_add_(
            0, image_of_segment, torch.ones_like(var_per_segment))  # |C| per image, (N,)
        per_class = torch.stack([var_per_segment, _norm(means)], dim=1)  # (S, 2): var, reg
        per_image = torch.zeros(num_images, 2, device=pixels.device).index_add_(0, image_of_segment, per_class)
        per_image = per_image / classes.clamp(min=1)[:, None]

        same_image = image_of_segment[:, None] == image_of_segment[None, :]
        pairs = same_image & ~torch.eye(num_segments, dtype=torch.bool, device=pixels.device)  # (S, S)
        pair_penalty = torch.where(pairs, self.phi_dis(_norm(means[:, None] - means[None, :])),
                                   torch.zeros((), device=pixels.device))
        dis = torch.zeros(num_images, device=pixels.device).index_add_(0, image_of_segment, pair_penalty.sum(1))
        dis = dis / (classes * (classes - 1)).clamp(min=1)

        has_valid = classes > 0
        num_valid_images = has_valid.sum().clamp(min=1)
        zero = embedding.sum() * 0  # a gradient path when no image has a valid pixel
        var = per_image[:, 0].sum() / num_valid_images + zero
        reg = per_image[:, 1].sum() / num_valid_images + zero
        dis = dis.sum() / num_valid_images + zero
        return CCLTerms(var, dis, reg, self.alpha * var + self.beta * dis + self.gamma * reg)


class CriterionDSN(nn.Module):
    """``loss(main) + aux_weight * loss(aux)`` (+ the category consistent loss when ``ccl`` is given): the main head
    with plain or OHEM cross-entropy, the DSN head plain.

    forward(preds, target): preds ``[main (N, K, h, w), aux (N, K, h, w)]`` (with ``ccl``: ``[main, aux,
    embedding (N, D, h, w)]``, what a model built with ``embedding_dim`` returns in training), target ``(N, H, W)``
    int64 train ids -> scalar loss, ``terms(preds, target)["total"]``.
    """

    def __init__(self, ignore_label: int = 255, aux_weight: float = 0.4, ohem: bool = False,
                 ohem_thresh: float = 0.7, ohem_keep: int = 100000, ohem_factor: int = 8,
                 ccl: Optional[CategoryConsistentLoss] = None):
        super().__init__()
        self.ignore_label = ignore_label
        self.aux_weight = aux_weight
        self.ohem = OhemCrossEntropy(ohem_thresh, ohem_keep, ignore_label, ohem_factor) if ohem else None
        self.ccl = ccl

    def terms(self, preds, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss and its parts, scalars: ``total``; ``seg`` (main head), ``dsn`` (auxiliary head, unweighted);
        with ``ccl`` also ``ccl_var``, ``ccl_dis``, ``ccl_reg`` (unweighted)."""
        main, aux = preds[:2]
        size = target.shape[-2:]
        main = upsample_logits(main.float(), size)
        aux = upsample_logits(aux.float(), size)
        main_loss = self.ohem(main, target) if self.ohem is not None else cross_entropy(main, target, self.ignore_label)
        aux_loss = cross_entropy(aux, target, self.ignore_label)
        terms = {"total": main_loss + self.aux_weight * aux_loss, "seg": main_loss, "dsn": aux_loss}
        if self.ccl is not None:
            if len(preds) < 3:
                raise ValueError("the category consistent loss needs the model's embedding: build the model with "
                                 "embedding_dim > 0 (train.py --ccl 1)")
            ccl = self.ccl(preds[2], target)
            terms.update(total=terms["total"] + ccl.total, ccl_var=ccl.var, ccl_dis=ccl.dis, ccl_reg=ccl.reg)
        return terms

    def forward(self, preds, target: torch.Tensor) -> torch.Tensor:
        return self.terms(preds, target)["total"]
