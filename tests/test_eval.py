"""evaluate.py end to end on a generated dataset: scores, saved predictions, test lists, distributed evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from dataset.cityscapes import CITYSCAPES
from dataset.labels import CLASS_NAMES, NUM_CLASSES, PALETTE, label_ids_to_train_ids, train_ids_to_label_ids
from dataset.predictions import save_label_png, save_paletted_png
from engine.inference_model import resolve_model_args
from networks import build_model
from utils.checkpoint import save_checkpoint
from utils.distributed import shard


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_data):
    """5 generated val scenes (64x128) and a tiny-backbone snapshot whose predictions vary across classes
    (random weights; batch-norm statistics measured on the images, so the logits are not dominated by a bias)."""
    root = tmp_path_factory.mktemp("eval")
    data = demo_data(num_train=0, num_val=5, height=64, width=128, seed=3)
    torch.manual_seed(0)
    model = build_model(backbone="tiny", norm="bn")
    images = torch.stack([CITYSCAPES.dataset(data.root, data.val_list, training=False)[i][0] for i in range(5)])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0  # running statistics := those of the one batch
    with torch.no_grad():
        model.train()(images)
    snapshot = root / "snap" / "CS_scenes_10.pth"
    save_checkpoint({"model": model.state_dict(), "iteration": 10, "args": {"backbone": "tiny"}}, snapshot)
    return {"root": root, "data": data.root, "val": data.val_list, "snapshot": str(snapshot)}


def _args(demo, *extra):
    return ["--data-dir", demo["data"], "--data-list", demo["val"], "--restore-from", demo["snapshot"],
            "--backbone", "tiny", "--input-size", "48,48", "--num-workers", "0", "--gpu", "cpu", *extra]


def test_label_id_png_round_trips_and_palette_png_holds_train_ids(tmp_path):
    train_ids = np.arange(NUM_CLASSES, dtype=np.uint8).repeat(3).reshape(3, NUM_CLASSES)
    save_label_png(str(tmp_path / "labelIds" / "a.png"), train_ids_to_label_ids(train_ids))
    label_ids = cv2.imread(str(tmp_path / "labelIds" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert label_ids.ndim == 2 and label_ids.dtype == np.uint8
    assert np.array_equal(label_ids, train_ids_to_label_ids(train_ids))
    assert np.array_equal(label_ids_to_train_ids(label_ids), train_ids)
    save_paletted_png(str(tmp_path / "a.png"), train_ids, PALETTE)
    paletted = Image.open(tmp_path / "a.png")
    assert paletted.mode == "P"
    assert np.array_equal(np.asarray(paletted), train_ids)
    palette = np.array(paletted.getpalette()[: 3 * NUM_CLASSES], dtype=np.uint8).reshape(NUM_CLASSES, 3)
    assert np.array_equal(palette, PALETTE)


def test_shards_cover_every_image_once():
    for length in range(0, 12):
        for world_size in (1, 2, 3, 4, 8):
            covered = [i for rank in range(world_size) for i in shard(length, rank, world_size)]
            assert covered == list(range(length))


def test_without_save_pred_result_goes_beside_the_snapshot(demo):
    assert evaluate.main(_args(demo, "--whole")) == 0
    result = json.loads((demo["root"] / "snap" / "result.json").read_text())
    assert result["whole"] is True and result["mean_iou"] is not None


def test_channels_last_bf16_and_batched_tiles_evaluate_as_the_default_does(demo, tmp_path):
    scores = {}
    for name, flags in (("default", []), ("nhwc", ["--channels-last", "1"]), ("bf16", ["--amp", "bf16"]),
                        ("tiles", ["--tile-batch", "3"])):
        assert evaluate.main(_args(demo, *flags, "--save-pred", str(tmp_path / name))) == 0
        scores[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert scores["default"]["amp"] == "off" and scores["bf16"]["amp"] == "bf16"
    assert scores["nhwc"]["mean_iou"] == pytest.approx(scores["default"]["mean_iou"], abs=1e-3)
    assert scores["bf16"]["pixel_accuracy"] == pytest.approx(scores["default"]["pixel_accuracy"], abs=0.05)
    assert scores["tiles"]["mean_iou"] == pytest.approx(scores["default"]["mean_iou"], abs=1e-6)


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(demo, tmp_path, repo_root):
    extra = ["--scales", "0.75,1.0", "--flip"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): same arithmetic, same numbers
    try:
        evaluate.main(_args(demo, *extra, "--save-pred", str(tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(repo_root / "evaluate.py"), *_args(demo, *extra, "--save-pred", str(tmp_path / "dist"))]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    distributed = json.loads((tmp_path / "dist" / "result.json").read_text())
    assert distributed == single  # every IoU, the pixel count and the accuracy exactly
    names = sorted(os.listdir(tmp_path / "single" / "labelIds"))
    assert len(names) == 5 and names == sorted(os.listdir(tmp_path / "dist" / "labelIds"))
    for name in names:
        assert (tmp_path / "single" / "labelIds" / name).read_bytes() == (tmp_path / "dist" / "labelIds" / name).read_bytes()


def test_list_without_labels_writes_predictions_only(demo, tmp_path, failed_run):
    test_list = tmp_path / "test.lst"
    with open(demo["val"]) as handle:
        test_list.write_text("".join(line.split()[0] + "\n" for line in handle))
    args = _args(demo, "--whole")
    args[args.index(demo["val"])] = str(test_list)
    assert "--save-pred" in failed_run(evaluate.main, args)
    assert evaluate.main(args + ["--save-pred", str(tmp_path / "out")]) == 0
    assert len(os.listdir(tmp_path / "out" / "labelIds")) == 5
    assert not (tmp_path / "out" / "result.json").exists()


def test_wrong_checkpoint_is_a_clear_error(demo, tmp_path, failed_run):
    args = _args(demo, "--whole")
    assert "num_classes" in failed_run(evaluate.main, args + ["--num-classes", "7"])
    backbone_only = {key: value for key, value in torch.load(demo["snapshot"])["model"].items()
                     if not key.startswith(("head.", "dsn."))}
    save_checkpoint(backbone_only, tmp_path / "imagenet.pth")
    args[args.index(demo["snapshot"])] = str(tmp_path / "imagenet.pth")
    assert "missing" in failed_run(evaluate.main, args)
    args[args.index(str(tmp_path / "imagenet.pth"))] = str(tmp_path / "nothing.pth")
    assert "nothing.pth" in failed_run(evaluate.main, args)


@pytest.mark.extra("cityscapesscripts")
def test_scores_agree_with_the_official_cityscapes_scripts(demo, tmp_path, monkeypatch):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    out = tmp_path / "pred"
    assert evaluate.main(_args(demo, "--save-pred", str(out))) == 0
    ours = json.loads((out / "result.json").read_text())
    predicted = set()
    for path in (out / "labelIds").iterdir():
        predicted |= set(np.unique(label_ids_to_train_ids(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))).tolist())
    assert len(predicted) >= 3, "the test model should predict several classes"
    assert ours["num_images"] == 5 and len(list(out.glob("*.png"))) == 5
    for name, value in [("predictionPath", str(out / "labelIds")), ("predictionWalk", None),
                        ("evalInstLevelScore", False), ("JSONOutput", False), ("quiet", True)]:
        monkeypatch.setattr(official.args, name, value)
    ground_truths = sorted(str(path) for path in (Path(demo["data"]) / "gtFine" / "val").glob("*/*_labelIds.png"))
    predictions = [official.getPrediction(official.args, path) for path in ground_truths]
    theirs = official.evaluateImgLists(predictions, ground_truths, official.args)
    assert ours["mean_iou"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-12)
    for name in CLASS_NAMES:
        value = theirs["classScores"][name]
        if np.isnan(value):
            assert ours["iou"][name] is None
        else:
            assert ours["iou"][name] == pytest.approx(value, abs=1e-12)


def test_original_release_format_gives_the_same_scores(demo, tmp_path):
    """A raw DataParallel state dict (``module.`` keys, no ``num_batches_tracked``), as the original released."""
    state = torch.load(demo["snapshot"])["model"]
    original = {"module." + key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    torch.save(original, tmp_path / "CS_scenes_60000.pth")
    args = _args(demo, "--whole", "--save-pred")
    evaluate.main(args + [str(tmp_path / "ours")])
    args[args.index(demo["snapshot"])] = str(tmp_path / "CS_scenes_60000.pth")
    evaluate.main(args + [str(tmp_path / "original")])
    ours = json.loads((tmp_path / "ours" / "result.json").read_text())
    theirs = json.loads((tmp_path / "original" / "result.json").read_text())
    assert ours.pop("snapshot") != theirs.pop("snapshot")
    assert ours.pop("snapshot_checksum").startswith("blake2b:") and theirs.pop("snapshot_checksum") is None
    assert ours == theirs


def test_restore_from_a_file_url_evaluates_the_downloaded_copy(demo, tmp_path, monkeypatch):
    """A URL is downloaded into torch.hub's cache and scored like the file; result.json then goes to the current
    folder, not into the cache."""
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(_args(demo, "--whole", "--save-pred", str(tmp_path / "by_path"))) == 0
    by_url = _args(demo, "--whole")
    by_url[by_url.index("--restore-from") + 1] = Path(demo["snapshot"]).as_uri()
    assert evaluate.main(by_url) == 0
    assert sorted(path.name for path in cache.iterdir()) == ["CS_scenes_10.pth"]
    by_path = json.loads((tmp_path / "by_path" / "result.json").read_text())
    downloaded = json.loads((tmp_path / "result.json").read_text())
    assert downloaded.pop("snapshot") == str(cache / "CS_scenes_10.pth") and by_path.pop("snapshot") == demo["snapshot"]
    assert downloaded == by_path  # the same scores, and the checksum of the same tensors


def test_model_flags_default_to_the_snapshots_args(demo, capsys):
    args = _args(demo, "--whole")
    del args[args.index("--backbone"):args.index("--backbone") + 2]  # the snapshot's args say tiny
    assert evaluate.main(args) == 0
    assert "warning" not in capsys.readouterr().err
    namespace = evaluate.parse_args(["--restore-from", "x.pth", "--recurrence", "1"])
    resolve_model_args(namespace, {"args": {"backbone": "tiny", "recurrence": 2}})
    assert (namespace.model, namespace.backbone, namespace.recurrence, namespace.num_classes) == \
        ("ccnet", "tiny", 1, NUM_CLASSES)
    assert "--recurrence 1 differs from the snapshot's 2" in capsys.readouterr().err
    raw = evaluate.parse_args(["--restore-from", "x.pth"])  # an original release: a raw state dict
    resolve_model_args(raw, {"conv1.weight": torch.zeros(1)})
    assert (raw.model, raw.backbone, raw.recurrence, raw.num_classes) == ("ccnet", "resnet101", 2, NUM_CLASSES)
