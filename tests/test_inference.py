"""Sliding-window, whole-image, multi-scale and flip inference (utils.inference) with small stand-in models."""
import pytest
import torch
from torch import nn

from utils.inference import predict_logits, predict_sliding, predict_whole, tile_starts
from utils.logits import upsample_logits

NUM_CLASSES = 5


class StridedNet(nn.Module):
    """Output stride 4 with a 7x7 receptive field per output: context-dependent, like a real segmentation net."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 3, stride=2, padding=1)
        )

    def forward(self, x):
        out = self.body(x)
        return [out, out.detach() * 0]  # [main, aux] like the real model


class PixelwiseNet(nn.Module):
    """1x1 convolution at full resolution: each pixel's logits depend on that pixel only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x):
        return [self.conv(x), None]


class MirrorSymmetrized(nn.Module):
    """``(m(x) + mirror(m(mirror(x)))) / 2``: exactly equivariant to the left-right mirror."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        main = self.model(x)[0] + self.model(x.flip(-1))[0].flip(-1)
        return [main / 2, None]


def _images(n=2, h=37, w=53):
    torch.manual_seed(2)
    return torch.randn(n, 3, h, w) * 50


def test_tile_starts_match_the_original_layout():
    assert tile_starts(2048, 769) == [0, 513, 1026, 1279]  # 4 columns on a Cityscapes image
    assert tile_starts(1024, 769) == [0, 255]  # 2 rows
    assert tile_starts(769, 769) == [0]
    assert tile_starts(100, 769) == [0]  # smaller than a tile: one padded tile


def test_upsample_logits_is_bilinear_align_corners():
    logits = torch.arange(4.0).view(1, 1, 2, 2)
    up = upsample_logits(logits, (3, 5))
    assert up.shape == (1, 1, 3, 5)
    torch.testing.assert_close(up[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(up[0, 0, 1, 2], torch.tensor(1.5))


def test_sliding_equals_whole_when_one_tile_covers_the_image():
    model = StridedNet().eval()
    images = _images(h=40, w=56)
    sliding = predict_sliding(model, images, (40, 56))
    assert sliding.shape == (2, NUM_CLASSES, 40, 56)
    assert torch.equal(sliding, predict_whole(model, images))
    assert torch.equal(predict_logits(model, images, tile_size=(40, 56)), predict_logits(model, images, None))


def test_sliding_assembles_many_overlapping_and_padded_tiles_exactly():
    model = PixelwiseNet().eval()
    images = _images(h=37, w=53)  # 12x12 tiles: 4 x 6 overlapping tiles; 50-row tiles: one padded tile
    expected = model(images)[0]
    for tile in [(12, 12), (50, 20), (37, 53)]:
        torch.testing.assert_close(predict_sliding(model, images, tile), expected, rtol=0, atol=1e-5)


def test_batched_tiles_give_the_logits_of_one_tile_at_a_time():
    """2 images; 5 x 7 tiles of 12x12, or 1 x 4 padded tiles of 50x20; in groups of 5 and of all the tiles."""
    model = StridedNet().eval()
    images = _images(h=37, w=53)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    for tile, tiles in [((12, 12), 35), ((50, 20), 4)]:
        expected = predict_sliding(model, images, tile)
        for tile_batch in (5, 100):
            batches.clear()
            torch.testing.assert_close(predict_sliding(model, images, tile, tile_batch), expected, rtol=1e-5, atol=1e-5)
            groups = [min(tile_batch, tiles - first) for first in range(0, tiles, tile_batch)]
            assert batches == [2 * size for size in groups]  # every image's tile, for each tile of the group
        torch.testing.assert_close(predict_logits(model, images, tile, scales=(0.5, 1.0), flip=True, tile_batch=3),
                                   predict_logits(model, images, tile, scales=(0.5, 1.0), flip=True),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tile_batch"):
        predict_sliding(model, images, (12, 12), tile_batch=0)


def test_sliding_differs_from_whole_for_a_context_dependent_model():
    model = StridedNet().eval()
    images = _images(h=48, w=64)
    assert not torch.allclose(predict_sliding(model, images, (24, 24)), predict_whole(model, images), atol=1e-3)


def test_flip_keeps_the_prediction_of_a_mirror_equivariant_model():
    model = MirrorSymmetrized(StridedNet()).eval()
    images = _images()
    for tile in [None, (37, 53)]:
        plain = predict_logits(model, images, tile_size=tile)
        flipped = predict_logits(model, images, tile_size=tile, flip=True)
        torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-4)
        assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_flip_averages_the_mirrored_width_axis():
    model = StridedNet().eval()
    images = _images()
    size = images.shape[-2:]
    expected = (upsample_logits(model(images)[0], size) + upsample_logits(model(images.flip(-1))[0], size).flip(-1)) / 2
    torch.testing.assert_close(predict_logits(model, images, None, flip=True), expected)


class SideNet(nn.Module):
    """Classes 1 and 2 look alike and only their side tells them apart: class 1 wherever a pixel is on the image's
    left half, class 2 on its right half (a left and a right arm); 4 classes."""

    def forward(self, x):
        left = (torch.arange(x.shape[-1]) < x.shape[-1] / 2).float().expand(x.shape[0], x.shape[-2], -1)
        zeros = torch.zeros_like(left)
        return [torch.stack([zeros, left, 1 - left, zeros], dim=1), None]


def test_flip_swaps_the_channels_of_each_flip_pair():
    model = SideNet()
    images = _images(h=6, w=8)
    plain = predict_logits(model, images, None)
    assert plain[:, 1, :, :4].eq(1).all() and plain[:, 2, :, 4:].eq(1).all()
    # the mirrored image's class 1 is the image's class 2: swapped, the flip averaging keeps the prediction
    assert torch.equal(predict_logits(model, images, None, flip=True, flip_pairs=((1, 2),)), plain)
    # not swapped, every pixel is half left, half right: the two classes tie
    unswapped = predict_logits(model, images, None, flip=True)
    assert torch.equal(unswapped[:, 1], unswapped[:, 2]) and unswapped[:, 1].eq(0.5).all()
    assert torch.equal(predict_logits(model, images, None, flip_pairs=((1, 2),)), plain)  # no flip: no swap
    with pytest.raises(ValueError, match=r"flip pair \(1, 7\): ids must be in 0..3"):
        predict_logits(model, images, None, flip=True, flip_pairs=((1, 7),))


def test_multi_scale_averages_resized_predictions():
    model = StridedNet().eval()
    images = _images(n=1, h=40, w=60)
    small = torch.nn.functional.interpolate(images, size=(30, 45), mode="bilinear", align_corners=True)
    expected = (upsample_logits(model(small)[0], (40, 60)) + upsample_logits(model(images)[0], (40, 60))) / 2
    got = predict_logits(model, images, None, scales=(0.75, 1.0))
    assert got.shape == (1, NUM_CLASSES, 40, 60)
    torch.testing.assert_close(got, expected)
    sliding = predict_logits(model, images, (20, 20), scales=(0.75, 1.0), flip=True)
    assert sliding.shape == (1, NUM_CLASSES, 40, 60)


def test_bad_scales_raise():
    with pytest.raises(ValueError, match="scale"):
        predict_logits(StridedNet(), _images(), None, scales=())
    with pytest.raises(ValueError, match="positive"):
        predict_logits(StridedNet(), _images(), None, scales=(0.0,))


def test_tiny_ccnet_sliding_equals_whole_on_one_tile_and_tiles_any_size():
    from networks import build_model

    torch.manual_seed(0)
    model = build_model(backbone="tiny", norm="bn").eval()
    images = _images(n=1, h=48, w=72)
    one_tile = predict_logits(model, images, tile_size=(48, 72))
    assert torch.equal(one_tile, predict_logits(model, images, tile_size=None))
    tiled = predict_logits(model, images, tile_size=(32, 32), scales=(0.5, 1.25), flip=True)
    assert tiled.shape == (1, 19, 48, 72) and torch.isfinite(tiled).all()
