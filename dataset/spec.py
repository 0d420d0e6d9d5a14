"""What the scripts know about a dataset: :class:`DatasetSpec`, one per dataset (``cityscapes.py``, ``ade20k.py``,
``lip.py``), collected in ``registry.py``.

A spec says how to read the dataset (its list files, its label decoder), how to show and write predictions (class
names, palette, the label encoder of its submission format), how to find its files (its folder layout, turned into
list files by ``python -m dataset.make_lists``), which classes a left-right mirror swaps (its flip pairs) and the
defaults train.py and evaluate.py take for it when a flag is not given. Another dataset is one new module with its
spec, and one line in ``registry.py``.

Decoded labels are train ids ``0 .. num_classes - 1`` with ``dataset.segmentation.IGNORE_LABEL`` (255) for the void
pixels, as uint8.
"""
import colorsys
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from dataset.clips import ClipDataset, FramePath, clip_offsets
from dataset.segmentation import SegmentationDataset
from utils.mirror import mirrored_class_ids

LIST_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "list")  # dataset/list/<name>/<split>.lst


@dataclass(frozen=True)
class TrainingDefaults:
    """train.py's values for flags not given on the command line (the field names are the flags')."""

    input_size: Tuple[int, int]
    batch_size: int
    learning_rate: float
    weight_decay: float
    num_steps: int


@dataclass(frozen=True)
class EvaluationDefaults:
    """evaluate.py's and predict.py's values for flags not given: sliding-window tiles of ``input_size`` or the
    whole image at once (``whole``)."""

    input_size: Tuple[int, int]
    whole: bool


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    Attributes:
        name: the ``--dataset`` value; the list files live in ``dataset/list/<name>/``.
        data_dir: the default ``--data-dir`` (the folder name its archives unpack to).
        class_names: one per train id.
        palette: ``(num_classes, 3)`` uint8 RGB, one colour per train id.
        decode_label: label file pixels ``(H, W)`` uint8 -> train ids (uint8, void = ``IGNORE_LABEL``); a value
            the dataset does not define raises ``ValueError`` with a one-line reason, or is read as void.
        max_label_value: the largest value of the dataset's label table (its label files hold 0 .. this); the
            dataset flags and counts labels with larger values (``SegmentationDataset.label_problems``).
        encode_label: train ids -> the pixel values of the dataset's own label files (its evaluation server's
            format); train ids outside the classes (void) -> the dataset's void value.
        list_lines: data folder -> ``{list name: ["<image>\\t<label>" or "<image>", ...]}`` with paths relative to
            the folder, sorted, ``train`` and ``val`` among them; ``FileNotFoundError`` (one line) when the folder
            does not have the dataset's layout.
        training: train.py's defaults.
        evaluation: evaluate.py's and predict.py's defaults.
        flip_pairs: the pairs of train ids that a left-right mirror turns into each other (a left and a right arm);
            ``--random-mirror`` swaps them in the labels of a mirrored crop and ``--flip`` in the logits of the
            mirrored image (``utils.mirror``). Empty for most datasets.
        frame_path: for a video dataset, ``(labelled image's path in a list, offset) -> the path of the video frame
            that many frames after it`` (relative to the data folder; see ``dataset.clips``); None: no video, clips
            of one frame only.
    """

    name: str
    data_dir: str
    class_names: Tuple[str, ...]
    palette: np.ndarray
    decode_label: Callable[[np.ndarray], np.ndarray]
    max_label_value: int
    encode_label: Callable[[np.ndarray], np.ndarray]
    list_lines: Callable[[str], Dict[str, List[str]]]
    training: TrainingDefaults
    evaluation: EvaluationDefaults
    flip_pairs: Tuple[Tuple[int, int], ...] = ()
    frame_path: Optional[FramePath] = None

    def __post_init__(self):
        if self.palette.shape != (len(self.class_names), 3) or self.palette.dtype != np.uint8:
            raise ValueError(f"{self.name}: the palette must be ({len(self.class_names)}, 3) uint8, got "
                             f"{self.palette.shape} {self.palette.dtype}")
        try:
            mirrored_class_ids(len(self.class_names), self.flip_pairs)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def list_dir(self) -> str:
        """``dataset/list/<name>``: where ``python -m dataset.make_lists`` writes the list files by default."""
        return os.path.join(LIST_ROOT, self.name)

    def list_path(self, split: str) -> str:
        """The default list file of ``split`` (``train``, ``val``, ...)."""
        return os.path.join(self.list_dir, f"{split}.lst")

    def dataset(self, data_dir: str, list_path: str, clip_length: int = 1, frame_stride: int = 1,
                **options) -> SegmentationDataset:
        """The samples of a list file of this dataset (``options``: see :class:`SegmentationDataset`).

        ``clip_length`` 1: images ``(3, h, w)`` per sample (no video frames read); an odd ``clip_length`` T > 1 (a
        video dataset only): clips ``(T, 3, h, w)`` of the frames ``frame_stride`` apart around each labelled
        frame (:class:`dataset.clips.ClipDataset`). ``ValueError`` (one line) for a clip of a dataset without
        video, an even T or a stride below 1.
        """
        clip_offsets(clip_length, frame_stride)
        if clip_length == 1:
            return SegmentationDataset(data_dir, list_path, self.decode_label, max_label_value=self.max_label_value,
                                       flip_pairs=self.flip_pairs, **options)
        if self.frame_path is None:
            raise ValueError(f"{self.name} has no video frames: the clip length must be 1, got {clip_length}")
        return ClipDataset(data_dir, list_path, self.decode_label, self.frame_path, clip_length, frame_stride,
                           max_label_value=self.max_label_value, flip_pairs=self.flip_pairs,
                           **options)

    def training_args(self) -> dict:
        """train.py's defaults by flag name (``dest``), the data folder and the list of ``train`` included."""
        return {"data_dir": self.data_dir, "data_list": self.list_path("train"), "num_classes": self.num_classes,
                **asdict(self.training)}

    def evaluation_args(self) -> dict:
        """evaluate.py's and predict.py's defaults by flag name, the data folder and the list of ``val`` included."""
        return {"data_dir": self.data_dir, "data_list": self.list_path("val"), **asdict(self.evaluation)}


def make_palette(count: int) -> np.ndarray:
    """``(count, 3)`` uint8 RGB colours, all distinct and none black (black is void in the pictures): hues a golden
    angle apart, each at one of three saturations and three brightnesses."""
    colours = []
    for k in range(count):
        hue = (k * 0.6180339887) % 1.0
        saturation = (0.95, 0.7, 0.45)[k % 3]
        value = (0.95, 0.75, 0.55)[(k // 3) % 3]
        colours.append([round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colours, dtype=np.uint8)


def fill_unset(args, values: dict) -> None:
    """Set ``args.<name> = value`` for each item of ``values`` where ``args`` has that attribute and it is None
    (a flag not given on the command line); other attributes are left alone."""
    for name, value in values.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
