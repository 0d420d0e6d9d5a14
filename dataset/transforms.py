"""Image preprocessing shared by training, evaluation and inference: the model's input contract."""
import numpy as np
import torch

# Per-channel mean of the BGR images the original Caffe-style backbone was trained on. No division by a std.
IMG_MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), dtype=np.float32)


def preprocess_image(image_bgr: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR (as ``cv2.imread`` returns it) -> ``(H, W, 3)`` float32 with the mean subtracted."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {tuple(image_bgr.shape)}")
    return image_bgr.astype(np.float32) - IMG_MEAN_BGR


def image_to_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 BGR -> ``(1, 3, H, W)`` float32 model input (``preprocess_image`` + HWC->CHW)."""
    return torch.from_numpy(np.ascontiguousarray(preprocess_image(image_bgr).transpose(2, 0, 1))).unsqueeze(0)
