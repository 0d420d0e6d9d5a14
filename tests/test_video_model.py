"""The video network (``build_model(clip_length=T)``): T = 1 is the image network, the centre frame's logits, context
from the other frames through the 3-D attention only, an image snapshot initializing it, the CCL embedding, the
input checks, channels-last, torch.compile and torch.export."""
import pytest
import torch

from cc_attention import CrissCrossAttention3D
from networks import SegmentationNet, VideoSegmentationNet, build_model
from utils.checkpoint import load_model_weights
from utils.inference import predict_logits

CLIP = 3


def _tiny(**options):
    return build_model("ccnet", "tiny", num_classes=5, norm="bn", **options)


def _clips(n=2, height=40, width=48, seed=0):
    return torch.randn(n, CLIP, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _video_from_image_snapshot(gamma: float):
    """An image network with ``gamma`` set, and the video network initialized from its snapshot."""
    torch.manual_seed(0)
    image_model = _tiny()
    torch.nn.init.constant_(image_model.head.cca.gamma, gamma)
    video_model = _tiny(clip_length=CLIP)
    report = load_model_weights(video_model, {"model": image_model.state_dict()})
    return image_model.eval(), video_model.eval(), report


def test_one_frame_is_the_image_network():
    torch.manual_seed(0)
    model = _tiny(clip_length=1)
    torch.manual_seed(0)
    image_model = _tiny()
    assert type(model) is SegmentationNet
    for (name, a), (_, b) in zip(model.state_dict().items(), image_model.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), image_model.eval()(x), rtol=0, atol=0)


def test_an_image_snapshot_initializes_every_weight_of_the_video_network():
    image_model, video_model, report = _video_from_image_snapshot(0.5)
    assert isinstance(video_model, VideoSegmentationNet) and isinstance(video_model.head.cca, CrissCrossAttention3D)
    assert not report.missing and not report.not_loaded and not report.unexpected
    assert set(video_model.state_dict()) == set(image_model.state_dict())
    torch.testing.assert_close(video_model.head.cca.query_conv.weight[:, :, 0], image_model.head.cca.query_conv.weight)
    assert video_model.head.cca.gamma.item() == 0.5


def test_with_gamma_zero_the_centre_logits_are_the_image_networks():
    """The 3-D attention is the only path between frames: at gamma = 0 the clip's centre logits are the image
    network's logits of the centre frame."""
    image_model, video_model, _ = _video_from_image_snapshot(0.0)
    clips = _clips()
    with torch.no_grad():
        torch.testing.assert_close(video_model(clips)[0], image_model(clips[:, CLIP // 2])[0])


def test_the_other_frames_reach_the_centre_logits_through_the_attention_only():
    _, video_model, _ = _video_from_image_snapshot(0.5)
    head = video_model.head
    features = torch.randn(2 * CLIP, head.conva[0].in_channels, 6, 7)  # layer4 of every frame of two clips
    changed = features.clone()
    changed[0] = torch.randn_like(changed[0])  # the first frame of the first clip
    with torch.no_grad():
        before, after = head(features), head(changed)
        assert (before[0] - after[0]).abs().max() > 1e-3 and torch.equal(before[1], after[1])
        head.cca.gamma.zero_()
        torch.testing.assert_close(head(features)[0], head(changed)[0])


def test_training_outputs_are_the_centre_frames():
    model = _tiny(clip_length=CLIP, embedding_dim=4).train()
    main, aux, embedding = model(_clips(height=65, width=97))
    assert main.shape == aux.shape == (2, 5, 9, 13) and embedding.shape == (2, 4, 9, 13)
    (main.sum() + aux.sum() + embedding.sum()).backward()
    assert model.head.cca.query_conv.weight.grad is not None
    assert len(model.eval()(_clips())) == 1


def test_channels_last_matches_nchw():
    _, video_model, _ = _video_from_image_snapshot(0.5)
    clips = _clips()
    with torch.no_grad():
        expected = video_model(clips)[0]
        video_model.to(memory_format=torch.channels_last)
        actual = video_model(clips.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(clips))[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"clip_length": 2}, "clip_length must be odd"),
    ({"clip_length": 0}, "clip_length must be odd"),
    ({"clip_length": 3, "name": "nonlocal"}, "needs the ccnet head"),
])
def test_bad_clip_length_is_a_value_error(options, message):
    options = {"name": "ccnet", **options}
    with pytest.raises(ValueError, match=message):
        build_model(backbone="tiny", norm="bn", **options)


def test_wrong_input_shape_is_a_value_error():
    model = _tiny(clip_length=CLIP)
    with pytest.raises(ValueError, match=r"expects clips \(N, 3, 3, H, W\); got \(2, 3, 40, 48\)"):
        model(torch.randn(2, 3, 40, 48))


def test_export_of_the_video_network_holds_the_3d_operator():
    _, video_model, _ = _video_from_image_snapshot(0.5)
    clips = _clips(n=1)
    with torch.no_grad():
        exported = torch.export.export(video_model, (clips,))
        assert any("ccnet.criss_cross_attention_3d" in str(node.target) for node in exported.graph.nodes)
        torch.testing.assert_close(exported.module()(clips)[0], video_model(clips)[0])


@pytest.mark.slow
def test_compile_fullgraph_of_the_video_network_matches_eager():
    torch._dynamo.reset()
    _, video_model, _ = _video_from_image_snapshot(0.5)
    clips = _clips(n=1)
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        actual = torch.compile(video_model, fullgraph=True)(clips)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(actual, video_model(clips)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile_size, scales, flip", [((24, 32), (1.0,), False), (None, (0.75, 1.0), True),
                                                     ((24, 32), (0.75,), True)])
def test_inference_on_clips_is_the_image_inference_of_the_centre_frame_at_gamma_zero(tile_size, scales, flip):
    """utils.inference tiles, resizes and mirrors every frame of a clip alike: with the attention off, the video
    network's full-resolution logits are the image network's of the centre frame."""
    image_model, video_model, _ = _video_from_image_snapshot(0.0)
    clips = _clips(height=40, width=56)
    actual = predict_logits(video_model, clips, tile_size, scales, flip)
    expected = predict_logits(image_model, clips[:, CLIP // 2], tile_size, scales, flip)
    assert actual.shape == (2, 5, 40, 56)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
