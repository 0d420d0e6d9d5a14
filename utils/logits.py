"""Logits back to the image's resolution: the network predicts at output stride 8 (a 769 crop gives 97x97)."""
import torch
import torch.nn.functional as F


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=True`` (the original's): ``(N, K, h, w) -> (N, K, *size)``.

    The ONE place where logits are resized: the loss, evaluation and inference all call it.
    """
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
