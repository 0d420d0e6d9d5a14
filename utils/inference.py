"""Full-image inference: sliding window or whole image, multi-scale and horizontal flip.

All functions take a batch of preprocessed images ``(N, 3, H, W)`` (see ``dataset.transforms``) on the model's
device and return logits ``(N, K, H, W)`` at the images' full resolution; or, for the video network, clips
``(N, T, 3, H, W)`` (each frame tiled, resized and mirrored alike) and the logits of their centre frames. Logits
(not probabilities) are averaged, as in the original code:

* sliding window (the default): tiles of ``tile_size`` with 1/3 overlap (stride ``ceil(2/3 * tile)``, so 513 for
  769 and 2 x 4 tiles on a 1024 x 2048 image); the last tile of a row/column is shifted back to end at the border;
  a tile larger than the image is zero-padded at the bottom/right (zero = the mean colour after preprocessing);
  each tile's logits are upsampled to the tile size, cropped to the valid part and averaged where tiles overlap;
  ``tile_batch`` tiles go through the network in one forward pass (the same logits: the network treats the images
  of a batch independently in eval mode; faster on a GPU, more memory);
* whole image: one forward pass, logits upsampled to the image size;
* multi-scale: the image is resized bilinearly (corners aligned, like the original's ``ndimage.zoom(order=1)``)
  by each scale, predicted, and the logits resized back to the original size;
* flip: each scale is also predicted on the image mirrored left-right (the width axis, the last one) and the
  logits mirrored back, the class channels of each flip pair swapped (what the network calls a left arm in the
  mirrored image is the right arm of the image: ``utils.mirror``). The result is the mean over every (scale, flip)
  prediction.

Every upsampling goes through ``utils.logits.upsample_logits``. Predictions become files in
``dataset.predictions``.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from utils.cli import check_pixels
from utils.logits import upsample_logits
from utils.mirror import FlipPairs, mirrored_class_ids


def _main_logits(model, images: torch.Tensor) -> torch.Tensor:
    """The main head's logits ``(N, K, h, w)`` (the model returns ``[main, aux]``)."""
    outputs = model(images)
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def tile_starts(length: int, tile: int) -> list:
    """Start offsets of the tiles along one axis of ``length`` pixels: stride ``ceil(2 * tile / 3)``, the last tile
    shifted back to end at ``length`` (start 0 when the tile is longer than the axis).

    >>> tile_starts(2048, 769)
    [0, 513, 1026, 1279]
    """
    stride = -(-2 * tile // 3)
    count = max(-(-(length - tile) // stride), 0) + 1
    return sorted({max(min(i * stride + tile, length) - tile, 0) for i in range(count)})


@torch.no_grad()
def predict_whole(model, images: torch.Tensor, output_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``(N, 3, H, W)`` -> logits ``(N, K, *output_size)`` (default ``(H, W)``) from one forward pass over the
    whole image, upsampled once."""
    return upsample_logits(_main_logits(model, images), output_size or images.shape[-2:])


@torch.no_grad()
def predict_sliding(model, images: torch.Tensor, tile_size: Tuple[int, int], tile_batch: int = 1) -> torch.Tensor:
    """``(N, 3, H, W)`` -> logits ``(N, K, H, W)`` averaged over overlapping ``tile_size = (th, tw)`` tiles, up to
    ``tile_batch`` tiles (of every image) per forward pass."""
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    batch, height, width = images.shape[0], *images.shape[-2:]
    tile_h, tile_w = tile_size
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    starts = [(y, x) for y in tile_starts(height, tile_h) for x in tile_starts(width, tile_w)]
    for first in range(0, len(starts), tile_batch):
        group = starts[first:first + tile_batch]
        tiles = [images[..., y:y + tile_h, x:x + tile_w] for y, x in group]
        padded = [F.pad(tile, (0, tile_w - tile.shape[-1], 0, tile_h - tile.shape[-2])) for tile in tiles]  # zeros
        logits = upsample_logits(_main_logits(model, torch.cat(padded)), (tile_h, tile_w))
        if total is None:
            total = images.new_zeros(batch, logits.shape[1], height, width, dtype=logits.dtype)
        for index, ((y, x), tile) in enumerate(zip(group, tiles)):
            valid_h, valid_w = tile.shape[-2:]
            part = logits[index * batch:(index + 1) * batch, :, :valid_h, :valid_w]  # this tile of every image
            total[:, :, y:y + valid_h, x:x + valid_w] += part
            count[:, :, y:y + valid_h, x:x + valid_w] += 1
    return total / count


def scaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
    """``(H, W)`` resized by ``scale``: ``(round(H * scale), round(W * scale))`` (as ``cv2.resize`` rounds too)."""
    return int(round(size[0] * scale)), int(round(size[1] * scale))


def check_scales(size: Tuple[int, int], scales: Sequence[float], image_name: str = "the image",
                 flag: str = "--scales", max_pixels: Optional[int] = None, batch: int = 1) -> None:
    """Raise ``ValueError`` (one line naming ``image_name`` and ``flag``) when a scale of ``scales`` resizes an
    image of ``size = (H, W)`` to a side of 0 pixels (e.g. ``--scales 0.001``, or 0.4 on a 1x1 image), or (with
    ``max_pixels``) ``batch`` such images to more than ``max_pixels`` pixels (``--scales 1e9``), before any
    allocation (``utils.cli.check_pixels``)."""
    for scale in scales:
        if max_pixels is not None:
            check_pixels(f"{image_name}: {flag} {scale:g}", size[0] * scale, size[1] * scale, max_pixels, batch)
        height, width = scaled_size(size, scale)
        if min(height, width) < 1:
            raise ValueError(f"{image_name}: {flag} {scale:g} resizes its {size[0]}x{size[1]} pixels to "
                             f"{height}x{width}; choose a scale that leaves every side at least 1 pixel")


def resize_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear, corner-aligned resize of ``(N, 3, H, W)`` (or clips ``(N, T, 3, H, W)``, frame by frame) to
    ``(round(H * scale), round(W * scale))``."""
    if scale == 1.0:
        return images
    size = scaled_size(images.shape[-2:], scale)
    frames = F.interpolate(images.flatten(0, -4), size=size, mode="bilinear", align_corners=True)
    return frames.view(*images.shape[:-2], *size)


@torch.no_grad()
def predict_logits(
    model,
    images: torch.Tensor,
    tile_size: Optional[Tuple[int, int]] = (769, 769),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tile_batch: int = 1,
    image_name: str = "the image",
    max_pixels: Optional[int] = None,
    flip_pairs: FlipPairs = (),
) -> torch.Tensor:
    """Logits ``(N, K, H, W)`` of ``(N, 3, H, W)`` preprocessed images, averaged over scales and flips.

    Args:
        model: returns ``[main_logits, aux_logits]`` (or a tensor) for an ``(N, 3, h, w)`` input; call
            ``model.eval()`` first.
        images: preprocessed images on the model's device.
        tile_size: ``(th, tw)`` for sliding-window inference; ``None`` for whole-image inference.
        scales: image scale factors (``1.0`` = original size).
        flip: also predict the left-right mirrored image.
        tile_batch: sliding window: tiles per forward pass.
        image_name: what the one-line error of a scale that shrinks the images to nothing (or, with
            ``max_pixels``, enlarges them beyond it) names (see :func:`check_scales`).
        max_pixels: refuse scales whose resized batch has more pixels (``--max-pixels``); None: no limit.
        flip_pairs: the class pairs a mirror swaps (``DatasetSpec.flip_pairs``): with ``flip``, the mirrored
            image's logits have the two channels of each pair exchanged before they are averaged. A pair beyond
            the model's ``K`` classes raises ``ValueError``.
    """
    if not scales:
        raise ValueError("scales must list at least one scale factor")
    if any(scale <= 0 for scale in scales):
        raise ValueError(f"scale factors must be positive, got {list(scales)}")
    check_scales(images.shape[-2:], scales, image_name, max_pixels=max_pixels, batch=images.shape[0])
    size = images.shape[-2:]
    total = None
    for scale in scales:
        scaled = resize_images(images, scale)
        for mirrored in ((False, True) if flip else (False,)):
            inputs = scaled.flip(-1) if mirrored else scaled
            if tile_size is None:
                logits = predict_whole(model, inputs, size)  # straight to the original size, as the original
            else:
                logits = predict_sliding(model, inputs, tile_size, tile_batch)
                if scale != 1.0:
                    logits = upsample_logits(logits, size)
            if mirrored:
                logits = logits.flip(-1)
                if flip_pairs:
                    channels = torch.from_numpy(mirrored_class_ids(logits.shape[1], flip_pairs))
                    logits = logits.index_select(1, channels.to(logits.device))
            total = logits if total is None else total + logits
    return total / (len(scales) * (2 if flip else 1))

