"""Image preprocessing shared by training, evaluation and inference: the model's input contract."""
from typing import Optional

import numpy as np
import torch

# Per-channel mean of the BGR images the original Caffe-style backbone was trained on. No division by a std.
IMG_MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), dtype=np.float32)


def _check_bgr(image_bgr: np.ndarray) -> None:
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {tuple(image_bgr.shape)}")


def preprocess_image(image_bgr: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR (as ``cv2.imread`` returns it) -> ``(H, W, 3)`` float32 with the mean subtracted."""
    _check_bgr(image_bgr)
    return image_bgr.astype(np.float32) - IMG_MEAN_BGR


def preprocess_chw(image_bgr: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR -> ``(3, H, W)`` float32: :func:`preprocess_image` and HWC->CHW in one pass, the same
    values. ``out``: the ``(3, H, W)`` float32 array to write (any strides, e.g. a part of a larger one or a mirrored
    view); returned."""
    _check_bgr(image_bgr)
    if out is None:
        out = np.empty((3, *image_bgr.shape[:2]), np.float32)
    np.subtract(image_bgr.transpose(2, 0, 1), IMG_MEAN_BGR[:, None, None], out=out, dtype=np.float32)
    return out


def image_to_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 BGR -> ``(1, 3, H, W)`` float32 model input (:func:`preprocess_chw`)."""
    return torch.from_numpy(preprocess_chw(image_bgr)).unsqueeze(0)
