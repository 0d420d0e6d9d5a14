"""Predictions (train ids) as files and pictures: paletted PNGs in the Cityscapes colours, label-id PNGs (the
format of cityscapesScripts' evaluation and of the test server) and colour overlays."""
import os

import numpy as np
from PIL import Image

from dataset.labels import PALETTE, train_ids_to_label_ids


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` train ids -> ``(H, W, 3)`` uint8 RGB in the Cityscapes colours (ignore / unknown ids: black)."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[: len(PALETTE)] = PALETTE
    return lookup[np.asarray(train_ids, dtype=np.uint8)]


def overlay(image_bgr: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR image blended with the colorized ``(H, W)`` prediction -> ``(H, W, 3)`` uint8 BGR."""
    colours = colorize(train_ids)[..., ::-1].astype(np.float32)
    return np.clip((1 - alpha) * image_bgr.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def save_paletted_png(path: str, train_ids: np.ndarray) -> None:
    """Write ``(H, W)`` train ids as a paletted PNG: pixel index = train id, palette = the Cityscapes colours."""
    image = Image.fromarray(np.asarray(train_ids, dtype=np.uint8))
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(PALETTE)] = PALETTE
    image.putpalette(palette.tobytes())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def save_label_ids_png(path: str, train_ids: np.ndarray) -> None:
    """Write ``(H, W)`` train ids as a single-channel PNG of Cityscapes label ids (what cityscapesScripts'
    evaluation and the test server read)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(train_ids_to_label_ids(train_ids)).save(path)
