"""predict.py on images of any size and format; visualize_attention.py's attention maps against a dense
recomputation."""
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import predict
import visualize_attention
from dataset.transforms import image_to_tensor
from engine.inference_model import InferenceModel
from networks import build_model
from utils.checkpoint import save_checkpoint
from utils.weights import WEIGHTS, PublishedWeights


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("snap") / "tiny.pth"
    model = build_model(backbone="tiny", norm="bn")
    with torch.no_grad():
        model.head.cca.gamma.fill_(1.0)  # the second loop's input then depends on the first loop
    save_checkpoint({"model": model.state_dict()}, path)
    return str(path)


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_predict_writes_colour_predictions_and_overlays_for_any_size_and_format(snapshot, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "odd.jpg"), _random_image(45, 70))
    cv2.imwrite(str(folder / "grey.png"), _random_image(33, 50, 1)[..., 0])
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "big.bmp"
    cv2.imwrite(str(single), _random_image(60, 90, 2))
    out = tmp_path / "out"
    args = ["--restore-from", snapshot, "--backbone", "tiny", "--input-size", "32,32", "--gpu", "cpu",
            "--output", str(out), str(folder), str(single)]
    assert predict.main(args) == 0
    for stem, size in [("odd", (45, 70)), ("grey", (33, 50)), ("big", (60, 90))]:
        prediction = Image.open(out / f"{stem}.png")
        assert prediction.mode == "P" and prediction.size == size[::-1]
        assert np.asarray(prediction).max() < 19
        assert cv2.imread(str(out / f"{stem}_overlay.jpg")).shape == (*size, 3)
    assert sorted(os.listdir(out)) == sorted([".lock", *(f"{s}{e}" for s in ("odd", "grey", "big")
                                                         for e in (".png", "_overlay.jpg"))])  # .lock: one run at a time


def test_predict_refuses_missing_inputs_and_clashing_names(snapshot, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        predict.find_images([str(tmp_path / "nowhere.png")])
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "same.png"), _random_image(8, 8))
    with pytest.raises(ValueError, match="same"):
        predict.find_images([str(tmp_path / "a"), str(tmp_path / "b")])


def _dense_attention(x, cca):
    """Dense (hw, hw) criss-cross attention computed from scratch: softmax of q.k over row and column of p."""
    query, key = cca.query_conv(x)[0].flatten(1), cca.key_conv(x)[0].flatten(1)  # (C', hw)
    height, width = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    cross = (ys[:, None] == ys[None, :]) | (xs[:, None] == xs[None, :])
    energy = (query.t() @ key).masked_fill(~cross, float("-inf"))
    return torch.softmax(energy, dim=1)


def test_attention_maps_compose_two_criss_cross_hops(snapshot):
    model = build_model(backbone="tiny", norm="bn").eval()
    model.load_state_dict(torch.load(snapshot)["model"])
    images = image_to_tensor(_random_image(40, 56))
    inputs = []
    model.head.cca.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    attentions, logits = visualize_attention.capture_attention(model, images)
    height, width = logits.shape[-2:]
    assert len(attentions) == 2 == len(inputs) and attentions[0].shape == (1, height + width - 1, height, width)
    with torch.no_grad():
        dense = [_dense_attention(x, model.head.cca) for x in inputs]
    point = (2, 5)
    p = point[0] * width + point[1]
    one_loop, two_loops = visualize_attention.context_maps(attentions, point)
    torch.testing.assert_close(one_loop.flatten(), dense[0][p])
    torch.testing.assert_close(two_loops.flatten(), (dense[1] @ dense[0])[p])
    assert float(one_loop.sum()) == pytest.approx(1.0) and float(two_loops.sum()) == pytest.approx(1.0)
    off_cross = torch.ones(height, width, dtype=torch.bool)
    off_cross[point[0], :] = False
    off_cross[:, point[1]] = False
    assert torch.all(one_loop[off_cross] == 0)  # one hop: the row and column only
    assert torch.all(two_loops > 0)  # two hops: the whole image


def test_visualize_attention_writes_one_row_per_point_into_attention_of_the_current_folder(
        snapshot, tmp_path, monkeypatch, failed_run):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "scene.png"), _random_image(48, 64))
    monkeypatch.chdir(images)  # even run from the image's folder, the figure does not go next to the image
    args = ["--restore-from", snapshot, "--backbone", "tiny", "--gpu", "cpu", "scene.png",
            "--point", "10,20", "--point", "47,63"]
    assert visualize_attention.main(args) == 0
    assert sorted(os.listdir(images)) == ["attention", "scene.png"]
    figure = cv2.imread(str(images / "attention" / "scene_attention.png"))
    assert figure.shape == (2 * 48, 3 * 64, 3)  # rows: points; columns: prediction, R=1, R=2
    assert "outside" in failed_run(visualize_attention.main, args[:-4] + ["--point", "48,0"])
    # an image inside the default folder: the default would write next to it, so it is refused
    cv2.imwrite(str(images / "attention" / "inside.png"), _random_image(48, 64))
    message = failed_run(visualize_attention.main, [*args[:4], "attention/inside.png", "--point", "1,1"])
    assert message.startswith("--output attention: ") and "holds the input attention/inside.png" in message
    assert sorted(os.listdir(images / "attention")) == ["inside.png", "scene_attention.png"]


def test_predict_writes_into_predictions_of_the_current_folder_and_never_into_an_input_folder(
        snapshot, tmp_path, monkeypatch, failed_run):
    cv2.imwrite(str(tmp_path / "scene.png"), _random_image(40, 48))
    monkeypatch.chdir(tmp_path)
    args = ["--restore-from", snapshot, "--backbone", "tiny", "--gpu", "cpu", "--whole"]
    assert predict.main(args + ["."]) == 0  # the current folder is the input folder: the outputs go below it
    assert sorted(os.listdir(tmp_path / "predictions")) == [".lock", "scene.png", "scene_overlay.jpg"]
    message = failed_run(predict.main, args + ["predictions"])  # the default folder as the input: refused
    assert message == ("--output predictions: writing predictions/scene.png would replace the input "
                       "predictions/scene.png; choose another output")


def test_a_released_snapshots_name_gives_its_r_and_classes(tmp_path, monkeypatch):
    """A name of the weights table (here one pointing at a file:// URL) is downloaded, and its R and number of
    classes are the model flags' defaults: a raw state dict does not say them."""
    torch.manual_seed(1)
    raw = tmp_path / "raw.pth"
    torch.save(build_model(backbone="tiny", num_classes=5, recurrence=1, norm="bn").state_dict(), raw)
    monkeypatch.setitem(WEIGHTS, "tiny-r1", PublishedWeights(raw.as_uri(), "tiny-r1.pth", "a test entry",
                                                             recurrence=1, num_classes=5))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cv2.imwrite(str(tmp_path / "scene.png"), _random_image(48, 64))
    output = tmp_path / "figure.png"
    args = ["--restore-from", "tiny-r1", "--backbone", "tiny", "--gpu", "cpu", str(tmp_path / "scene.png"),
            "--point", "10,20", "--output", str(output)]
    assert visualize_attention.main(args) == 0
    assert cv2.imread(str(output)).shape == (48, 2 * 64, 3)  # columns: the prediction and R=1 only
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "tiny-r1.pth").is_file()


@pytest.mark.parametrize("flags, message", [(["--recurrence", "0"], "recurrence"),
                                            (["--model", "nonlocal"], "ccnet"), (["--model", "baseline"], "ccnet")])
def test_visualize_attention_refuses_heads_without_attention(snapshot, tmp_path, flags, message, failed_run):
    image_path = tmp_path / "scene.png"
    cv2.imwrite(str(image_path), _random_image(48, 64))
    args = ["--restore-from", snapshot, "--backbone", "tiny", "--gpu", "cpu", str(image_path), "--point", "1,1"]
    assert message in failed_run(visualize_attention.main, args + flags)


def test_inference_model_runs_channels_last_and_bf16_and_returns_the_main_logits_in_float32(snapshot):
    model = build_model(backbone="tiny", norm="bn").eval()
    model.load_state_dict(torch.load(snapshot)["model"])
    images = image_to_tensor(_random_image(40, 56))
    with torch.no_grad():
        (expected,) = model(images)
        seen = []
        hook = model.layer1[0].conv1.register_forward_hook(
            lambda module, args, output: seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                                                      output.dtype)))
        (nhwc,) = InferenceModel(model, channels_last=True)(images)
        (bf16,) = InferenceModel(model, channels_last=True, amp_dtype=torch.bfloat16)(images)
        hook.remove()
    assert seen == [(True, torch.float32), (True, torch.bfloat16)]
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # converted in place
    torch.testing.assert_close(nhwc, expected, rtol=1e-4, atol=1e-4)
    assert bf16.dtype == torch.float32 and bf16.shape == expected.shape
    assert (bf16 - expected).norm() < 0.05 * expected.norm()


def test_tools_take_channels_last_and_amp(snapshot, tmp_path, failed_run):
    image_path = tmp_path / "scene.png"
    cv2.imwrite(str(image_path), _random_image(48, 64))
    common = ["--restore-from", snapshot, "--backbone", "tiny", "--gpu", "cpu", "--input-size", "32,32"]
    for name, flags in (("default", []), ("fast", ["--channels-last", "1"])):
        assert predict.main(common + flags + ["--output", str(tmp_path / name), str(image_path)]) == 0
    default, fast = (np.asarray(Image.open(tmp_path / name / "scene.png")) for name in ("default", "fast"))
    assert np.mean(default == fast) > 0.99  # the same convolutions in another order: ties may break otherwise
    assert predict.main(common + ["--amp", "bf16", "--output", str(tmp_path / "bf16"), str(image_path)]) == 0
    assert failed_run(predict.main, common + ["--amp", "fp16", str(image_path)]) == \
        "--amp fp16 needs a GPU; use --amp bf16 on the CPU"
    args = ["--restore-from", snapshot, "--backbone", "tiny", "--gpu", "cpu", str(image_path), "--point", "10,20",
            "--channels-last", "1", "--amp", "bf16", "--output", str(tmp_path / "attention.png")]
    assert visualize_attention.main(args) == 0
    assert cv2.imread(str(tmp_path / "attention.png")).shape == (48, 3 * 64, 3)
