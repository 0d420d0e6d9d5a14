"""Cityscapes (fine annotations): its layout, its list files and its spec (``CITYSCAPES``).

The folder holds ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``. The lists: ``train`` (2975 lines on the full dataset), ``val``
(500) as ``<image>\\t<label>`` and ``test`` (1525) as ``<image>``; ``dataset.make_lists`` adds ``trainval``
(3475). Labels are read as they come (label ids) and mapped to the 19 train ids by ``dataset.labels``.

Defaults: the paper's training (batch 8, 769x769 crops, SGD lr 1e-2, weight decay 1e-4, 60000 iterations) and the
original code's evaluation (sliding 769x769 tiles).
"""
import glob
import os
from typing import Dict, List

from dataset.labels import CLASS_NAMES, PALETTE, label_ids_to_train_ids, train_ids_to_label_ids
from dataset.spec import DatasetSpec, EvaluationDefaults, TrainingDefaults

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def split_lines(root: str, split: str, with_labels: bool) -> List[str]:
    """Sorted list lines of one split: ``<image>\\t<label>`` or ``<image>``, relative to ``root``."""
    pattern = os.path.join(root, "leftImg8bit", split, "*", "*" + IMAGE_SUFFIX)
    lines = []
    for image_path in sorted(glob.glob(pattern)):
        image = os.path.relpath(image_path, root).replace(os.sep, "/")
        if not with_labels:
            lines.append(image)
            continue
        city = os.path.basename(os.path.dirname(image_path))
        stem = os.path.basename(image_path)[:-len(IMAGE_SUFFIX)]
        label = f"gtFine/{split}/{city}/{stem}{LABEL_SUFFIX}"
        if not os.path.isfile(os.path.join(root, label)):
            raise FileNotFoundError(f"label missing for {image}: {os.path.join(root, label)}")
        lines.append(f"{image}\t{label}")
    return lines


def list_lines(root: str) -> Dict[str, List[str]]:
    """``{"train", "val", "test"}`` list lines of the Cityscapes folder ``root`` (a split without images: no
    lines)."""
    if not os.path.isdir(os.path.join(root, "leftImg8bit")):
        raise FileNotFoundError(f"not a Cityscapes folder (no leftImg8bit/ inside): {root}")
    return {"train": split_lines(root, "train", True), "val": split_lines(root, "val", True),
            "test": split_lines(root, "test", False)}


CITYSCAPES = DatasetSpec(
    name="cityscapes",
    data_dir="cityscapes",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    decode_label=label_ids_to_train_ids,
    encode_label=train_ids_to_label_ids,
    list_lines=list_lines,
    training=TrainingDefaults(input_size=(769, 769), batch_size=8, learning_rate=1e-2, weight_decay=1e-4,
                              num_steps=60000),
    evaluation=EvaluationDefaults(input_size=(769, 769), whole=False),
)
