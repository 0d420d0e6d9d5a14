"""train.py under ``torchrun --nproc_per_node=2`` on the CPU (gloo), eager and compiled: completes, ranks agree, one
snapshot.

This file is also the torchrun entry point: run as a script it trains via ``train.train`` and saves each rank's
final state dict to ``OUT_DIR/rank<r>.pt`` so that the test can compare the ranks (and the number of graphs
torch.compile made to ``OUT_DIR/graphs<r>.txt``).
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for the torchrun entry point below


def torchrun_training(tmp_path, data, snapshots, *flags) -> subprocess.CompletedProcess:
    """3 iterations of the tiny CCNet on ``data`` in 2 CPU processes (this file as the entry point)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp_path), "--data-dir", data.root, "--data-list", data.train_list, "--gpu", "cpu",
               "--backbone", "tiny", "--input-size", "48,96", "--batch-size", "4", "--num-steps", "3",
               "--save-pred-every", "100", "--num-workers", "0", "--restore-from", "", "--random-mirror",
               "--snapshot-dir", str(snapshots), *flags]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")  # compiled graphs of this checkout's op, not a cached one
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("speed", [(), ("--compile", "1", "--channels-last", "1")], ids=["eager", "compile"])
def test_torchrun_two_processes_on_cpu(tmp_path, demo_data, speed):
    """Eager, and torch.compile of the DDP-wrapped model and the loss (with channels_last)."""
    data = demo_data(num_train=8, num_val=1, height=48, width=96, seed=1)
    snapshots = tmp_path / "snapshots"
    result = torchrun_training(tmp_path, data, snapshots, *speed)
    assert "(norm bn) on 2 process(es)" in result.stderr and "2 images each" in result.stderr
    assert f"torch.compile {'on' if speed else 'off'}" in result.stderr
    graphs = [int((tmp_path / f"graphs{rank}.txt").read_text()) for rank in (0, 1)]
    assert all(count >= 1 for count in graphs) if speed else graphs == [0, 0]
    assert sorted(p.name for p in snapshots.glob("*.pth")) == ["CS_scenes_3.pth"]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    snapshot = torch.load(snapshots / "CS_scenes_3.pth", weights_only=True)
    assert all(torch.equal(snapshot["model"][key], rank0[key]) for key in rank0)
    assert snapshot["rng"]["world_size"] == 2
    # the ranks drew different dropout masks (seeded per rank) yet ended with the same weights
    assert not torch.equal(snapshot["rng"]["ranks"][0]["torch"], snapshot["rng"]["ranks"][1]["torch"])


@pytest.mark.slow
def test_torchrun_validation_scores_the_whole_list_once(tmp_path, demo_data):
    """--val-every under torchrun: 3 images over 2 processes (shares of 1 and 2), the confusion matrices summed:
    the last validation scores what evaluate.py scores on the final snapshot in one process."""
    import evaluate

    data = demo_data(num_train=8, num_val=3, height=48, width=96, seed=1)
    snapshots = tmp_path / "snapshots"
    torchrun_training(tmp_path, data, snapshots, "--val-every", "2", "--val-list", data.val_list)
    with open(snapshots / "logs" / "train_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert [bool(row["val_miou"]) for row in log] == [False, True, True]
    assert {p.name for p in snapshots.glob("*.pth")} == {"CS_scenes_3.pth", "CS_scenes_best.pth"}
    assert evaluate.main(["--restore-from", str(snapshots / "CS_scenes_3.pth"), "--data-dir", data.root,
                          "--data-list", data.val_list, "--gpu", "cpu", "--num-workers", "0",
                          "--save-pred", str(tmp_path / "predictions")]) == 0
    result = json.loads((tmp_path / "predictions" / "result.json").read_text())
    assert float(log[2]["val_miou"]) == pytest.approx(result["mean_iou"], abs=1e-12)
    assert float(log[2]["val_pixel_acc"]) == pytest.approx(result["pixel_accuracy"], abs=1e-12)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import train

    out_dir, argv = sys.argv[1], sys.argv[2:]
    model = train.train(train.parse_args(argv))  # leaves the process group at the end
    # parameters only: on the CPU, BatchNorm running statistics are per process (see train._norm_kind)
    torch.save({name: value.detach() for name, value in model.named_parameters()},
               os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    with open(os.path.join(out_dir, f"graphs{os.environ['RANK']}.txt"), "w") as handle:  # compiled graphs
        handle.write(str(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
