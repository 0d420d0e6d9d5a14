"""ADE20K (the MIT Scene Parsing benchmark, ``ADEChallengeData2016``): its layout, list files, 150 classes, a
palette, and its spec (``ADE20K``).

The folder holds ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` (same
stem). An annotation pixel is 0 (void: not evaluated) or 1..150, the classes in the benchmark's order; they become
train ids 0..149 and void the ignore label. Any other value is an error naming the file. The lists: ``train``
(20210 lines on the full dataset) and ``val`` (2000), as ``<image>\\t<label>`` (``dataset.make_lists`` adds
``trainval``).

Defaults: the paper does not give its ADE20K training settings in the text we have, so they are mmsegmentation's
CCNet ADE20K recipe (``configs/ccnet/ccnet_r101-d8_512x512_80k_ade20k.py`` with ``_base_/datasets/ade20k.py``
and ``_base_/schedules/schedule_80k.py``): 512x512 crops, batch 16 (4 GPUs x 4), SGD lr 1e-2, weight decay 5e-4,
poly 0.9, 80000 iterations (its 160k variant scores about the same), whole-image evaluation (``test_cfg
mode='whole'``); docs/ade20k.md compares the rest of the two recipes.
"""
import os
from typing import Dict, List

import numpy as np

from dataset.segmentation import IGNORE_LABEL, find_list_lines
from dataset.spec import DatasetSpec, EvaluationDefaults, TrainingDefaults, make_palette

# The 150 classes in the benchmark's order: annotation value k + 1 = train id k.
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
NUM_CLASSES = len(CLASS_NAMES)  # 150
VOID = 0  # the annotation value of the pixels that are not evaluated
SPLIT_FOLDERS = {"train": "training", "val": "validation"}  # list name -> folder under images/ and annotations/
PALETTE = make_palette(NUM_CLASSES)

# Annotation value -> train id, indexed by the uint8 pixel value.
_ANNOTATION_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.uint8)
_ANNOTATION_TO_TRAIN_ID[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES)


def annotation_to_train_ids(annotation: np.ndarray) -> np.ndarray:
    """Annotation pixels (0 = void, 1..150) -> same-shape uint8 train ids (0..149, void = 255). Any other value
    raises ``ValueError`` saying which."""
    annotation = np.asarray(annotation)
    if annotation.size and (annotation.min() < 0 or annotation.max() > NUM_CLASSES):
        bad = annotation[(annotation < 0) | (annotation > NUM_CLASSES)]
        raise ValueError(f"holds the value {int(bad.flat[0])} ({bad.size} pixels); ADE20K annotations hold 0 "
                         f"(void) and 1..{NUM_CLASSES}: another dataset's labels? (check --dataset)")
    return _ANNOTATION_TO_TRAIN_ID[annotation.astype(np.uint8, copy=False)]


def train_ids_to_annotation(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..149; anything else, e.g. 255, is void) -> same-shape uint8 annotation values (1..150, 0)."""
    train_ids = np.asarray(train_ids).astype(np.int64)
    return np.where((train_ids >= 0) & (train_ids < NUM_CLASSES), train_ids + 1, VOID).astype(np.uint8)


def annotation_of(image: str) -> str:
    """``images/<folder>/<stem>.jpg`` -> ``annotations/<folder>/<stem>.png``."""
    return "annotations" + image[len("images"):-len(".jpg")] + ".png"


def list_lines(root: str) -> Dict[str, List[str]]:
    """``{"train", "val"}`` list lines of the ADEChallengeData2016 folder ``root``."""
    if not (os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "annotations"))):
        raise FileNotFoundError(f"not an ADE20K folder (ADEChallengeData2016: no images/ and annotations/ inside): "
                                f"{root}")
    return {name: find_list_lines(root, f"images/{folder}/*.jpg", annotation_of)
            for name, folder in SPLIT_FOLDERS.items()}


ADE20K = DatasetSpec(
    name="ade20k",
    data_dir="ADEChallengeData2016",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    decode_label=annotation_to_train_ids,
    max_label_value=NUM_CLASSES,
    encode_label=train_ids_to_annotation,
    list_lines=list_lines,
    training=TrainingDefaults(input_size=(512, 512), batch_size=16, learning_rate=1e-2, weight_decay=5e-4,
                              num_steps=80000),
    evaluation=EvaluationDefaults(input_size=(512, 512), whole=True),
)
