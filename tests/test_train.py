"""train.py in-process on the generated dataset with the tiny backbone: learning, exact resume, errors."""
import csv

import pytest
import torch

import train
from dataset.generate_demo import generate
from utils.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    lists = generate(str(root), num_train=6, num_val=1, height=64, width=128, seed=0)
    return str(root), lists["train"]


def run(demo, snapshot_dir, *extra, steps=4):
    root, train_list = demo
    argv = ["--data-dir", root, "--data-list", train_list, "--backbone", "tiny", "--norm", "bn", "--gpu", "cpu",
            "--input-size", "48,96", "--batch-size", "2", "--num-steps", str(steps), "--num-workers", "0",
            "--restore-from", "", "--snapshot-dir", str(snapshot_dir), *extra]
    return train.main(argv)


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


def test_non_finite_loss_stops_with_the_iteration(demo, tmp_path, monkeypatch, capsys):
    class NanAtThirdIteration(train.CriterionDSN):
        calls = 0

        def forward(self, preds, target):
            NanAtThirdIteration.calls += 1
            loss = super().forward(preds, target)
            return loss * float("nan") if NanAtThirdIteration.calls == 3 else loss

    monkeypatch.setattr(train, "CriterionDSN", NanAtThirdIteration)
    assert run(demo, tmp_path, "--save-pred-every", "2") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: non-finite loss at iteration 3") and "CS_scenes_2.pth" in error
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["CS_scenes_2.pth"]


def test_bad_list_line_is_one_line_error(demo, tmp_path, capsys):
    bad_list = tmp_path / "bad.lst"
    bad_list.write_text(open(demo[1]).readline() + "leftImg8bit/nope.png\tgtFine/nope.png\n")
    assert train.main(["--data-dir", demo[0], "--data-list", str(bad_list), "--backbone", "tiny", "--gpu", "cpu",
                       "--snapshot-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad_list} line 2: file not found: {demo[0]}/leftImg8bit/nope.png"


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "769,0"], "H,W"),
    (["--ohem", "maybe"], "0/1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_are_the_papers():
    args = train.parse_args([])
    assert (args.batch_size, args.input_size, args.learning_rate, args.momentum, args.weight_decay, args.power,
            args.num_steps, args.save_pred_every, args.recurrence, args.ohem, args.ohem_thres, args.ohem_keep,
            args.num_classes, args.ignore_label, args.snapshot_dir, args.amp) == \
        (8, (769, 769), 1e-2, 0.9, 1e-4, 0.9, 60000, 10000, 2, False, 0.7, 100000, 19, 255, "snapshots/", "off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_gpu_training_with_amp(demo, tmp_path, amp):
    root, train_list = demo
    argv = ["--data-dir", root, "--data-list", train_list, "--backbone", "tiny", "--norm", "bn", "--gpu", "0",
            "--input-size", "48,96", "--batch-size", "2", "--num-steps", "3", "--num-workers", "0",
            "--restore-from", "", "--snapshot-dir", str(tmp_path), "--amp", amp, "--ohem", "1"]
    assert train.main(argv) == 0
    snapshot = load_checkpoint(tmp_path / "CS_scenes_3.pth")
    assert all(torch.isfinite(value).all() for value in snapshot["model"].values() if value.is_floating_point())
    assert (snapshot["scaler"] != {}) == (amp == "fp16")


def test_more_gpu_ids_than_processes_is_a_one_line_error(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert run(demo, tmp_path, "--gpu", "0,1,2,3") == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --gpu 0,1,2,3") and "torchrun --nproc_per_node=4" in error
    import evaluate
    with pytest.raises(ValueError, match="torchrun"):
        evaluate.apply_gpu_choice("0,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.too_many_gpus_message("0,1") is None and train.too_many_gpus_message("cpu") is None


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
