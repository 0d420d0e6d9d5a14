"""train.py in-process on the generated dataset with the tiny backbone: learning, exact resume, errors."""
import csv
import os

import pytest
import torch

import train
from utils.checkpoint import load_checkpoint
from utils.cli import EXIT_USAGE
from utils.distributed import apply_gpu_choice


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data(num_train=6, num_val=1, height=64, width=128, seed=0)


def argv_for(demo, snapshot_dir, *extra, steps=4):
    return ["--data-dir", demo.root, "--data-list", demo.train_list, "--backbone", "tiny", "--norm", "bn",
            "--gpu", "cpu", "--input-size", "48,96", "--batch-size", "2", "--num-steps", str(steps),
            "--num-workers", "0", "--restore-from", "", "--snapshot-dir", str(snapshot_dir), *extra]


def run(demo, snapshot_dir, *extra, steps=4):
    return train.main(argv_for(demo, snapshot_dir, *extra, steps=steps))


def losses(snapshot_dir):
    with open(snapshot_dir / "logs" / "train_log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_loss_goes_down(demo, tmp_path):
    assert run(demo, tmp_path, "--input-size", "64,128", "--batch-size", "4", "--save-pred-every", "100",
               steps=20) == 0
    values = losses(tmp_path)
    assert len(values) == 20
    first, last = sum(values[:3]) / 3, sum(values[-5:]) / 5
    assert last < 0.6 * first, values
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["CS_scenes_20.pth"]


def test_resume_continues_exactly(demo, tmp_path):
    """4 iterations straight == 2 iterations, then --resume for 2 more, parameter for parameter (3 per epoch:
    the resumed part crosses an epoch boundary; augmentation and dropout on; the resumed run uses workers)."""
    augment = ("--random-mirror", "--random-scale", "--save-pred-every", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(demo, straight, *augment) == 0
    assert sorted(p.name for p in straight.glob("*.pth")) == ["CS_scenes_2.pth", "CS_scenes_4.pth"]
    assert run(demo, resumed, *augment, "--resume", str(straight / "CS_scenes_2.pth"), "--num-workers", "2") == 0
    expected, got = load_checkpoint(straight / "CS_scenes_4.pth"), load_checkpoint(resumed / "CS_scenes_4.pth")
    assert got["iteration"] == 4 and expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert losses(resumed) == losses(straight)[2:]


def test_snapshot_holds_everything_and_loads_weights_only(demo, tmp_path):
    assert run(demo, tmp_path, "--save-pred-every", "100", steps=1) == 0
    snapshot = load_checkpoint(tmp_path / "CS_scenes_1.pth")  # torch.load(weights_only=True)
    assert set(snapshot) == {"model", "optimizer", "iteration", "rng", "scaler", "args"}
    assert not any(key.startswith("module.") for key in snapshot["model"])
    assert snapshot["iteration"] == 1 and snapshot["args"]["backbone"] == "tiny"
    assert snapshot["rng"]["world_size"] == 1 and set(snapshot["rng"]["ranks"][0]) == {"torch", "cuda", "numpy",
                                                                                        "python"}


def test_non_finite_loss_stops_with_the_iteration(demo, tmp_path, monkeypatch, failed_run):
    class NanAtThirdIteration(train.CriterionDSN):
        calls = 0

        def forward(self, preds, target):
            NanAtThirdIteration.calls += 1
            loss = super().forward(preds, target)
            return loss * float("nan") if NanAtThirdIteration.calls == 3 else loss

    monkeypatch.setattr(train, "CriterionDSN", NanAtThirdIteration)
    error = failed_run(train.main, argv_for(demo, tmp_path, "--save-pred-every", "2"))
    assert error.startswith("non-finite loss at iteration 3") and "CS_scenes_2.pth" in error
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["CS_scenes_2.pth"]


def test_bad_list_line_is_one_line_error(demo, tmp_path, capsys, failed_run):
    bad_list = tmp_path / "bad.lst"
    bad_list.write_text(open(demo.train_list).readline() + "leftImg8bit/nope.png\tgtFine/nope.png\n")
    error = failed_run(train.main, ["--data-dir", demo.root, "--data-list", str(bad_list), "--backbone", "tiny",
                                    "--gpu", "cpu", "--snapshot-dir", str(tmp_path)])
    assert error == f"{bad_list} line 2: file not found: {demo.root}/leftImg8bit/nope.png"


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


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_with_amp_and_ohem(demo, tmp_path, amp, device, failed_run):
    argv = argv_for(demo, tmp_path, "--amp", amp, "--ohem", "1", steps=3)
    argv[argv.index("--gpu") + 1] = "0" if device.type == "cuda" else "cpu"
    if amp == "fp16" and device.type == "cpu":
        assert failed_run(train.main, argv) == "--amp fp16 needs a GPU; use --amp bf16 on the CPU"
        return
    assert train.main(argv) == 0
    snapshot = load_checkpoint(tmp_path / "CS_scenes_3.pth")
    assert all(torch.isfinite(value).all() for value in snapshot["model"].values() if value.is_floating_point())
    assert (snapshot["scaler"] != {}) == (amp == "fp16")


def test_more_gpu_ids_than_processes_is_a_one_line_error(demo, tmp_path, monkeypatch, failed_run):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after the test
    error = failed_run(train.main, argv_for(demo, tmp_path, "--gpu", "0,1,2,3"))
    assert error.startswith("--gpu 0,1,2,3") and "torchrun --nproc_per_node=4" in error
    with pytest.raises(ValueError, match="torchrun"):
        apply_gpu_choice("0,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    apply_gpu_choice("0,1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert apply_gpu_choice("cpu") is False


def test_resume_tolerates_an_amp_change_and_list_sizes():
    messages = []
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)
    enabled, disabled = torch.amp.GradScaler("cpu", enabled=True), torch.amp.GradScaler("cpu", enabled=False)
    train._load_scaler_state(enabled, disabled.state_dict(), messages.append)  # off -> fp16: {} saved
    train._load_scaler_state(disabled, saved.state_dict(), messages.append)  # fp16 -> off
    assert len(messages) == 2 and all("scaler starts afresh" in text for text in messages)
    messages.clear()
    train._load_scaler_state(enabled, saved.state_dict(), messages.append)
    assert messages == [] and enabled.get_scale() == 128.0
    args = train.parse_args(["--input-size", "48,96"])
    train._check_resumed_args({"input_size": [48, 96], "amp": "off"}, args, messages.append)
    assert messages == []
    train._check_resumed_args({"input_size": [48, 64]}, args, messages.append)
    assert len(messages) == 1 and "--input-size" in messages[0]


def test_ignore_label_must_not_be_a_class_id(capsys):
    assert train.parse_args(["--ignore-label", "-1"]).ignore_label == -1
    with pytest.raises(SystemExit):
        train.parse_args(["--ignore-label", "3"])
    assert "--ignore-label 3 is a class id" in capsys.readouterr().err
