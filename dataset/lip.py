"""LIP (Look into Person, single-person human parsing): its layout, list files, 20 classes, flip pairs, palette and
spec (``LIP``).

The folder holds the release's ``TrainVal_images/{train,val}_images/*.jpg`` and
``TrainVal_parsing_annotations/{train,val}_segmentations/*.png`` (same stem). An annotation pixel is the train id
itself: 0 background, 1..19 the parts and clothes (:data:`CLASS_NAMES`), 255 void; any other value is an error
naming the file. The lists: ``train`` (30462 lines on the full dataset) and ``val`` (10000), as
``<image>\\t<label>`` (``dataset.make_lists`` adds ``trainval``).

Left and right: classes 14/15 (arms), 16/17 (legs) and 18/19 (shoes) are the person's left and right, so a mirrored
image swaps them (:data:`FLIP_PAIRS`; ``--random-mirror`` and ``--flip`` do).

Defaults: the TPAMI CCNet paper trains LIP as CE2P does (Ruan et al., AAAI 2019), so its numbers are CE2P's
released training script (``job_train.sh`` and ``train.py``): 473x473 crops, batch 40, SGD lr 7e-3, weight decay
5e-4, poly 0.9, 115000 iterations (about 150 epochs of 30462 images); evaluation on the whole image
(docs/lip.md: where each number comes from, and what differs).
"""
import os
from typing import Dict, List

import numpy as np

from dataset.segmentation import IGNORE_LABEL, find_list_lines
from dataset.spec import DatasetSpec, EvaluationDefaults, TrainingDefaults, make_palette

CLASS_NAMES = (
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
    "right-shoe",
)
NUM_CLASSES = len(CLASS_NAMES)  # 20
FLIP_PAIRS = ((14, 15), (16, 17), (18, 19))  # (left, right): arm, leg, shoe
IMAGE_FOLDER, LABEL_FOLDER = "TrainVal_images", "TrainVal_parsing_annotations"
# Background a dark grey (black is void in the pictures), the parts the generated colours of ``make_palette``.
PALETTE = np.concatenate([np.array([[64, 64, 64]], np.uint8), make_palette(NUM_CLASSES - 1)])


def annotation_to_train_ids(annotation: np.ndarray) -> np.ndarray:
    """Annotation pixels (0..19, 255 void) -> the same uint8 values. Any other value raises ``ValueError`` saying
    which."""
    annotation = np.asarray(annotation)
    unknown = (annotation >= NUM_CLASSES) & (annotation != IGNORE_LABEL)
    if unknown.any():
        raise ValueError(f"holds the value {int(annotation[unknown].flat[0])} ({int(unknown.sum())} pixels); LIP "
                         f"annotations hold 0..{NUM_CLASSES - 1} and {IGNORE_LABEL} (void)")
    return annotation.astype(np.uint8, copy=False)


def train_ids_to_annotation(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..19; anything else is void) -> same-shape uint8 annotation values (0..19, 255)."""
    train_ids = np.asarray(train_ids).astype(np.int64)
    return np.where((train_ids >= 0) & (train_ids < NUM_CLASSES), train_ids, IGNORE_LABEL).astype(np.uint8)


def annotation_of(image: str) -> str:
    """``TrainVal_images/<split>_images/<stem>.jpg`` -> ``TrainVal_parsing_annotations/<split>_segmentations/
    <stem>.png``."""
    folder, name = image.split("/")[1:]
    split = folder[:-len("_images")]
    return f"{LABEL_FOLDER}/{split}_segmentations/{name[:-len('.jpg')]}.png"


def list_lines(root: str) -> Dict[str, List[str]]:
    """``{"train", "val"}`` list lines of the LIP folder ``root``."""
    if not (os.path.isdir(os.path.join(root, IMAGE_FOLDER)) and os.path.isdir(os.path.join(root, LABEL_FOLDER))):
        raise FileNotFoundError(f"not a LIP folder (no {IMAGE_FOLDER}/ and {LABEL_FOLDER}/ inside): {root}")
    return {split: find_list_lines(root, f"{IMAGE_FOLDER}/{split}_images/*.jpg", annotation_of)
            for split in ("train", "val")}


LIP = DatasetSpec(
    name="lip",
    data_dir="LIP",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    decode_label=annotation_to_train_ids,
    max_label_value=IGNORE_LABEL,
    encode_label=train_ids_to_annotation,
    list_lines=list_lines,
    training=TrainingDefaults(input_size=(473, 473), batch_size=40, learning_rate=7e-3, weight_decay=5e-4,
                              num_steps=115000),
    evaluation=EvaluationDefaults(input_size=(473, 473), whole=True),
    flip_pairs=FLIP_PAIRS,
)
