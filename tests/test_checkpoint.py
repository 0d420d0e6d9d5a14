"""Checkpoints: atomic save, weights_only load, one loader for our snapshots, the original's and ImageNet's."""
import os

import pytest
import torch
from torch import nn

from networks import CheckpointKeys, build_model
from utils.checkpoint import (CHECKSUM_KEY, CheckpointError, load_checkpoint, load_model_weights, save_checkpoint,
                              tensor_checksum)


@pytest.fixture()
def source_model():
    """A tiny model whose every tensor differs from a fresh one's (norm statistics included)."""
    torch.manual_seed(1)
    model = build_model(backbone="tiny", norm="bn")
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.02 - 0.01)
    return model


def fresh_model(num_classes: int = 19):
    torch.manual_seed(2)
    return build_model(backbone="tiny", norm="bn", num_classes=num_classes)


def original_format(model, ddp_prefix: bool, with_counters: bool):
    """The released snapshots' layout: a raw state dict, maybe `module.`-prefixed, maybe without counters."""
    prefix = "module." if ddp_prefix else ""
    return {prefix + key: value.clone() for key, value in model.state_dict().items()
            if with_counters or not key.endswith("num_batches_tracked")}


def assert_same_weights(model, reference, skip_counters=True):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if skip_counters and key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("ddp_prefix", [False, True])
@pytest.mark.parametrize("with_counters", [False, True])
def test_original_snapshot_loads_and_round_trips(tmp_path, source_model, ddp_prefix, with_counters):
    path = tmp_path / "CS_scenes_60000.pth"
    torch.save(original_format(source_model, ddp_prefix, with_counters), path)
    model = fresh_model()
    report = load_model_weights(model, path)
    assert not report.backbone_only and not report.missing and not report.unexpected
    assert_same_weights(model, source_model)
    # Round trip: our snapshot of the loaded model loads back into another model, counters included.
    save_checkpoint({"model": model.state_dict()}, tmp_path / "ours.pth")
    again = fresh_model()
    load_model_weights(again, tmp_path / "ours.pth")
    assert_same_weights(again, model, skip_counters=False)


def test_loaded_model_computes_the_same(source_model):
    model = fresh_model()
    load_model_weights(model, original_format(source_model, ddp_prefix=True, with_counters=False))
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], source_model.eval()(x)[0])


def test_our_snapshot_format_loads_with_weights_only(tmp_path, source_model):
    state = {
        "model": source_model.state_dict(),
        "optimizer": torch.optim.SGD(source_model.parameters(), lr=0.01, momentum=0.9).state_dict(),
        "iteration": 1234,
        "rng": {"torch": torch.get_rng_state(), "numpy_seed": 5},
        "scaler": {},
        "args": {"learning_rate": 0.01, "input_size": [769, 769], "recurrence": 2},
    }
    path = tmp_path / "snapshots" / "CS_scenes_1234.pth"
    save_checkpoint(state, path)
    assert sorted(os.listdir(path.parent)) == ["CS_scenes_1234.pth"]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 1234 and loaded["args"]["input_size"] == [769, 769]
    model = fresh_model()
    report = load_model_weights(model, loaded)
    assert len(report.loaded) == len(source_model.state_dict())
    assert_same_weights(model, source_model, skip_counters=False)


def test_imagenet_weights_load_into_the_backbone_only(tmp_path, source_model):
    imagenet = {key: value for key, value in source_model.state_dict().items()
                if not key.startswith(("head.", "dsn."))}
    imagenet["fc.weight"] = torch.zeros(1000, source_model.layer4[0].conv3.out_channels)
    imagenet["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet101-imagenet.pth"
    torch.save(imagenet, path)
    model = fresh_model(num_classes=7)
    head_before = {key: value.clone() for key, value in model.state_dict().items() if key.startswith("head.")}
    report = load_model_weights(model, path)
    assert report.backbone_only and report.skipped == ["fc.weight", "fc.bias"]
    assert not report.missing and not report.unexpected
    assert "fc.weight" in report.summary() and "backbone" in report.summary()
    state = model.state_dict()
    for key, value in imagenet.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    for key, value in head_before.items():
        assert torch.equal(state[key], value), key  # the heads keep their initialization
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model_weights(fresh_model(), path, backbone_only=False)


def test_num_classes_mismatch_is_refused(source_model):
    model = fresh_model(num_classes=21)
    before = model.conv1.weight.clone()
    with pytest.raises(CheckpointError, match="num_classes=19, the model 21"):
        load_model_weights(model, {"model": source_model.state_dict()})
    assert torch.equal(model.conv1.weight, before)  # nothing half-loaded


def test_missing_and_unexpected_keys_are_reported(source_model):
    state = original_format(source_model, ddp_prefix=False, with_counters=True)
    del state["layer2.0.conv2.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(layer2.0.conv2.weight\), 1 unexpected keys"):
        load_model_weights(fresh_model(), state)
    report = load_model_weights(fresh_model(), state, strict=False)
    assert report.missing == ["layer2.0.conv2.weight"] and report.unexpected == ["head.extra.weight"]
    assert "MISSING 1" in report.summary() and "UNEXPECTED 1" in report.summary()


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_model_weights(fresh_model(), corrupt)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="list.pth: expected a dict"):
        load_checkpoint(not_a_dict)
    odd = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2]}, odd)
    with pytest.raises(CheckpointError, match="odd.pth: neither a snapshot"):
        load_model_weights(fresh_model(), odd)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable objects cannot be saved")


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "snapshot.pth"
    save_checkpoint({"iteration": 1}, path)
    with pytest.raises(TypeError, match="Unpicklable objects cannot be saved"):
        save_checkpoint({"iteration": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"iteration": 1, CHECKSUM_KEY: tensor_checksum({"iteration": 1})}
    assert os.listdir(tmp_path) == ["snapshot.pth"]


class TwoPartNet(nn.Module):
    """A network other than CCNet, with its own key layout: ``body.*``, and the head ``classifier.*``."""

    checkpoint_keys = CheckpointKeys(head_prefixes=("classifier.",), classifiers=("classifier",),
                                     imagenet_classifier="imagenet_fc.")

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Conv2d(4, num_classes, 1)


def test_the_loader_reads_the_key_layout_from_the_model():
    source = TwoPartNet(num_classes=3)
    backbone = {"body.weight": source.body.weight, "body.bias": source.body.bias,
                "imagenet_fc.weight": torch.zeros(10, 4)}
    report = load_model_weights(TwoPartNet(num_classes=3), backbone)
    assert report.backbone_only and report.skipped == ["imagenet_fc.weight"]
    assert report.not_loaded == ["classifier.weight", "classifier.bias"]
    with pytest.raises(CheckpointError, match="num_classes=3, the model 5"):
        load_model_weights(TwoPartNet(num_classes=5), source.state_dict())
