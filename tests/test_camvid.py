"""CamVid: the label table, the list files, the frame names of both styles, the clip loader (stride, the
missing-frame error, one augmentation for every frame of a clip) and the generated CamVid-format video."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from dataset.camvid import CAMVID, annotation_to_train_ids, frame_path, train_ids_to_annotation
from dataset.clips import ClipDataset
from dataset.make_lists import make_lists
from dataset.registry import get_dataset
from dataset.segmentation import IGNORE_LABEL, DataError, SegmentationDataset
from dataset.transforms import preprocess_chw
from networks import build_model
from utils.loss import CriterionDSN


@pytest.fixture(scope="module")
def camvid_demo(demo_data):
    """4 + 2 labelled frames (two sequences of each name style in train), 40x64, with their video frames."""
    return demo_data(num_train=8, num_val=2, height=40, width=64, dataset="camvid")


@pytest.fixture
def camvid_copy(camvid_demo, tmp_path):
    """A copy of the demo that a test may change."""
    root = tmp_path / "camvid"
    shutil.copytree(camvid_demo.root, root)
    return root, str(root / "train.lst")


def test_annotations_decode_to_train_ids_and_back():
    annotation = np.array([[0, 10, 11, 12]], np.uint8)
    assert annotation_to_train_ids(annotation).tolist() == [[0, 10, IGNORE_LABEL, IGNORE_LABEL]]
    assert train_ids_to_annotation(np.array([0, 10, 255])).tolist() == [0, 10, 11]
    assert get_dataset("camvid") is CAMVID and CAMVID.num_classes == 11 and CAMVID.class_names[6] == "sign-symbol"


@pytest.mark.parametrize("image, offset, expected", [
    ("train/0001TP_006690.png", 1, "frames/0001TP/0001TP_006691.png"),
    ("train/0001TP_006690.png", -2, "frames/0001TP/0001TP_006688.png"),
    ("val/Seq05VD_f00030.png", 3, "frames/Seq05VD/Seq05VD_f00033.png"),
    ("test/0016E5_07959.png", -1, "frames/0016E5/0016E5_07958.png"),
    ("train/Seq05VD_f00000.png", -2, "frames/Seq05VD/Seq05VD_f00000.png"),  # before the video's start: frame 0
])
def test_frame_paths_keep_the_name_style(image, offset, expected):
    assert frame_path(image, offset) == expected


def test_make_lists_writes_the_demo_lists(camvid_demo, tmp_path):
    written = make_lists(camvid_demo.root, str(tmp_path), "camvid")
    assert written == {"train": 8, "val": 2, "trainval": 10}
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.lst") as made, open(getattr(camvid_demo, f"{split}_list")) as generated:
            assert made.read().splitlines() == sorted(generated.read().splitlines())
    lines = (tmp_path / "train.lst").read_text().splitlines()
    assert "train/0000DM_000004.png\ttrainannot/0000DM_000004.png" in lines
    assert "train/Seq01DM_f00004.png\ttrainannot/Seq01DM_f00004.png" in lines


def test_make_lists_refuses_another_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CamVid folder"):
        make_lists(str(tmp_path), str(tmp_path / "lists"), "camvid")


def test_the_demo_labelled_frames_are_video_frames_and_objects_move(camvid_demo):
    root = camvid_demo.root
    labelled = cv2.imread(os.path.join(root, "train/Seq01DM_f00009.png"))
    assert np.array_equal(labelled, cv2.imread(os.path.join(root, "frames/Seq01DM/Seq01DM_f00009.png")))
    first, later = (cv2.imread(os.path.join(root, f"frames/0000DM/0000DM_{n:06d}.png")).astype(int) for n in (0, 8))
    moved = np.abs(first - later).max(axis=2) > 60  # the objects' pixels, not the sensor noise
    assert 0.005 < moved.mean() < 0.5


def test_one_frame_clips_are_images_and_need_no_frames_folder(camvid_copy):
    root, train_list = camvid_copy
    shutil.rmtree(root / "frames")
    dataset = CAMVID.dataset(str(root), train_list, training=False)
    image, label, name = dataset[0]
    assert type(dataset) is SegmentationDataset and image.shape == (3, 40, 64) and label.shape == (40, 64)


@pytest.mark.parametrize("stride", [1, 2])
def test_clips_hold_the_frames_around_the_labelled_one(camvid_demo, stride):
    dataset = CAMVID.dataset(camvid_demo.root, camvid_demo.train_list, clip_length=5, frame_stride=stride,
                             training=False)
    assert isinstance(dataset, ClipDataset)
    index = next(i for i, entry in enumerate(dataset.entries) if entry.name == "train/Seq01DM_f00009.png")
    images, label, name = dataset[index]
    assert images.shape == (5, 3, 40, 64) and label.shape == (40, 64) and name == "train/Seq01DM_f00009.png"
    for k, number in enumerate(range(9 - 2 * stride, 9 + 2 * stride + 1, stride)):
        frame = cv2.imread(os.path.join(camvid_demo.root, f"frames/Seq01DM/Seq01DM_f{number:05d}.png"))
        assert torch.equal(images[k], torch.from_numpy(preprocess_chw(frame))), k
    image, single_label, _ = CAMVID.dataset(camvid_demo.root, camvid_demo.train_list, training=False)[index]
    assert torch.equal(images[2], image) and torch.equal(label, single_label)


def test_a_missing_frame_is_one_line_naming_it_when_the_list_is_read(camvid_copy):
    root, train_list = camvid_copy
    os.remove(root / "frames/0000DM/0000DM_000011.png")
    CAMVID.dataset(str(root), train_list, clip_length=3)  # the clips of stride 1 do not need it
    with pytest.raises(DataError) as error:
        CAMVID.dataset(str(root), train_list, clip_length=5)
    message = str(error.value)
    assert f"frame not found: {root / 'frames/0000DM/0000DM_000011.png'}" in message and "\n" not in message
    assert "line 2" in message and "train/0000DM_000009.png" in message


def test_a_frame_of_another_size_is_an_error_naming_it(camvid_copy):
    root, train_list = camvid_copy
    frame = root / "frames/0000DM/0000DM_000003.png"
    cv2.imwrite(str(frame), np.zeros((20, 30, 3), np.uint8))
    dataset = CAMVID.dataset(str(root), train_list, clip_length=3, training=False)
    with pytest.raises(DataError, match=f"frame {frame} is 20x30 but its labelled frame"):
        dataset[0]


def test_training_augments_every_frame_of_a_clip_alike(camvid_copy):
    """With every frame of the clips replaced by its labelled frame, the augmented frames are identical; and the
    centre frame and label are what the one-frame dataset gives (one draw of scale, crop and mirror)."""
    root, train_list = camvid_copy
    options = dict(crop_size=(32, 48), scale=True, mirror=True, seed=3)
    clips = CAMVID.dataset(str(root), train_list, clip_length=3, frame_stride=2, **options)
    for entry, paths in zip(clips.entries, clips.frame_paths):
        for path in paths:
            if path is not None:
                shutil.copyfile(entry.image_path, path)
    images = CAMVID.dataset(str(root), train_list, **options)
    mirrored = 0
    for epoch in range(3):
        clips.set_epoch(epoch)
        images.set_epoch(epoch)
        for index in range(len(clips)):
            clip, label, _ = clips[index]
            image, image_label, _ = images[index]
            assert clip.shape == (3, 3, 32, 48)
            assert torch.equal(clip[0], clip[1]) and torch.equal(clip[2], clip[1])
            assert torch.equal(clip[1], image) and torch.equal(label, image_label)
            mirrored += int(not torch.equal(clip[1], torch.from_numpy(preprocess_chw(cv2.imread(
                clips.entries[index].image_path)))[:, :32, :48]))
    assert mirrored > 0  # some crops were scaled, moved or mirrored


def test_clips_of_different_frames_get_the_same_crop(camvid_demo):
    """Real neighbours: the street (sky, buildings, trees, road) does not move, so a clip's frames agree there."""
    clips = CAMVID.dataset(camvid_demo.root, camvid_demo.train_list, clip_length=3, crop_size=(32, 48), scale=True,
                           mirror=True, seed=1)
    still_classes = torch.tensor([CAMVID.class_names.index(name) for name in ("sky", "building", "tree", "road")])
    for index in range(len(clips)):
        clip, label, _ = clips[index]
        still = torch.isin(label, still_classes)
        assert still.sum() > 100
        for other in (0, 2):
            difference = (clip[other] - clip[1]).abs().amax(0)[still]
            assert difference.median() < 20  # sensor noise only, no shift or flip between the frames


@pytest.mark.parametrize("options, message", [
    (dict(clip_length=2), "clip_length must be odd"),
    (dict(clip_length=3, frame_stride=0), "frame_stride must be >= 1"),
])
def test_bad_clip_options_are_value_errors(camvid_demo, options, message):
    with pytest.raises(ValueError, match=message):
        CAMVID.dataset(camvid_demo.root, camvid_demo.train_list, **options)


def test_a_dataset_without_video_refuses_clips(demo_data):
    data = demo_data(num_train=1, num_val=1, height=32, width=64)
    with pytest.raises(ValueError, match="cityscapes has no video frames: the clip length must be 1, got 3"):
        get_dataset("cityscapes").dataset(data.root, data.train_list, clip_length=3)


def test_a_video_training_step_on_generated_clips(camvid_demo):
    """The batch the video network trains on: clips ``(N, T, 3, h, w)`` and the centre frames' labels ``(N, h, w)``
    from a DataLoader; the network's outputs go to the image network's loss as they are."""
    dataset = CAMVID.dataset(camvid_demo.root, camvid_demo.train_list, clip_length=3, crop_size=(32, 48),
                             scale=True, mirror=True)
    images, labels, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert images.shape == (2, 3, 3, 32, 48) and labels.shape == (2, 32, 48) and labels.dtype == torch.int64
    torch.manual_seed(0)
    model = build_model("ccnet", "tiny", num_classes=CAMVID.num_classes, norm="bn", clip_length=3).train()
    torch.nn.init.constant_(model.head.cca.gamma, 0.5)
    loss = CriterionDSN()(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.head.cca.query_conv.weight.grad.abs().sum() > 0


def test_train_py_trains_the_video_ccnet_on_clips_and_evaluate_py_scores_it(camvid_demo, tmp_path, capsys):
    """train.py --clip-length 3 --dataset camvid: the video network on clips, its snapshot records the clip flags and
    holds the 3-D head (1x1x1 attention convolutions); evaluate.py reads the clip flags from it and scores the val
    clips; predict.py (single images) refuses it in one line."""
    import evaluate
    import predict
    import train

    argv = camvid_demo.training_argv(tmp_path, "--dataset", "camvid", "--clip-length", "3", "--frame-stride", "2",
                                     "--input-size", "32,48", "--random-mirror", "--channels-last", "1",
                                     "--val-every", "2", "--val-list", camvid_demo.val_list, steps=2)
    assert train.main(argv) == 0
    snapshot = torch.load(tmp_path / "CS_scenes_2.pth", weights_only=True)
    assert snapshot["args"]["clip_length"] == 3 and snapshot["args"]["frame_stride"] == 2
    assert snapshot["model"]["head.cca.query_conv.weight"].dim() == 5
    assert (tmp_path / "CS_scenes_best.pth").is_file()  # validated on clips
    assert all(torch.isfinite(value).all() for value in snapshot["model"].values() if value.is_floating_point())
    capsys.readouterr()
    evaluation = ["--restore-from", str(tmp_path / "CS_scenes_2.pth"), "--data-dir", camvid_demo.root, "--data-list",
                  camvid_demo.val_list, "--gpu", "cpu", "--whole", "--save-pred", str(tmp_path / "pred")]
    assert evaluate.main(evaluation) == 0
    result = json.loads((tmp_path / "pred" / "result.json").read_text())
    assert 0 <= result["mean_iou"] <= 1 and len(list((tmp_path / "pred").glob("*.png"))) == 2
    image = os.path.join(camvid_demo.root, open(camvid_demo.val_list).readline().split()[0])
    assert predict.main(["--restore-from", str(tmp_path / "CS_scenes_2.pth"), image, "--output",
                         str(tmp_path / "single")]) == 1
    assert "runs on single images" in capsys.readouterr().err
