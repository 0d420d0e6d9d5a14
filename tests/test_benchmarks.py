"""The benchmarks: the measurement helper (timing, peak memory, process isolation), the model report's FLOP count,
and each benchmark's table on a tiny configuration."""
import os
import time

import pytest
import torch

from benchmarks import cc_attention_op, model_report, onnx_latency, train_step
from benchmarks.measure import PeakMemory, run_isolated, time_calls
from networks import BACKBONES

MIB = 2**20


def test_time_calls_times_each_call_after_the_warmup():
    calls = []

    def sleep():
        calls.append(None)
        time.sleep(0.02)

    times = time_calls(sleep, repeats=3, device="cpu", warmup=2)
    assert len(calls) == 5 and len(times) == 3
    assert all(0.02 <= seconds < 1.0 for seconds in times)


def test_peak_memory_counts_what_the_block_allocates(device):
    with PeakMemory(device.type) as before:
        pass
    with PeakMemory(device.type) as memory:
        block = torch.ones(64 * MIB, dtype=torch.uint8, device=device)
        del block
    assert 60 * MIB <= memory.growth < 80 * MIB + before.growth
    assert memory.peak >= memory.growth


def _process_id(offset: int) -> int:
    return os.getpid() + offset


@pytest.mark.slow
def test_run_isolated_runs_in_a_fresh_process_and_passes_errors_on():
    assert run_isolated(_process_id, 0) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        run_isolated(int, "not a number")


def test_model_report_counts_the_attention_flops_exactly():
    """The 1x1 projections and both einsum products of every recurrence loop (129x161 -> 17x21 at stride 8)."""
    channels, (height, width) = BACKBONES["tiny"].head_width, (17, 21)
    pixels = height * width
    macs_per_loop = (
        pixels * channels * (channels // 8) * 2  # query and key projections
        + pixels * channels * channels  # value projection
        + pixels * (height + width) * (channels // 8)  # energies (row and full column, self masked afterwards)
        + pixels * (height + width) * channels  # aggregation
    )
    for recurrence in (1, 2):
        counted = model_report.count_gflops("ccnet", "tiny", recurrence, (129, 161))
        assert counted["attention"] * 1e9 == pytest.approx(2 * macs_per_loop * recurrence, rel=1e-9)
        assert counted["attention"] < counted["head"] < counted["total"]
    assert model_report.count_gflops("baseline", "tiny", 0, (129, 161))["attention"] == 0


def test_model_report_lists_every_head(capsys):
    assert model_report.main(["--backbone", "tiny", "--sizes", "65", "--skip-memory"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| 65x65 |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["RCCA, R=1", "RCCA, R=2", "non-local", "no attention"]


@pytest.mark.slow
def test_train_step_table_measures_each_configuration(capsys):
    argv = ["--backbone", "tiny", "--size", "64", "--batch-size", "1", "--steps", "2", "--warmup", "1",
            "--amp", "off,fp16", "--norm", "bn", "--device", "cpu"]
    assert train_step.main(argv) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| bn |")]
    (fp32, fp16) = [[cell.strip() for cell in row] for row in rows]
    assert fp32[:2] == ["bn", "fp32"] and float(fp32[2].removesuffix(" s")) > 0
    assert 0 < float(fp32[5].removesuffix(" GiB")) <= float(fp32[4].removesuffix(" GiB"))
    assert fp16[2] == "n/a: fp16 needs a GPU"


@pytest.mark.slow
def test_op_benchmark_has_a_row_per_workload_and_implementation(capsys):
    assert cc_attention_op.main(["--batch", "1", "--size", "9", "--channels", "16", "--repeats", "1",
                                 "--layout", "nchw,nhwc", "--device", "cpu"]) == 0
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 1 |")]
    expected = [[layout, cc_attention_op.WORKLOAD_LABELS[workload], implementation]
                for layout in ("nchw", "nhwc") for workload, implementation in cc_attention_op.ROWS]
    assert [row[2:5] for row in rows] == expected
    assert all(float(row[5]) > 0 and float(row[6]) > 0 for row in rows)  # fwd, fwd+bwd ms
    plain_rows = [row for row in rows if row[4] == "plain"]
    assert plain_rows and all(row[9] == "1.00x / 1.00x" for row in plain_rows)


@pytest.mark.slow
@pytest.mark.extra("onnxscript")
@pytest.mark.extra("onnxruntime")
def test_onnx_latency_table_times_pytorch_and_onnxruntime_on_the_same_network(capsys):
    assert onnx_latency.main(["--backbone", "tiny", "--size", "65", "--repeats", "1"]) == 0
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| pytorch |", "| onnxruntime |"))]
    assert [row[:2] for row in rows] == [list(row) for row in onnx_latency.ROWS]
    assert all(row[2].endswith(("ms", " s")) and not row[2].startswith("n/a") for row in rows)
    for row in rows[:2]:  # PyTorch's logits against onnxruntime's
        difference, largest = float(row[4].split()[0]), float(row[4].split()[-1].rstrip(")"))
        assert difference <= 1e-4 * max(largest, 1.0) and largest > 0.1
