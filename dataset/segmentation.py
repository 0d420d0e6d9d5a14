"""List files and the dataset that reads them, with the original CCNet training augmentation; for any dataset
(its label decoder is given: see ``dataset.spec``).

A list file has one sample per line, paths relative to the data dir: ``<image>\\t<label>`` (train/val lists) or
``<image>`` (test lists). Labels are read as the dataset stores them and decoded to train ids here.

Augmentation (training=True), in the original order: random scale ``0.7 + randint(0, 14) / 10`` (image bilinear,
label nearest, on the uint8 image), ``preprocess_image`` (BGR minus mean), pad bottom/right to the crop (image 0,
label ignored), random crop, HWC->CHW, horizontal flip with p = 0.5; a mirrored crop's labels swap the dataset's flip
pairs (a left arm seen in a mirror is a right arm: ``utils.mirror``). The same random draws and values are computed in
fewer passes: the crop is cut from the scaled uint8 image and preprocessed alone, straight into its (mirrored) place
in the padded CHW sample.

Reproducibility: each sample's random draws come from its own generator seeded with ``(seed, epoch, index)``,
so an epoch's augmentations do not depend on the number of workers, on which worker loads which sample, or on
where a resumed run starts. Call ``set_epoch`` before each epoch (before the DataLoader iterator is created).
"""
import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.transforms import image_to_tensor, preprocess_chw
from utils.cli import path_problem
from utils.mirror import FlipPairs, mirrored_class_ids

IGNORE_LABEL = 255  # train id of the void pixels in decoded labels, and of the padding of training crops
MIN_SCALE = 0.7  # > 0.5: cv2.resize rounds a side to the nearest pixel, so even a 1x1 image keeps 1 pixel a side
NUM_SCALES = 15  # 0.7, 0.8, ..., 2.1
# The problems a label can have that do not stop a run: a bit each in ``SegmentationDataset.label_flags``, with
# the name they are counted under and what they say of the labels that have them.
UNKNOWN_VALUES = 1
NO_VALID_PIXEL = 2
LABEL_PROBLEMS = {UNKNOWN_VALUES: ("unknown_values", "hold values outside the dataset's label table (read as void)"),
                  NO_VALID_PIXEL: ("no_valid_pixel", "have no valid pixel (all void)")}
TRAIN_ID_HINT = " (train-id labels? pass the label-id files, *_labelIds.png)"


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

    check_files: also check that every listed file exists, is not empty and may be read (a stat per file), and that
    every label is a single-channel 8-bit image (its header, no pixels decoded): cheap even for 3475 lines, so that
    a bad file at line 480 stops the run before the first image, not after 479.
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
                        problem = path_problem(path)
                        problem = "file not found" if problem == "no such file" else problem
                        raise DataError(f"{where}: {problem}: {path}{hint}")
                    if path is not None and os.path.getsize(path) == 0:
                        raise DataError(f"{where}: empty file: {path}")
                    if path is not None and not os.access(path, os.R_OK):
                        raise DataError(f"{where}: no permission to read {path}")
                if label_path is not None:
                    _check_label_header(label_path, where)
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


def _decode(path: str, flags: int) -> Tuple[Optional[np.ndarray], str]:
    """``cv2.imread(path, flags)`` and what its decoder printed meanwhile: libjpeg reports a truncated or corrupt
    JPEG only as a warning on the process's stderr ("Premature end of JPEG file") and returns the image with its
    missing part grey. The stderr file descriptor is a pipe for the call (a data-loading process reads one image at
    a time); its writing end does not block, so a decoder that says more than the pipe holds loses the rest (the
    first words are the cause)."""
    sys.stderr.flush()
    saved = os.dup(2)
    reading, writing = os.pipe()
    try:
        os.set_blocking(writing, False)
        os.dup2(writing, 2)
        try:
            image = cv2.imread(path, flags)
        finally:
            os.dup2(saved, 2)
            os.close(writing)
        os.set_blocking(reading, False)
        try:
            said = os.read(reading, 4096)
        except BlockingIOError:
            said = b""
    finally:
        os.close(reading)
        os.close(saved)
    return image, said.decode(errors="replace").strip()


# libpng's warnings about an ancillary chunk (its type starts with a lowercase letter: iCCP, sRGB, tEXt, ...): a
# colour profile or text that libpng drops, the pixels being read as stored; every other warning is damage.
_METADATA_WARNING = re.compile(r"^libpng warning: [a-z][A-Za-z]{3}: ")


def read_image_file(path: str, flags: int = cv2.IMREAD_COLOR, what: str = "image", where: str = "") -> np.ndarray:
    """The pixels of the image or label file ``path`` (``what``: "image" or "label"; ``where``: the list line, or
    empty); a file the decoder cannot read, or reads with a warning (a truncated JPEG), raises ``DataError`` naming
    ``where`` and the file. libpng's warnings about a PNG's metadata (a broken colour profile) are not damage: the
    pixels are read as stored."""
    where = f"{where}: " if where else ""
    image, said = _decode(path, flags)
    damage = [line for line in said.splitlines() if line.strip() and not _METADATA_WARNING.match(line)]
    if damage:
        raise DataError(f"{where}{what} {path} is damaged: the decoder says {' / '.join(damage)!r}")
    if image is None:
        problem = path_problem(path) if not os.access(path, os.R_OK) else "not a readable image file"
        raise DataError(f"{where}cannot read {what} {path} ({problem})")
    return image


def _read_image(entry: ListEntry, where: str) -> np.ndarray:
    return read_image_file(entry.image_path, cv2.IMREAD_COLOR, "image", where)


def _check_label_format(path: str, where: str, channels: int, pixel_type: str) -> None:
    """Raise ``DataError`` unless the label file ``path`` has one channel of uint8 pixels."""
    if channels != 1:
        raise DataError(f"{where}: label {path} has {channels} channels (a colour image?): a label file holds one id "
                        "per pixel in a single channel, e.g. *_gtFine_labelIds.png, not *_gtFine_color.png")
    if pixel_type != "uint8":
        raise DataError(f"{where}: label {path} has {pixel_type} pixels: label files are 8-bit")


# PIL image modes that are not 8-bit grey: the channels and pixel type OpenCV reads them as (a paletted image: BGR)
_PIL_MODE_FORMATS = {"P": (3, "uint8"), "I;16": (1, "uint16"), "I;16B": (1, "uint16"), "I;16L": (1, "uint16"),
                     "I": (1, "int32"), "F": (1, "float32")}


def _check_label_header(path: str, where: str) -> None:
    """:func:`_check_label_format` from the file's header (PIL reads no pixels): a colour or 16-bit label is refused
    when the list is read, before any image is. An unreadable header is left to the full read."""
    try:
        with Image.open(path) as label:
            mode, bands = label.mode, len(label.getbands())
    except (OSError, ValueError):
        return
    _check_label_format(path, where, *_PIL_MODE_FORMATS.get(mode, (bands, "uint8")))


def _read_label(entry: ListEntry, image_shape: tuple, where: str) -> np.ndarray:
    """The label file's pixels as stored, ``(H, W)`` uint8; a colour (or paletted, or grey + alpha) image, a 16-bit
    one, or one of another size than its image raises ``DataError``. (Read unchanged: ``IMREAD_GRAYSCALE`` would
    turn a colour image into plausible-looking grey values without a word.)"""
    label = read_image_file(entry.label_path, cv2.IMREAD_UNCHANGED, "label", where)
    _check_label_format(entry.label_path, where, 1 if label.ndim == 2 else label.shape[2], str(label.dtype))
    if label.shape != image_shape[:2]:
        raise DataError(f"{where}: label {entry.label_path} is {label.shape[0]}x{label.shape[1]} but its image "
                        f"is {image_shape[0]}x{image_shape[1]}")
    return label


class SegmentationDataset(Dataset):
    """Samples of a list file; ``decode_label`` turns a label file's pixels into train ids (``dataset.spec``).

    training=True: ``(image float32 (3, crop_h, crop_w), label int64 (crop_h, crop_w), name)``, augmented; with
    ``mirror``, the labels of a mirrored crop have the two train ids of each of ``flip_pairs`` swapped.
    training=False: ``(image float32 (3, H, W), label int64 (H, W) or None, name)``: the full preprocessed image,
    no augmentation; label is None for image-only (test) lists. Label values: train ids, ``ignore_label`` = void
    (the pixels the dataset leaves unevaluated, and the padding; any integer outside the train ids, e.g. 255 or -1).

    Labels: a colour or 16-bit label file, or one of another size than its image, raises ``DataError`` naming it.
    Labels that can be read but look wrong are flagged in ``label_flags``, ``(len(self),)`` uint8 in shared memory,
    one bit per problem of :data:`LABEL_PROBLEMS`: values above ``max_label_value`` (a Cityscapes label id above 33,
    e.g. the 255 of a train-id label) and no valid pixel at all. A sample's bits are set by whichever process reads
    it (a DataLoader worker writes into the same shared memory), so once the samples are loaded the process that
    made the dataset sees them all: :meth:`label_problems`. The first label of each problem is also named in a
    warning line on stderr by the process that reads it: once in a single process; with DataLoader workers, by each
    worker that meets one before any is recorded (at most one line per worker, none in later epochs).
    """

    def __init__(self, data_dir: str, list_path: str, decode_label: Callable[[np.ndarray], np.ndarray],
                 crop_size=(769, 769), scale: bool = False, mirror: bool = False, ignore_label: int = IGNORE_LABEL,
                 training: bool = True, seed: int = 0, max_label_value: int = 255, flip_pairs: FlipPairs = ()):
        self.entries = read_list(data_dir, list_path)
        self.list_path = list_path
        self.decode_label = decode_label
        self.max_label_value = max_label_value
        self.label_flags = torch.zeros(len(self.entries), dtype=torch.uint8).share_memory_()
        self.crop_h, self.crop_w = crop_size
        self.scale = scale
        self.mirror = mirror
        # uint8 train id (void 255 included) -> its id in the mirrored crop; None: a mirror changes no class
        self.mirrored_ids = mirrored_class_ids(IGNORE_LABEL + 1, flip_pairs).astype(np.uint8) if flip_pairs else None
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
        frames = self._read_frames(index, where)
        labelled = frames[len(frames) // 2]
        label = None if entry.label_path is None else self._read_train_ids(index, labelled.shape, where)
        if not self.training:
            label = None if label is None else torch.from_numpy(self._with_ignore_label(label))
            return self._sample_images(torch.cat([image_to_tensor(frame) for frame in frames])), label, entry.name
        rng = np.random.default_rng((self.seed, self.epoch, index))
        images, label = self._augment(frames, label, rng)
        label = torch.from_numpy(self._with_ignore_label(label))
        return self._sample_images(torch.from_numpy(images)), label, entry.name

    def _read_frames(self, index: int, where: str) -> List[np.ndarray]:
        """The images of sample ``index``, uint8 BGR ``(H, W, 3)``, the labelled one at the centre: here the listed
        image alone (``dataset.clips.ClipDataset``: the frames of its clip)."""
        return [_read_image(self.entries[index], where)]

    def _sample_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(T, 3, h, w)`` float32 frames -> the sample's image tensor: the one image ``(3, h, w)`` here (a clip
        dataset keeps the ``(T, 3, h, w)`` stack)."""
        return images[0]

    def _read_train_ids(self, index: int, image_shape: tuple, where: str) -> np.ndarray:
        """The label of sample ``index`` as uint8 train ids ``(H, W)`` (void = ``IGNORE_LABEL``); flags (and names,
        the first time) a label with values outside the dataset's table or without a valid pixel."""
        entry = self.entries[index]
        label = _read_label(entry, image_shape, where)
        try:
            train_ids = self.decode_label(label)
        except ValueError as error:
            raise DataError(f"{where}: label {entry.label_path} {error}") from None
        problems = {}
        if label.max(initial=0) > self.max_label_value:
            unknown = np.unique(label[label > self.max_label_value])
            shown = ", ".join(str(value) for value in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            problems[UNKNOWN_VALUES] = (f"holds values outside the dataset's label table 0..{self.max_label_value} "
                                        f"({shown}), read as void"
                                        + (TRAIN_ID_HINT if IGNORE_LABEL in unknown else ""))
        if not (train_ids != IGNORE_LABEL).any():
            problems[NO_VALID_PIXEL] = "has no valid pixel: all void, nothing to learn or score"
        for bit, problem in problems.items():
            first = not (self.label_flags & bit).any()
            self.label_flags[index] |= bit
            if first:
                print(f"warning: {where}: label {entry.label_path} {problem} (further labels like it are counted, "
                      "not named)", file=sys.stderr, flush=True)
        return train_ids

    def label_problems(self, flags: Optional[torch.Tensor] = None) -> Dict[str, List[ListEntry]]:
        """The labels of each problem of :data:`LABEL_PROBLEMS`, by its name (``unknown_values``,
        ``no_valid_pixel``), among the samples read so far; ``flags``: ``(len(self),)`` bits to read instead of
        ``label_flags`` (e.g. those of every process of a distributed run, summed: each sets only its share)."""
        flags = self.label_flags if flags is None else flags
        return {name: [self.entries[i] for i in torch.nonzero(flags & bit).flatten().tolist()]
                for bit, (name, _) in LABEL_PROBLEMS.items()}

    def describe_label_problems(self, problems: Dict[str, List[ListEntry]]) -> List[str]:
        """One line per problem of ``problems`` (from :meth:`label_problems`) that some label has: how many, and
        the first one."""
        lines = []
        for name, description in LABEL_PROBLEMS.values():
            if problems[name]:
                first = problems[name][0]
                hint = TRAIN_ID_HINT if name == "unknown_values" else ""
                lines.append(f"{len(problems[name])} of {len(self)} labels {description}{hint}; the first: "
                             f"{self.list_path} line {first.line}, {first.label_path}")
        return lines

    def _with_ignore_label(self, label: np.ndarray) -> np.ndarray:
        """uint8 train ids with void = ``IGNORE_LABEL`` (255) -> int64 with void = ``self.ignore_label``."""
        label = label.astype(np.int64)
        if self.ignore_label != IGNORE_LABEL:
            label[label == IGNORE_LABEL] = self.ignore_label
        return label

    def _augment(self, frames: List[np.ndarray], label: np.ndarray, rng: np.random.Generator):
        """uint8 BGR frames (H, W, 3) + uint8 train ids (H, W) -> float32 (T, 3, crop_h, crop_w) + uint8 (crop_h,
        crop_w), void (and padding) = ``IGNORE_LABEL``. One draw of scale, crop and mirror for all the frames (a
        clip's frames are augmented alike; an image is a clip of one frame)."""
        if self.scale:
            factor = MIN_SCALE + rng.integers(0, NUM_SCALES) / 10.0
            frames = [cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
                      for frame in frames]
            label = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        # the crop's offset in the image padded bottom/right to at least the crop size
        top = rng.integers(0, max(label.shape[0], self.crop_h) - self.crop_h + 1)
        left = rng.integers(0, max(label.shape[1], self.crop_w) - self.crop_w + 1)
        # smaller than the crop where padded
        frames = [frame[top:top + self.crop_h, left:left + self.crop_w] for frame in frames]
        label = label[top:top + self.crop_h, left:left + self.crop_w]
        # the padding: 0 after preprocessing
        sample_image = np.zeros((len(frames), 3, self.crop_h, self.crop_w), np.float32)
        sample_label = np.full((self.crop_h, self.crop_w), IGNORE_LABEL, np.uint8)
        image_target, label_target = sample_image, sample_label
        if self.mirror and rng.integers(0, 2):  # the padded crop mirrored: write it into mirrored views
            image_target, label_target = sample_image[..., ::-1], sample_label[:, ::-1]
            if self.mirrored_ids is not None:
                label = self.mirrored_ids[label]
        height, width = label.shape
        for frame, target in zip(frames, image_target):
            preprocess_chw(frame, out=target[:, :height, :width])
        label_target[:height, :width] = label
        return sample_image, sample_label


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers: one OpenCV thread each (the workers are the parallelism), no oversubscription."""
    cv2.setNumThreads(1)
