"""CamVid (the SegNet release): its layout, its list files, its 11 classes, its video frames and its spec (``CAMVID``).

The folder holds ``train/ trainannot/ val/ valannot/ test/ testannot/`` (367 / 101 / 233 labelled frames of 360x480
on the full release), an image and its annotation with one name, ``<sequence>_<frame>.png`` in the release's two
styles: ``0001TP_006690.png`` and ``Seq05VD_f00030.png``. An annotation pixel is a class 0..10 (sky, building, pole,
road, pavement, tree, sign-symbol, fence, car, pedestrian, bicyclist: the train ids) or 11, void (the ignore
label); a larger value is read as void and counted. The lists ``train``, ``val`` and ``test`` (``dataset.make_lists``
adds ``trainval``) are ``<split>/<name>.png\\t<split>annot/<name>.png``.

Video: the clips of the video network read the other frames of a labelled frame's sequence from
``frames/<sequence>/``, named as the labelled frames are (``frames/0001TP/0001TP_006691.png``,
``frames/Seq05VD/Seq05VD_f00031.png``: the same prefix and number of digits), which the user extracts from CamVid's
videos (docs/camvid.md). A clip reaching before a video's first frame repeats frame 0.

Defaults: the paper gives no CamVid recipe in the text we have, so every number is our choice: 360x480 crops (the
release's frame size: at scale 1 a crop is a whole frame), batch 8, SGD lr 1e-2 and weight decay 1e-4 (the paper's
Cityscapes recipe), 10000 iterations (about 218 epochs of the 367 training frames), whole-frame evaluation.
docs/camvid.md adds the clip length and stride.
"""
import os
import re
from typing import Dict, List

import numpy as np

from dataset.segmentation import IGNORE_LABEL, find_list_lines
from dataset.spec import DatasetSpec, EvaluationDefaults, TrainingDefaults

CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign-symbol", "fence", "car", "pedestrian",
               "bicyclist")
NUM_CLASSES = len(CLASS_NAMES)  # 11
VOID = 11  # the annotation value of the unlabelled pixels
# The SegNet release's colours of the classes, RGB, in train-id order.
PALETTE = np.array([(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)], dtype=np.uint8)
SPLITS = ("train", "val", "test")
FRAME_FOLDER = "frames"
# <sequence>_<prefix><number>.png: 0001TP_006690.png (no prefix, 6 digits), Seq05VD_f00030.png (prefix f, 5 digits)
FRAME_NAME = re.compile(r"(?P<sequence>.+)_(?P<prefix>[A-Za-z]*)(?P<number>\d+)\.png")

_ANNOTATION_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.uint8)
_ANNOTATION_TO_TRAIN_ID[:NUM_CLASSES] = np.arange(NUM_CLASSES)


def annotation_to_train_ids(annotation: np.ndarray) -> np.ndarray:
    """Annotation pixels (0..10 the classes, 11 void; larger: unknown, read as void) -> same-shape uint8 train ids
    (void = 255)."""
    return _ANNOTATION_TO_TRAIN_ID[np.asarray(annotation).astype(np.uint8, copy=False)]


def train_ids_to_annotation(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..10; anything else, e.g. 255, is void) -> same-shape uint8 annotation values (0..10, 11)."""
    train_ids = np.asarray(train_ids).astype(np.int64)
    return np.where((train_ids >= 0) & (train_ids < NUM_CLASSES), train_ids, VOID).astype(np.uint8)


def frame_path(image: str, offset: int) -> str:
    """The path of the video frame ``offset`` frames after the labelled frame ``image`` (a list's path, e.g.
    ``train/0001TP_006690.png``): ``frames/0001TP/0001TP_006691.png`` for ``offset`` 1 (frame numbers below 0
    become 0). ``ValueError`` (one line) for a name not of the form ``<sequence>_<frame>.png``."""
    name = os.path.basename(image)
    match = FRAME_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{image}: a CamVid frame is named <sequence>_<frame number>.png (0001TP_006690.png, "
                         "Seq05VD_f00030.png); cannot find its video frames")
    sequence, prefix, number = match["sequence"], match["prefix"], match["number"]
    frame = max(int(number) + offset, 0)
    return f"{FRAME_FOLDER}/{sequence}/{sequence}_{prefix}{frame:0{len(number)}d}.png"


def list_lines(root: str) -> Dict[str, List[str]]:
    """``{"train", "val", "test"}`` list lines of the CamVid folder ``root`` (a split without images: no lines)."""
    if not (os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "trainannot"))):
        raise FileNotFoundError(f"not a CamVid folder (SegNet's layout: no train/ and trainannot/ inside): {root}")
    return {split: find_list_lines(root, f"{split}/*.png", lambda image, split=split: f"{split}annot/"
                                   + os.path.basename(image)) for split in SPLITS}


CAMVID = DatasetSpec(
    name="camvid",
    data_dir="CamVid",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    decode_label=annotation_to_train_ids,
    max_label_value=VOID,
    encode_label=train_ids_to_annotation,
    list_lines=list_lines,
    training=TrainingDefaults(input_size=(360, 480), batch_size=8, learning_rate=1e-2, weight_decay=1e-4,
                              num_steps=10000),
    evaluation=EvaluationDefaults(input_size=(360, 480), whole=True),
    frame_path=frame_path,
)
