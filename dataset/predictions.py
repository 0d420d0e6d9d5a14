"""Predictions (train ids) as files and pictures, in a dataset's colours (``DatasetSpec.palette``): paletted PNGs,
label PNGs in the dataset's own format (``DatasetSpec.encode_label``: Cityscapes label ids for cityscapesScripts
and the test server, ADE20K's 1..150) and colour overlays."""
import numpy as np
from PIL import Image

from utils.outputs import atomic_output


def _palette_lookup(palette: np.ndarray) -> np.ndarray:
    """``(K, 3)`` uint8 RGB -> ``(256, 3)``: one colour per possible uint8 train id, black beyond the classes."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[: len(palette)] = palette
    return lookup


def colorize(train_ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` train ids -> ``(H, W, 3)`` uint8 RGB in the ``(K, 3)`` ``palette`` (ignore / unknown ids: black)."""
    return _palette_lookup(palette)[np.asarray(train_ids, dtype=np.uint8)]


def overlay(image_bgr: np.ndarray, train_ids: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR image blended with the colorized ``(H, W)`` prediction -> ``(H, W, 3)`` uint8 BGR."""
    colours = colorize(train_ids, palette)[..., ::-1].astype(np.float32)
    return np.clip((1 - alpha) * image_bgr.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def save_paletted_png(path: str, train_ids: np.ndarray, palette: np.ndarray) -> None:
    """Write ``(H, W)`` train ids as a paletted PNG: pixel index = train id, palette = the ``(K, 3)`` colours.
    Written whole or not at all (``utils.outputs.atomic_output``: a failure is an ``OutputError`` naming ``path``)."""
    image = Image.fromarray(np.asarray(train_ids, dtype=np.uint8))
    image.putpalette(_palette_lookup(palette).tobytes())
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")


def save_label_png(path: str, labels: np.ndarray) -> None:
    """Write ``(H, W)`` label values (e.g. ``DatasetSpec.encode_label(train_ids)``) as a single-channel uint8 PNG
    (whole or not at all, as :func:`save_paletted_png`)."""
    with atomic_output(path) as temporary:
        Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(temporary, format="PNG")
