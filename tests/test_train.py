"""train.py in-process on the generated dataset with the tiny backbone: learning, exact resume, errors."""
import csv
import os

import pytest
import torch

import train
from engine.train_step import load_optimizer_state, make_sgd, use_channels_last
from engine.training_run import check_resumed_args, load_scaler_state
from utils.checkpoint import CHECKSUM_KEY, load_checkpoint
from utils.cli import EXIT_USAGE
from utils.distributed import apply_gpu_choice


def run(training_demo, snapshot_dir, *extra, steps=4):
    return train.main(training_demo.training_argv(snapshot_dir, *extra, steps=steps))


def losses(snapshot_dir):
    with open(snapshot_dir / "logs" / "train_log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_loss_goes_down(training_demo, tmp_path):
    assert run(training_demo, tmp_path, "--input-size", "64,128", "--batch-size", "4", "--save-pred-every", "100",
               steps=20) == 0
    values = losses(tmp_path)
    assert len(values) == 20
    first, last = sum(values[:3]) / 3, sum(values[-5:]) / 5
    assert last < 0.6 * first, values
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["CS_scenes_20.pth"]


def test_resume_continues_exactly(training_demo, tmp_path):
    """4 iterations straight == 2 iterations, then --resume for 2 more, parameter for parameter (3 per epoch:
    the resumed part crosses an epoch boundary; augmentation and dropout on; the resumed run uses workers)."""
    augment = ("--random-mirror", "--random-scale", "--save-pred-every", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(training_demo, straight, *augment) == 0
    assert sorted(p.name for p in straight.glob("*.pth")) == ["CS_scenes_2.pth", "CS_scenes_4.pth"]
    assert run(training_demo, resumed, *augment, "--resume", str(straight / "CS_scenes_2.pth"),
               "--num-workers", "2") == 0
    expected, got = load_checkpoint(straight / "CS_scenes_4.pth"), load_checkpoint(resumed / "CS_scenes_4.pth")
    assert got["iteration"] == 4 and expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert losses(resumed) == losses(straight)[2:]


def test_snapshot_holds_everything_and_loads_weights_only(training_demo, tmp_path):
    assert run(training_demo, tmp_path, "--save-pred-every", "100", steps=1) == 0
    snapshot = load_checkpoint(tmp_path / "CS_scenes_1.pth")  # torch.load(weights_only=True)
    assert set(snapshot) == {"model", "optimizer", "iteration", "rng", "scaler", "args", CHECKSUM_KEY}
    assert not any(key.startswith("module.") for key in snapshot["model"])
    assert snapshot["iteration"] == 1 and snapshot["args"]["backbone"] == "tiny"
    assert snapshot["rng"]["world_size"] == 1 and set(snapshot["rng"]["ranks"][0]) == {"torch", "cuda", "numpy",
                                                                                        "python"}


def test_non_finite_loss_stops_with_the_iteration(training_demo, tmp_path, monkeypatch, failed_run):
    class NanAtThirdIteration(train.CriterionDSN):
        calls = 0

        def terms(self, preds, target):
            NanAtThirdIteration.calls += 1
            terms = super().terms(preds, target)
            return {**terms, "total": terms["total"] * float("nan")} if NanAtThirdIteration.calls == 3 else terms

    monkeypatch.setattr(train, "CriterionDSN", NanAtThirdIteration)
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--save-pred-every", "2"))
    assert error.startswith("non-finite loss at iteration 3") and "CS_scenes_2.pth" in error
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["CS_scenes_2.pth"]


def test_bad_list_line_is_one_line_error(training_demo, tmp_path, capsys, failed_run):
    bad_list = tmp_path / "bad.lst"
    bad_list.write_text(open(training_demo.train_list).readline() + "leftImg8bit/nope.png\tgtFine/nope.png\n")
    error = failed_run(train.main, ["--data-dir", training_demo.root, "--data-list", str(bad_list),
                                    "--backbone", "tiny",
                                    "--gpu", "cpu", "--restore-from", "", "--snapshot-dir", str(tmp_path)])
    assert error == f"{bad_list} line 2: file not found: {training_demo.root}/leftImg8bit/nope.png"


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "769,0"], "H,W"),
    (["--ohem", "maybe"], "0/1"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--ohem-thres", "1.5"], "--ohem-thres: expected a number in [0, 1]"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == EXIT_USAGE and message in capsys.readouterr().err


def test_defaults_are_the_papers():
    args = train.parse_args([])
    assert (args.batch_size, args.input_size, args.learning_rate, args.momentum, args.weight_decay, args.power,
            args.num_steps, args.save_pred_every, args.recurrence, args.ohem, args.ohem_thres, args.ohem_keep,
            args.num_classes, args.ignore_label, args.snapshot_dir, args.amp) == \
        (8, (769, 769), 1e-2, 0.9, 1e-4, 0.9, 60000, 10000, 2, False, 0.7, 100000, 19, 255, "snapshots/", "off")
    assert args.channels_last is None and args.compile is False  # auto (on for CUDA), eager


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_with_amp_and_ohem(training_demo, tmp_path, amp, device, failed_run):
    argv = training_demo.training_argv(tmp_path, "--amp", amp, "--ohem", "1", steps=3)
    argv[argv.index("--gpu") + 1] = "0" if device.type == "cuda" else "cpu"
    if amp == "fp16" and device.type == "cpu":
        assert failed_run(train.main, argv) == "--amp fp16 needs a GPU; use --amp bf16 on the CPU"
        return
    assert train.main(argv) == 0
    snapshot = load_checkpoint(tmp_path / "CS_scenes_3.pth")
    assert all(torch.isfinite(value).all() for value in snapshot["model"].values() if value.is_floating_point())
    assert (snapshot["scaler"] != {}) == (amp == "fp16")


def test_more_gpu_ids_than_processes_is_a_one_line_error(training_demo, tmp_path, monkeypatch, failed_run):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after the test
    error = failed_run(train.main, training_demo.training_argv(tmp_path, "--gpu", "0,1,2,3"))
    assert error.startswith("--gpu 0,1,2,3") and "torchrun --nproc_per_node=4" in error
    with pytest.raises(ValueError, match="torchrun"):
        apply_gpu_choice("0,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if torch.cuda.device_count() >= 2:
        apply_gpu_choice("0,1")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert apply_gpu_choice("cpu") is False


def test_resume_tolerates_an_amp_change_and_list_sizes():
    messages = []
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)
    enabled, disabled = torch.amp.GradScaler("cpu", enabled=True), torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(enabled, disabled.state_dict(), messages.append)  # off -> fp16: {} saved
    load_scaler_state(disabled, saved.state_dict(), messages.append)  # fp16 -> off
    assert len(messages) == 2 and all("scaler starts afresh" in text for text in messages)
    messages.clear()
    load_scaler_state(enabled, saved.state_dict(), messages.append)
    assert messages == [] and enabled.get_scale() == 128.0
    args = train.parse_args(["--input-size", "48,96"])
    check_resumed_args({"input_size": [48, 96], "amp": "off"}, args, messages.append)
    assert messages == []
    check_resumed_args({"input_size": [48, 64]}, args, messages.append)
    assert len(messages) == 1 and "--input-size" in messages[0]


def test_ignore_label_must_not_be_a_class_id(capsys):
    assert train.parse_args(["--ignore-label", "-1"]).ignore_label == -1
    with pytest.raises(SystemExit):
        train.parse_args(["--ignore-label", "3"])
    assert "--ignore-label 3 is a class id" in capsys.readouterr().err


def _trained(argv):
    """train.train's model (one process)."""
    return train.train(train.parse_args(argv))


def _assert_same_training(expected_dir, actual_dir):
    """Losses within 1e-3 over the steps; the weights after the first step (a later step amplifies the float
    differences through the large inputs and batch-norm statistics of 2 small crops) within 1e-5."""
    assert losses(actual_dir) == pytest.approx(losses(expected_dir), rel=1e-3)
    expected = load_checkpoint(expected_dir / "CS_scenes_1.pth")["model"]
    actual = load_checkpoint(actual_dir / "CS_scenes_1.pth")["model"]
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_channels_last_trains_as_nchw_does(training_demo, tmp_path, capsys, device, monkeypatch):
    """3 steps with dropout, random scale and mirror: the same training within float tolerance (on a GPU: float32
    convolutions, not TF32; the SGD step fused)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    augment = ("--random-mirror", "--random-scale", "--save-pred-every", "1", "--gpu",
               "0" if device.type == "cuda" else "cpu")
    nchw_model = _trained(training_demo.training_argv(tmp_path / "nchw", *augment, "--channels-last", "0", steps=3))
    assert not nchw_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc_model = _trained(training_demo.training_argv(tmp_path / "nhwc", *augment, "--channels-last", "1", steps=3))
    log = capsys.readouterr().err
    assert "channels_last, torch.compile off" in log and ("fused SGD" in log) == (device.type == "cuda")
    assert nhwc_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc_model.layer4[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same_training(tmp_path / "nchw", tmp_path / "nhwc")
    assert use_channels_last(None, torch.device("cpu")) is False  # what --channels-last auto gives on the CPU


@pytest.mark.slow
def test_compile_and_channels_last_train_as_eager_nchw_does(training_demo, tmp_path, capsys):
    """--compile 1 --channels-last 1 against the eager NCHW run: the same training within float tolerance (the
    compiled dropout draws eager's random numbers: inductor's fallback_random). Without Inductor's on-disk caches:
    they key compiled graphs without the code of the op's fake kernels (another checkout's could be served)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    augment = ("--random-mirror", "--save-pred-every", "1")
    with torch._inductor.config.patch(fallback_random=True, force_disable_caches=True):
        _trained(training_demo.training_argv(tmp_path / "eager", *augment, steps=3))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        _trained(training_demo.training_argv(tmp_path / "compiled", *augment, "--compile", "1", "--channels-last", "1",
                                             steps=3))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step was compiled
    torch._dynamo.reset()
    output = capsys.readouterr()
    assert "channels_last, torch.compile on" in output.err
    assert "iteration 1 (the first of this run) took" in output.out and "torch.compile included" in output.out
    _assert_same_training(tmp_path / "eager", tmp_path / "compiled")


def test_channels_last_auto_and_the_optimizer_state_of_another_run():
    assert [use_channels_last(None, torch.device(kind), norm) for kind, norm in
            (("cpu", "bn"), ("cuda", "bn"), ("cuda", "syncbn"), ("cuda", "inplace_abn_sync"))] == [False, True, True,
                                                                                                  False]
    assert use_channels_last(True, torch.device("cpu")) and not use_channels_last(False, torch.device("cuda"))
    # a snapshot of a fused, NCHW optimizer resumed by a default one whose parameters are channels_last
    weight = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    saved = make_sgd([weight], lr=0.1, momentum=0.9, weight_decay=0.0, fused=True)
    weight.grad = torch.randn_like(weight)
    saved.step()
    expected = saved.state[weight]["momentum_buffer"].clone()
    resumed_weight = torch.nn.Parameter(weight.detach().clone().contiguous(memory_format=torch.channels_last))
    resumed = make_sgd([resumed_weight], lr=0.1, momentum=0.9, weight_decay=0.0)
    load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["fused"] is resumed.defaults["fused"] and not resumed.param_groups[0]["fused"]
    buffer = resumed.state[resumed_weight]["momentum_buffer"]
    assert buffer.is_contiguous(memory_format=torch.channels_last) and torch.equal(buffer, expected)
