"""The Cityscapes label table: label ids (as stored in ``*_gtFine_labelIds.png``) <-> the 19 train ids.

Train ids are what the network predicts (0..18); every other label id maps to ``IGNORE_LABEL``. The table is the
one of cityscapesScripts (``cityscapesscripts.helpers.labels``) restricted to the evaluated classes; the tests
check it against that package.
"""
import numpy as np

from dataset.segmentation import IGNORE_LABEL

NUM_CLASSES = 19
MAX_LABEL_ID = 33  # cityscapesScripts' label ids are 0..33 (and -1, never drawn into the files); more: unknown

# (label id, train id, name, RGB colour) for the 19 evaluated classes, in train-id order.
_EVALUATED_LABELS = (
    (7, 0, "road", (128, 64, 128)),
    (8, 1, "sidewalk", (244, 35, 232)),
    (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)),
    (13, 4, "fence", (190, 153, 153)),
    (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)),
    (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)),
    (22, 9, "terrain", (152, 251, 152)),
    (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)),
    (25, 12, "rider", (255, 0, 0)),
    (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)),
    (28, 15, "bus", (0, 60, 100)),
    (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)),
    (33, 18, "bicycle", (119, 11, 32)),
)

CLASS_NAMES = tuple(name for _, _, name, _ in _EVALUATED_LABELS)
PALETTE = np.array([colour for _, _, _, colour in _EVALUATED_LABELS], dtype=np.uint8)  # (19, 3) RGB

# Lookup tables indexed by the uint8 pixel value.
_LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.uint8)
_TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)  # ignored / unknown train ids -> 0 ("unlabeled")
for _label_id, _train_id, _, _ in _EVALUATED_LABELS:
    _LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
    _TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id


def _as_uint8_indices(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{what} must lie in 0..255, got values in {array.min()}..{array.max()}")
    return array.astype(np.uint8, copy=False)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Any-shape array of Cityscapes label ids -> same-shape uint8 train ids (0..18, 255 = ignore)."""
    return _LABEL_ID_TO_TRAIN_ID[_as_uint8_indices(label_ids, "label ids")]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Any-shape array of train ids (0..18; anything else, e.g. 255) -> same-shape uint8 label ids (0 = unlabeled)."""
    return _TRAIN_ID_TO_LABEL_ID[_as_uint8_indices(train_ids, "train ids")]
