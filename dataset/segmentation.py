"""List files and the dataset that reads them, with the original CCNet training augmentation; for any dataset
(its label decoder is given: see ``dataset.spec``).

A list file has one sample per line, paths relative to the data dir: ``<image>\\t<label>`` (train/val lists) or
``<image>`` (test lists). Labels are read as the dataset stores them and decoded to train ids here.

Augmentation (training=True), in the original order: random scale ``0.7 + randint(0, 14) / 10`` (image bilinear,
label nearest, on the uint8 image), ``preprocess_image`` (BGR minus mean), pad bottom/right to the crop (image 0,
label ignored), random crop, HWC->CHW, horizontal flip with p = 0.5. The same random draws and values are computed in
fewer passes: the crop is cut from the scaled uint8 image and preprocessed alone, straight into its (mirrored) place
in the padded CHW sample.

Reproducibility: each sample's random draws come from its own generator seeded with ``(seed, epoch, index)``,
so an epoch's augmentations do not depend on the number of workers, on which worker loads which sample, or on
where a resumed run starts. Call ``set_epoch`` before each epoch (before the DataLoader iterator is created).
"""
import glob
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.transforms import image_to_tensor, preprocess_chw

IGNORE_LABEL = 255  # train id of the void pixels in decoded labels, and of the padding of training crops
MIN_SCALE = 0.7
NUM_SCALES = 15  # 0.7, 0.8, ..., 2.1


class DataError(RuntimeError):
    """Bad data (missing folder/list/file, unreadable image, size mismatch), with a one-line message.

    A DataLoader worker's exception comes back to the main process as ``DataError(<"Caught ... Original
    Traceback ..." text>)``; the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rstrip().splitlines()[-1].split(marker, 1)[1]
        super().__init__(message)


@dataclass(frozen=True)
class ListEntry:
    image_path: str  # the image's path, the data dir joined
    label_path: str | None  # the label's path, the data dir joined; None in image-only (test) lists
    name: str  # the image path as written in the list (relative to the data dir)
    line: int  # 1-based line number in the list file, for error messages


def read_list(data_dir: str, list_path: str, check_files: bool = True) -> list[ListEntry]:
    """Parse a list file; raise ``DataError`` naming the file and line for anything wrong.

    check_files: also check that every listed file exists (a stat per file: cheap even for 3475 lines).
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir not found: {data_dir}")
    if not os.path.isfile(list_path):
        raise DataError(f"list file not found: {list_path} (`python -m dataset.make_lists DATA_DIR [--dataset NAME]` "
                        "writes train/val/... .lst to dataset/list/NAME/)")
    entries = []
    with open(list_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]  # paths may hold spaces
            where = f"{list_path} line {line_number}"
            if len(fields) > 2 or not all(fields):
                raise DataError(f"{where}: expected '<image>[<tab><label>]', got {len(fields)} tab-separated "
                                f"fields: {line.strip()!r}")
            image_path = os.path.join(data_dir, fields[0])
            label_path = os.path.join(data_dir, fields[1]) if len(fields) == 2 else None
            if check_files:
                for path in (image_path, label_path):
                    if path is not None and not os.path.isfile(path):
                        hint = ""
                        if label_path is None and len(fields[0].split()) == 2:
                            hint = " (image and label must be separated by a tab, not spaces)"
                        raise DataError(f"{where}: file not found: {path}{hint}")
            entries.append(ListEntry(image_path, label_path, fields[0], line_number))
    if not entries:
        raise DataError(f"list file has no entries: {list_path}")
    return entries


def find_list_lines(root: str, image_pattern: str, label_of: Optional[Callable[[str], str]] = None) -> List[str]:
    """Sorted list lines of the images matching ``image_pattern`` (a glob relative to ``root``): ``<image>\\t<label>``
    with ``label_of(image)`` the label's path, or ``<image>`` alone without ``label_of``; paths relative to ``root``,
    '/'-separated. An image whose label is missing raises ``FileNotFoundError`` naming both."""
    lines = []
    for path in sorted(glob.glob(os.path.join(root, image_pattern))):
        image = os.path.relpath(path, root).replace(os.sep, "/")
        if label_of is None:
            lines.append(image)
            continue
        label = label_of(image)
        if not os.path.isfile(os.path.join(root, label)):
            raise FileNotFoundError(f"label missing for {image}: {os.path.join(root, label)}")
        lines.append(f"{image}\t{label}")
    return lines


def _read_image(entry: ListEntry, where: str) -> np.ndarray:
    image = cv2.imread(entry.image_path, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{where}: cannot read image {entry.image_path}")
    return image


def _read_train_ids(entry: ListEntry, image_shape: tuple, where: str, decode_label) -> np.ndarray:
    label = cv2.imread(entry.label_path, cv2.IMREAD_GRAYSCALE)
    if label is None:
        raise DataError(f"{where}: cannot read label {entry.label_path}")
    if label.shape != image_shape[:2]:
        raise DataError(f"{where}: label {entry.label_path} is {label.shape[0]}x{label.shape[1]} but its image "
                        f"is {image_shape[0]}x{image_shape[1]}")
    try:
        return decode_label(label)
    except ValueError as error:
        raise DataError(f"{where}: label {entry.label_path} {error}") from None


class SegmentationDataset(Dataset):
    """Samples of a list file; ``decode_label`` turns a label file's pixels into train ids (``dataset.spec``).

    training=True: ``(image float32 (3, crop_h, crop_w), label int64 (crop_h, crop_w), name)``, augmented.
    training=False: ``(image float32 (3, H, W), label int64 (H, W) or None, name)``: the full preprocessed image,
    no augmentation; label is None for image-only (test) lists. Label values: train ids, ``ignore_label`` = void
    (the pixels the dataset leaves unevaluated, and the padding; any integer outside the train ids, e.g. 255 or -1).
    """

    def __init__(self, data_dir: str, list_path: str, decode_label: Callable[[np.ndarray], np.ndarray],
                 crop_size=(769, 769), scale: bool = False, mirror: bool = False, ignore_label: int = IGNORE_LABEL,
                 training: bool = True, seed: int = 0):
        self.entries = read_list(data_dir, list_path)
        self.list_path = list_path
        self.decode_label = decode_label
        self.crop_h, self.crop_w = crop_size
        self.scale = scale
        self.mirror = mirror
        self.ignore_label = ignore_label
        self.training = training
        self.seed = seed
        self.epoch = 0
        if training and any(entry.label_path is None for entry in self.entries):
            raise DataError(f"{list_path}: training needs '<image><tab><label>' lines, found image-only lines")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (takes effect for DataLoader iterators created afterwards)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        entry = self.entries[index]
        where = f"{self.list_path} line {entry.line}"
        image = _read_image(entry, where)
        label = None if entry.label_path is None else _read_train_ids(entry, image.shape, where, self.decode_label)
        if not self.training:
            label = None if label is None else torch.from_numpy(self._with_ignore_label(label))
            return image_to_tensor(image)[0], label, entry.name
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image, label = self._augment(image, label, rng)
        return torch.from_numpy(image), torch.from_numpy(self._with_ignore_label(label)), entry.name

    def _with_ignore_label(self, label: np.ndarray) -> np.ndarray:
        """uint8 train ids with void = ``IGNORE_LABEL`` (255) -> int64 with void = ``self.ignore_label``."""
        label = label.astype(np.int64)
        if self.ignore_label != IGNORE_LABEL:
            label[label == IGNORE_LABEL] = self.ignore_label
        return label

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """uint8 BGR (H, W, 3) + uint8 train ids (H, W) -> float32 (3, crop_h, crop_w) + uint8 (crop_h, crop_w),
        void (and padding) = ``IGNORE_LABEL``."""
        if self.scale:
            factor = MIN_SCALE + rng.integers(0, NUM_SCALES) / 10.0
            image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        # the crop's offset in the image padded bottom/right to at least the crop size
        top = rng.integers(0, max(label.shape[0], self.crop_h) - self.crop_h + 1)
        left = rng.integers(0, max(label.shape[1], self.crop_w) - self.crop_w + 1)
        image = image[top:top + self.crop_h, left:left + self.crop_w]  # smaller than the crop where padded
        label = label[top:top + self.crop_h, left:left + self.crop_w]
        sample_image = np.zeros((3, self.crop_h, self.crop_w), np.float32)  # the padding: 0 after preprocessing
        sample_label = np.full((self.crop_h, self.crop_w), IGNORE_LABEL, np.uint8)
        image_target, label_target = sample_image, sample_label
        if self.mirror and rng.integers(0, 2):  # the padded crop mirrored: write it into mirrored views
            image_target, label_target = sample_image[:, :, ::-1], sample_label[:, ::-1]
        height, width = label.shape
        preprocess_chw(image, out=image_target[:, :height, :width])
        label_target[:height, :width] = label
        return sample_image, sample_label


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers: one OpenCV thread each (the workers are the parallelism), no oversubscription."""
    cv2.setNumThreads(1)
