"""The dataset (Cityscapes format): list reading, augmentation, evaluation mode, bad data, the demo generator, the
list maker."""
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.cityscapes import CITYSCAPES
from dataset.generate_demo import generate
from dataset.labels import label_ids_to_train_ids
from dataset.make_lists import make_lists
from dataset import segmentation
from dataset.registry import get_dataset
from dataset.sampler import ResumableDistributedSampler
from dataset.segmentation import DataError, read_list
from dataset.transforms import preprocess_image

HEIGHT, WIDTH = 48, 96


@pytest.fixture(scope="module")
def demo(demo_data):
    """``(data dir, {"train": list, "val": list})`` of 4 + 2 generated scenes, as ``generate`` returns them."""
    data = demo_data(num_train=4, num_val=2, height=HEIGHT, width=WIDTH, seed=3)
    return data.root, {"train": data.train_list, "val": data.val_list}


def _copy(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo[0], root)
    return root


def test_eval_mode_returns_full_preprocessed_image_and_train_ids(demo):
    root, lists = demo
    dataset = CITYSCAPES.dataset(root, lists["val"], training=False)
    image, label, name = dataset[1]
    entry = read_list(root, lists["val"])[1]
    expected = preprocess_image(cv2.imread(entry.image_path)).transpose(2, 0, 1)
    assert image.dtype == torch.float32 and image.shape == (3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(image.numpy(), expected)
    np.testing.assert_array_equal(label.numpy(), label_ids_to_train_ids(cv2.imread(entry.label_path, 0)))
    assert label.dtype == torch.int64 and name == entry.name and name.startswith("leftImg8bit/val/")


def test_image_only_list_gives_no_label(demo, tmp_path):
    root, lists = demo
    test_list = tmp_path / "test.lst"
    test_list.write_text("".join(line.split("\t")[0] + "\n" for line in open(lists["val"])))
    image, label, _ = CITYSCAPES.dataset(root, str(test_list), training=False)[0]
    assert image.shape == (3, HEIGHT, WIDTH) and label is None
    with pytest.raises(DataError, match="image-only"):
        CITYSCAPES.dataset(root, str(test_list), training=True)


def test_training_crop_pads_with_zero_and_ignore(demo):
    root, lists = demo
    dataset = CITYSCAPES.dataset(root, lists["train"], crop_size=(64, 128), training=True)  # larger than 48x96
    image, label, _ = dataset[0]
    assert image.shape == (3, 64, 128) and label.shape == (64, 128) and label.dtype == torch.int64
    # the image is 48x96 and the crop offset is 0: the bottom/right padding is image 0, label 255
    assert (image[:, HEIGHT:] == 0).all() and (image[:, :, WIDTH:] == 0).all()
    assert (label[HEIGHT:] == 255).all() and (label[:, WIDTH:] == 255).all()
    full_image, full_label, _ = CITYSCAPES.dataset(root, lists["train"], training=False)[0]
    torch.testing.assert_close(image[:, :HEIGHT, :WIDTH], full_image, rtol=0, atol=0)
    torch.testing.assert_close(label[:HEIGHT, :WIDTH], full_label, rtol=0, atol=0)


def test_augmentation_is_reproducible_and_varies_with_epoch(demo):
    root, lists = demo
    kwargs = dict(crop_size=(32, 48), scale=True, mirror=True, seed=7)
    first, second = (CITYSCAPES.dataset(root, lists["train"], **kwargs) for _ in range(2))
    for index in range(4):
        assert torch.equal(first[index][0], second[index][0]) and torch.equal(first[index][1], second[index][1])
    second.set_epoch(1)
    assert any(not torch.equal(first[index][0], second[index][0]) for index in range(4))


def _original_augmentation(image, label, crop, rng):
    """The original's order, spelled out: scale the uint8 image, preprocess the whole of it, pad it bottom/right
    (image 0, label 255), crop, HWC->CHW, flip."""
    factor = 0.7 + rng.integers(0, 15) / 10.0
    image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    image = preprocess_image(image)
    pad_h, pad_w = max(crop[0] - label.shape[0], 0), max(crop[1] - label.shape[1], 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=255)
    top, left = rng.integers(0, label.shape[0] - crop[0] + 1), rng.integers(0, label.shape[1] - crop[1] + 1)
    image = image[top:top + crop[0], left:left + crop[1]].transpose(2, 0, 1)
    label = label[top:top + crop[0], left:left + crop[1]]
    if rng.integers(0, 2):
        image, label = image[:, :, ::-1], label[:, ::-1]
    return image, label


@pytest.mark.parametrize("crop", [(32, 48), (40, 120), (90, 60), (100, 160)])  # inside, wider, taller, larger
def test_training_samples_are_the_originals_bit_for_bit(demo, crop):
    """Scale, mirror, padding and crop of every sample as in the original order, exactly (our order is faster)."""
    root, lists = demo
    dataset = CITYSCAPES.dataset(root, lists["train"], crop_size=crop, scale=True, mirror=True, seed=5)
    entries = read_list(root, lists["train"])
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index, entry in enumerate(entries):
            image, label, _ = dataset[index]
            expected_image, expected_label = _original_augmentation(
                cv2.imread(entry.image_path), label_ids_to_train_ids(cv2.imread(entry.label_path, 0)), crop,
                np.random.default_rng((5, epoch, index)))
            np.testing.assert_array_equal(image.numpy(), expected_image)
            np.testing.assert_array_equal(label.numpy(), expected_label)
            assert image.is_contiguous() and label.is_contiguous() and label.dtype == torch.int64


def test_mirror_and_scale_keep_image_and_label_aligned(demo):
    """The label of every crop equals the (rescaled, flipped) label of the pixels the image crop shows."""
    root, lists = demo
    full_image, full_label, _ = CITYSCAPES.dataset(root, lists["train"], training=False)[0]
    dataset = CITYSCAPES.dataset(root, lists["train"], crop_size=(HEIGHT, WIDTH), mirror=True, training=True)
    flips = 0
    for epoch in range(8):
        dataset.set_epoch(epoch)
        image, label, _ = dataset[0]
        flipped = not torch.equal(image, full_image)
        flips += flipped
        expected_image = full_image.flip(-1) if flipped else full_image
        expected_label = full_label.flip(-1) if flipped else full_label
        assert torch.equal(image, expected_image) and torch.equal(label, expected_label)
    assert 0 < flips < 8
    scaled = CITYSCAPES.dataset(root, lists["train"], crop_size=(200, 400), scale=True, training=True)
    heights = set()
    for epoch in range(12):
        scaled.set_epoch(epoch)
        image, _, _ = scaled[0]
        heights.add(int((image != 0).any(0).any(1).sum()))  # the rows holding the rescaled image (not padding)
    assert heights <= {round(HEIGHT * (0.7 + k / 10)) for k in range(15)} and len(heights) > 2


def test_bad_list_line_is_a_one_line_error(demo, tmp_path):
    root, lists = demo
    bad_list = tmp_path / "bad.lst"
    lines = open(lists["train"]).read().splitlines()
    bad_list.write_text("\n".join([lines[0], "leftImg8bit/train/demoville/missing.png\t" + lines[0].split("\t")[1]]))
    with pytest.raises(DataError) as error:
        CITYSCAPES.dataset(root, str(bad_list))
    message = str(error.value)
    assert "\n" not in message and f"{bad_list} line 2" in message and "missing.png" in message
    with pytest.raises(DataError, match="data dir not found"):
        read_list(str(tmp_path / "nowhere"), lists["train"])
    with pytest.raises(DataError, match="list file not found"):
        read_list(root, str(tmp_path / "none.lst"))
    bad_list.write_text("a\tb\tc\n")
    with pytest.raises(DataError, match="line 1: expected"):
        read_list(root, str(bad_list))


def test_unreadable_image_and_size_mismatch_through_worker_processes(demo, tmp_path):
    """A DataLoader worker's error arrives as a DataError with the one-line message, not a worker traceback."""
    root = _copy(demo, tmp_path)
    entries = read_list(str(root), str(root / "train.lst"))
    with open(entries[1].image_path, "wb") as handle:
        handle.write(b"not a png")
    cv2.imwrite(entries[2].label_path, np.zeros((10, 10), np.uint8))
    dataset = CITYSCAPES.dataset(str(root), str(root / "train.lst"), crop_size=(32, 32))
    for index, expected in ((1, "line 2: cannot read image"), (2, "line 3: label .* is 10x10 but its image is 48x96")):
        batches = iter(DataLoader(torch.utils.data.Subset(dataset, [index]), batch_size=1, num_workers=1))
        with pytest.raises(DataError, match=expected) as error:
            next(batches)
        assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
        assert next(batches, None) is None  # the one sample is done: the loader stops and shuts its worker down


def test_generator_is_deterministic_and_uses_real_label_ids(demo, tmp_path):
    root, lists = demo
    again = generate(str(tmp_path / "again"), num_train=4, num_val=2, height=HEIGHT, width=WIDTH, seed=3)
    for split in ("train", "val"):
        names = open(lists[split]).read()
        assert names == open(again[split]).read() and len(names.splitlines()) == {"train": 4, "val": 2}[split]
    for entry in read_list(root, lists["train"]):
        twin = os.path.join(str(tmp_path / "again"), entry.name)
        assert open(entry.image_path, "rb").read() == open(twin, "rb").read()
        label_ids = set(np.unique(cv2.imread(entry.label_path, cv2.IMREAD_GRAYSCALE)).tolist())
        assert {7, 11, 21, 23, 24, 26} <= label_ids <= {1, 7, 11, 21, 23, 24, 26}
    other = generate(str(tmp_path / "other"), num_train=1, num_val=0, height=HEIGHT, width=WIDTH, seed=4)
    assert open(read_list(str(tmp_path / "other"), other["train"])[0].image_path, "rb").read() != \
        open(read_list(root, lists["train"])[0].image_path, "rb").read()


def test_make_lists_reproduces_the_original_format(demo, tmp_path, capsys):
    root, lists = demo
    written = make_lists(root, str(tmp_path))
    assert written == {"train": 4, "val": 2, "trainval": 6}  # no test images in the demo: no test.lst
    assert "no test images" in capsys.readouterr().err
    assert (tmp_path / "train.lst").read_text() == open(lists["train"]).read()
    trainval = (tmp_path / "trainval.lst").read_text()
    assert trainval == open(lists["train"]).read() + open(lists["val"]).read()


@pytest.mark.parametrize("world_size", [1, 2])
def test_resumable_sampler_continues_the_epoch(world_size):
    dataset = list(range(21))
    for rank in range(world_size):
        full = ResumableDistributedSampler(dataset, world_size, rank, seed=5)
        full.set_epoch(3)
        order = list(full)
        resumed = ResumableDistributedSampler(dataset, world_size, rank, seed=5)
        resumed.set_epoch(3, start=4)
        assert list(resumed) == order[4:] and len(resumed) == len(order) - 4
    full.set_epoch(4)
    assert list(full) != order


def test_ignore_label_other_than_255_marks_void_and_padding(demo):
    root, lists = demo
    default = CITYSCAPES.dataset(root, lists["train"], crop_size=(64, 128), training=True)[0][1]
    label = CITYSCAPES.dataset(root, lists["train"], crop_size=(64, 128), ignore_label=-1, training=True)[0][1]
    assert (default == 255).any() and not (label == 255).any()
    assert torch.equal(label == -1, default == 255) and torch.equal(label[label != -1], default[default != 255])
    val_label = CITYSCAPES.dataset(root, lists["train"], ignore_label=-1, training=False)[0][1]
    assert torch.equal(val_label, label[:HEIGHT, :WIDTH])


def test_list_paths_may_hold_spaces(demo, tmp_path):
    root, lists = demo
    image, label = open(lists["train"]).readline().rstrip("\n").split("\t")
    os.makedirs(tmp_path / "my city")
    shutil.copy(os.path.join(root, image), tmp_path / "my city" / "a b.png")
    shutil.copy(os.path.join(root, label), tmp_path / "my city" / "a b label.png")
    spaced = tmp_path / "spaced.lst"
    spaced.write_text("my city/a b.png\tmy city/a b label.png\r\n\nmy city/a b.png\n")
    entries = read_list(str(tmp_path), str(spaced))
    assert [(e.name, e.label_path) for e in entries] == [
        ("my city/a b.png", str(tmp_path / "my city" / "a b label.png")), ("my city/a b.png", None)]
    expected = CITYSCAPES.dataset(root, lists["train"], training=False)[0]
    got = CITYSCAPES.dataset(str(tmp_path), str(spaced), training=False)[0]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    spaces_only = tmp_path / "spaces.lst"
    spaces_only.write_text(f"{image} {label}\n")
    with pytest.raises(DataError, match="separated by a tab"):
        read_list(root, str(spaces_only))


@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k", "camvid"])
def test_colour_and_16_bit_labels_are_refused_naming_the_file(demo_data, tmp_path, dataset):
    data = demo_data(num_train=1, num_val=0, height=32, width=48, dataset=dataset)
    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    list_path = str(root / os.path.basename(data.train_list))
    entry = read_list(str(root), list_path)[0]
    label = cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)
    spec = get_dataset(dataset)
    paletted = Image.fromarray(label).convert("P")
    for write, problem in ((lambda: cv2.imwrite(entry.label_path, cv2.merge([label, label, label])),
                            "has 3 channels (a colour image?)"),
                           (lambda: paletted.save(entry.label_path), "has 3 channels (a colour image?)"),
                           (lambda: cv2.imwrite(entry.label_path, label.astype(np.uint16)),
                            "has uint16 pixels: label files are 8-bit")):
        write()
        with pytest.raises(DataError) as error:  # from the header, when the list is read
            spec.dataset(str(root), list_path, training=False)
        assert str(error.value).startswith(f"{list_path} line 1: label {entry.label_path} {problem}")
        with pytest.raises(DataError) as error:  # and from the pixels, where a header does not tell
            segmentation._read_label(entry, label.shape, f"{list_path} line 1")
        assert str(error.value).startswith(f"{list_path} line 1: label {entry.label_path} {problem}")


@pytest.mark.parametrize("dataset, unknown, void", [("cityscapes", 40, 0), ("cityscapes", 255, 0), ("ade20k", None, 0)])
def test_unknown_values_and_all_void_labels_are_flagged(demo_data, tmp_path, capsys, dataset, unknown, void):
    """Cityscapes: a label id above 33 is read as void and flagged; ADE20K refuses such values (its decoder), so
    only the all-void label is flagged there. The first of each kind is named once on stderr."""
    data = demo_data(num_train=3, num_val=0, height=32, width=48, dataset=dataset)
    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    list_path = str(root / os.path.basename(data.train_list))
    entries = read_list(str(root), list_path)
    for entry in entries[1:]:
        cv2.imwrite(entry.label_path, np.full((32, 48), void, np.uint8))
    if unknown is not None:
        label = cv2.imread(entries[0].label_path, cv2.IMREAD_UNCHANGED)
        label[0, :3] = unknown
        cv2.imwrite(entries[0].label_path, label)
    samples = get_dataset(dataset).dataset(str(root), list_path, crop_size=(8, 8), scale=True, training=True)
    for epoch in range(2):
        samples.set_epoch(epoch)
        for index in range(len(samples)):
            samples[index]
    problems = samples.label_problems()
    assert problems["no_valid_pixel"] == entries[1:]
    assert problems["unknown_values"] == ([entries[0]] if unknown is not None else [])
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"warning: {list_path} line 2: label {entries[1].label_path} has no valid pixel: all void, " \
                      "nothing to learn or score (further labels like it are counted, not named)"
    if unknown is not None:
        hint = " (train-id labels? pass the label-id files, *_labelIds.png)" if unknown == 255 else ""
        assert len(err) == 2 and err[0] == f"warning: {list_path} line 1: label {entries[0].label_path} holds values " \
            f"outside the dataset's label table 0..33 ({unknown}), read as void{hint} (further labels like it are " \
            "counted, not named)"
    else:
        assert len(err) == 1
    assert samples.describe_label_problems(problems)[-1] == f"2 of 3 labels have no valid pixel (all void); the " \
                                                            f"first: {list_path} line 2, {entries[1].label_path}"


def test_training_scale_and_crop_keep_a_one_pixel_image(tmp_path):
    """The smallest scale, 0.7, still leaves a 1x1 image 1x1 (cv2 rounds to the nearest pixel): no side of 0."""
    cv2.imwrite(str(tmp_path / "dot.png"), np.full((1, 1, 3), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "dot_label.png"), np.full((1, 1), 26, np.uint8))  # car
    (tmp_path / "dot.lst").write_text("dot.png\tdot_label.png\n")
    samples = CITYSCAPES.dataset(str(tmp_path), str(tmp_path / "dot.lst"), crop_size=(4, 4), scale=True, mirror=True)
    sizes = set()
    for epoch in range(30):
        samples.set_epoch(epoch)
        image, label, _ = samples[0]
        assert image.shape == (3, 4, 4) and label.shape == (4, 4)
        sizes.add(int((label == 13).sum()))
        assert (label[label != 13] == 255).all()
    assert sizes == {1, 4}  # scales 0.7..1.4 keep 1 pixel, 1.5..2.1 make it 2x2
