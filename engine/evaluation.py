"""Scoring a model on a list of images: each process predicts its contiguous share of the list
(``utils.distributed.shard``: no image counted twice or left out) with ``utils.inference.predict_logits`` and counts
ONE confusion matrix of it (``utils.metrics``), to be summed over the processes. What evaluate.py runs, and train.py's
validation (``--val-every``)."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset.segmentation import IGNORE_LABEL, DataError, SegmentationDataset
from utils.distributed import shard
from utils.inference import predict_logits
from utils.metrics import confusion_matrix
from utils.mirror import FlipPairs

# ``on_prediction(train_ids (N, H, W) int64 on the device, names)``: what a caller does with each batch's prediction
# (evaluate.py --save-pred writes PNGs).
PredictionHandler = Callable[[torch.Tensor, List[str]], None]


@dataclass(frozen=True)
class InferenceMode:
    """How the images are predicted (see ``utils.inference.predict_logits``): sliding tiles of ``tile_size`` (None:
    the whole image at once), the ``scales`` and left-right ``flip`` averaged (the classes of ``flip_pairs`` swapped
    in the mirrored image), ``tile_batch`` tiles per forward pass, within ``max_pixels`` per pass."""

    tile_size: Optional[Tuple[int, int]]
    scales: Sequence[float] = (1.0,)
    flip: bool = False
    tile_batch: int = 1
    max_pixels: Optional[int] = None
    flip_pairs: FlipPairs = ()

    def describe(self) -> str:
        """``whole image`` or ``sliding HxW tiles``."""
        return "whole image" if self.tile_size is None else f"sliding {self.tile_size[0]}x{self.tile_size[1]} tiles"


def collate(batch):
    """Stack ``(image (3, H, W), label (H, W) or None, name)`` samples; labels stay None for image-only lists."""
    images, labels, names = zip(*batch)
    if len({tuple(image.shape) for image in images}) > 1:
        raise DataError(f"images of different sizes in one batch ({', '.join(names)}): use --batch-size 1")
    if any(label is None for label in labels) and any(label is not None for label in labels):
        raise DataError(f"some images have labels and some not ({', '.join(names)}): use one kind of list line")
    stacked_labels = None if labels[0] is None else torch.stack(labels)
    return torch.stack(images), stacked_labels, list(names)


def evaluate_share(model, dataset: SegmentationDataset, device: torch.device, mode: InferenceMode, num_classes: int,
                   rank: int = 0, world_size: int = 1, batch_size: int = 1, num_workers: int = 0,
                   on_prediction: Optional[PredictionHandler] = None,
                   show_progress: bool = False) -> Optional[torch.Tensor]:
    """Predict process ``rank``'s share of ``dataset`` (a ``training=False`` dataset: full images, void labels
    ``IGNORE_LABEL``) with ``model`` (in eval mode, returning ``[main logits, ...]``), ``batch_size`` images per
    batch loaded by ``num_workers`` processes; ``on_prediction`` receives each batch's train ids.

    Returns the ``(num_classes, num_classes)`` int64 confusion matrix of this share (on ``device``; zeros for an
    empty share), or None if the list has no labels. The global random generators are not drawn from (the
    loader has its own): a validation between training steps leaves the training's random draws as they were."""
    loader = DataLoader(Subset(dataset, shard(len(dataset), rank, world_size)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator())
    conf = None
    for images, labels, names in tqdm(loader, desc="evaluate", disable=not show_progress, dynamic_ncols=True):
        logits = predict_logits(model, images.to(device, non_blocking=True), mode.tile_size, mode.scales, mode.flip,
                                mode.tile_batch, image_name=", ".join(names), max_pixels=mode.max_pixels,
                                flip_pairs=mode.flip_pairs)
        prediction = logits.argmax(dim=1)  # (N, H, W) train ids
        if labels is not None:
            batch_conf = confusion_matrix(prediction, labels.to(device), num_classes, IGNORE_LABEL)
            conf = batch_conf if conf is None else conf + batch_conf
        if on_prediction is not None:
            on_prediction(prediction, names)
    if conf is None and dataset.entries[0].label_path is not None:  # a labelled list, but an empty share
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    return conf
