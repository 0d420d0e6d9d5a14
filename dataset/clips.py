"""Clips of video frames around the labelled frames of a list file, for the video network.

A sample is the labelled frame of a list line and its neighbours in the video: ``clip_length`` T (odd) frames
``frame_stride`` S apart, the labelled frame at the centre: the frames at offsets ``(k - T // 2) * S`` for
``k = 0 .. T-1``. The dataset's spec says where the frame at an offset is (``DatasetSpec.frame_path``: CamVid's
``frames/<sequence>/<sequence>_<number>.png``). Every frame of every clip is checked when the list is read (exists,
not empty, readable), so a missing frame stops a run before its first step with one line naming the file.

Augmentation and preprocessing are the image dataset's (``dataset.segmentation``): one draw of scale, crop and
mirror for the whole clip.
"""
import os
from dataclasses import replace
from typing import Callable, List

import numpy as np
import torch

from dataset.segmentation import DataError, ListEntry, SegmentationDataset, _read_image

FramePath = Callable[[str, int], str]  # (the labelled image's path in the list, frame offset) -> the frame's path


def clip_offsets(clip_length: int, frame_stride: int) -> List[int]:
    """Frame offsets of a clip from its labelled (centre) frame: ``[-(T//2) * S, ..., 0, ..., (T//2) * S]``."""
    if clip_length < 1 or clip_length % 2 == 0:
        raise ValueError(f"clip_length must be odd and >= 1 (the labelled frame at the centre), got {clip_length}")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    return [(k - clip_length // 2) * frame_stride for k in range(clip_length)]


class ClipDataset(SegmentationDataset):
    """Samples of a list file as clips: ``(images float32 (T, 3, h, w), label int64 (h, w) or None, name)``, the
    label the centre frame's; ``h, w`` the crop (training) or the frames' size (evaluation). The labelled frame is
    read from the list's image path; the others from ``frame_path(image path, offset)`` (paths relative to
    ``data_dir``). Other arguments: :class:`dataset.segmentation.SegmentationDataset`.

    Raises:
        DataError: a frame of a clip is missing, empty or unreadable (when the list is read), or has another size
            than its labelled frame (when the clip is read).
    """

    def __init__(self, data_dir: str, list_path: str, decode_label, frame_path: FramePath, clip_length: int,
                 frame_stride: int = 1, **options):
        offsets = clip_offsets(clip_length, frame_stride)
        super().__init__(data_dir, list_path, decode_label, **options)
        self.clip_length, self.frame_stride = clip_length, frame_stride
        self.frame_paths = []  # per sample, the paths of its clip's frames; None at the centre (the listed image)
        for entry in self.entries:
            try:
                paths = [None if offset == 0 else os.path.join(data_dir, frame_path(entry.name, offset))
                         for offset in offsets]
            except ValueError as error:
                raise DataError(f"{list_path} line {entry.line}: {error}") from None
            for path in paths:
                if path is not None:
                    _check_frame(path, entry, list_path, clip_length, frame_stride)
            self.frame_paths.append(paths)

    def _read_frames(self, index: int, where: str) -> List[np.ndarray]:
        entry = self.entries[index]
        labelled = _read_image(entry, where)
        frames = []
        for path in self.frame_paths[index]:
            if path is None:
                frames.append(labelled)
                continue
            frame = _read_image(replace(entry, image_path=path), where)
            if frame.shape != labelled.shape:
                raise DataError(f"{where}: frame {path} is {frame.shape[0]}x{frame.shape[1]} but its labelled frame "
                                f"{entry.image_path} is {labelled.shape[0]}x{labelled.shape[1]}")
            frames.append(frame)
        return frames

    def _sample_images(self, images: torch.Tensor) -> torch.Tensor:
        return images


def _check_frame(path: str, entry: ListEntry, list_path: str, clip_length: int, frame_stride: int) -> None:
    where = f"{list_path} line {entry.line}"
    clip = f"clip of {clip_length} frames at stride {frame_stride} around {entry.name}"
    if not os.path.isfile(path):
        raise DataError(f"{where}: frame not found: {path} ({clip}; docs/camvid.md says how to extract the frames)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{where}: empty frame: {path} ({clip})")
    if not os.access(path, os.R_OK):
        raise DataError(f"{where}: no permission to read {path} ({clip})")
