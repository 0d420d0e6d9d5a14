"""Cityscapes (fine annotations): its layout, its list files and its spec (``CITYSCAPES``).

The folder holds ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``. The lists: ``train`` (2975 lines on the full dataset), ``val``
(500) as ``<image>\\t<label>`` and ``test`` (1525) as ``<image>``; ``dataset.make_lists`` adds ``trainval``
(3475). Labels are read as they come (label ids) and mapped to the 19 train ids by ``dataset.labels``.

Defaults: the paper's training (batch 8, 769x769 crops, SGD lr 1e-2, weight decay 1e-4, 60000 iterations) and the
original code's evaluation (sliding 769x769 tiles).
"""
import os
from typing import Dict, List

from dataset.labels import CLASS_NAMES, MAX_LABEL_ID, PALETTE, label_ids_to_train_ids, train_ids_to_label_ids
from dataset.segmentation import find_list_lines
from dataset.spec import DatasetSpec, EvaluationDefaults, TrainingDefaults

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_of(image: str) -> str:
    """``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` -> ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``."""
    return "gtFine" + image[len("leftImg8bit"):-len(IMAGE_SUFFIX)] + LABEL_SUFFIX


def list_lines(root: str) -> Dict[str, List[str]]:
    """``{"train", "val", "test"}`` list lines of the Cityscapes folder ``root`` (test: images only; a split without
    images: no lines)."""
    if not os.path.isdir(os.path.join(root, "leftImg8bit")):
        raise FileNotFoundError(f"not a Cityscapes folder (no leftImg8bit/ inside): {root}")
    return {split: find_list_lines(root, f"leftImg8bit/{split}/*/*{IMAGE_SUFFIX}",
                                   None if split == "test" else label_of) for split in ("train", "val", "test")}


CITYSCAPES = DatasetSpec(
    name="cityscapes",
    data_dir="cityscapes",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    decode_label=label_ids_to_train_ids,
    max_label_value=MAX_LABEL_ID,
    encode_label=train_ids_to_label_ids,
    list_lines=list_lines,
    training=TrainingDefaults(input_size=(769, 769), batch_size=8, learning_rate=1e-2, weight_decay=1e-4,
                              num_steps=60000),
    evaluation=EvaluationDefaults(input_size=(769, 769), whole=False),
)
