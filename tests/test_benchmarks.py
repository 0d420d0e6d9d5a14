"""The benchmarks: the measurement helper (timing, peak memory, process isolation), the model report's FLOP count,
and each benchmark's table on a tiny configuration."""
import argparse
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import cc_attention_op, data_loader, inference, model_report, onnx_latency, train_step
from benchmarks.measure import PeakMemory, count_gflops, run_isolated, time_calls
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
        counted = count_gflops("ccnet", "tiny", recurrence, (129, 161))
        assert counted["attention"] * 1e9 == pytest.approx(2 * macs_per_loop * recurrence, rel=1e-9)
        assert counted["attention"] < counted["head"] < counted["total"]
    assert count_gflops("baseline", "tiny", 0, (129, 161))["attention"] == 0


def test_flop_count_of_eval_mode_leaves_out_exactly_the_dsn_head():
    spec, (height, width), classes = BACKBONES["tiny"], (17, 21), 19
    dsn_macs = height * width * (spec.layer3_channels * spec.head_width * 9 + spec.head_width * classes)
    training = count_gflops("ccnet", "tiny", 2, (129, 161))
    inference = count_gflops("ccnet", "tiny", 2, (129, 161), training=False)
    assert (training["total"] - inference["total"]) * 1e9 == pytest.approx(2 * dsn_macs, rel=1e-9)
    assert inference["head"] == training["head"] and inference["attention"] == training["attention"]


def test_model_report_lists_every_head(capsys):
    assert model_report.main(["--backbone", "tiny", "--sizes", "65", "--skip-memory"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| 65x65 |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["RCCA, R=1", "RCCA, R=2", "non-local", "no attention"]


@pytest.mark.slow
def test_train_step_table_measures_each_configuration(capsys, tmp_path):
    output = tmp_path / "table.md"
    argv = ["--backbone", "tiny", "--size", "64", "--batch-size", "1,2", "--steps", "2", "--warmup", "2",
            "--amp", "off,fp16", "--layouts", "nchw,nhwc", "--norm", "bn", "--device", "cpu", "--output", str(output)]
    assert train_step.main(argv) == 0
    printed = capsys.readouterr().out
    assert output.read_text() == printed
    title = printed.splitlines()[0]
    assert "Matrix-product peak measured in this run: bf16 " in title and ", fp32 " in title
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in printed.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [row[:4] for row in rows] == [[batch, "bn", amp, layout] for batch in ("1", "2") for amp in ("fp32", "fp16")
                                         for layout in ("NCHW", "channels_last")]
    for row in rows:
        if row[2] == "fp16":
            assert row[7] == "n/a: fp16 needs a GPU"
            continue
        first, step, images = float(row[7].removesuffix(" s")), float(row[8].removesuffix(" ms")), float(row[9])
        assert first > 0 and step > 0 and images == pytest.approx(int(row[0]) * 1000 / step, rel=0.02)
        tflops, mfu = float(row[10]), float(row[11].removesuffix("% of fp32"))
        assert tflops > 0 and 0 < mfu < 1000
        assert 0 < float(row[13].removesuffix(" GiB")) <= float(row[12].removesuffix(" GiB"))


def test_train_step_rows_are_read_one_by_one():
    assert train_step.parse_row("8:bf16:nhwc:1") == (8, "bf16", "nhwc", True, None, None)
    assert train_step.parse_row("2:off:nchw:0:1") == (2, "off", "nchw", False, True, None)
    assert train_step.parse_row("2:off:nchw:0:0:0") == (2, "off", "nchw", False, False, False)
    for text in ("8:bf16:nhwc", "0:off:nchw:0", "2:fp8:nchw:0", "2:off:nhcw:0", "2:off:nchw:maybe", "x:off:nchw:0",
                 "2:off:nchw:0:0:0:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCH:PRECISION:LAYOUT:COMPILE"):
            train_step.parse_row(text)


@pytest.mark.slow
def test_train_step_rows_run_in_the_order_given(capsys):
    argv = ["--backbone", "tiny", "--size", "33", "--rows", "2:off:nhwc:0,1:bf16:nchw:0:1", "--steps", "1",
            "--warmup", "1", "--no-mfu", "--device", "cpu"]
    assert train_step.main(argv) == 0
    rows = [row for row in _table_rows(capsys.readouterr().out, "") if row[0].isdigit()]
    assert [row[:6] for row in rows] == [["2", "bn", "fp32", "channels_last", "no", "default"],
                                         ["1", "bn", "bf16", "NCHW", "no", "fused"]]
    assert all(row[11] == "-" and float(row[10]) > 0 for row in rows)  # MFU left out, TFLOP/s kept


def test_train_step_compiles_where_asked(monkeypatch):
    """The row's compile flag reaches torch.compile (stood in for by a recorder: compiling is tested in
    tests/test_train.py), in the layout asked for."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    for compile_flag in (False, True):
        config = train_step.StepConfig("tiny", (33, 33), 1, 1, "bn", "off", steps=1, warmup=1, device="cpu",
                                       layout="nhwc", compile=compile_flag)
        result = train_step.measure_steps(config)
        assert result["first"] > 0 and len(result["times"]) == 1
    assert len(compiled) == 1 and compiled[0].network.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def _table_rows(text: str, first_cell: str):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_inference_benchmark_has_a_row_per_mode_precision_layout_and_tile_batch(capsys, tmp_path):
    output = tmp_path / "inference.md"
    assert inference.main(["--backbone", "tiny", "--image-size", "64,160", "--tile", "48", "--amp", "off,fp16",
                           "--tile-batch", "1,3", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                           "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.read_text() == printed and "sliding window: 10 tiles of 48x48" in printed
    rows = _table_rows(printed, "sliding") + _table_rows(printed, "whole")
    expected = [[mode, amp, layout, batch] for layout in ("NCHW", "channels_last") for amp in ("fp32", "fp16")
                for mode, batch in (("sliding", "1"), ("sliding", "3"), ("whole", "-"))]
    assert sorted(row[:4] for row in rows) == sorted(expected)
    for row in rows:
        if row[1] == "fp16":
            assert row[4] == "n/a: fp16 needs a GPU"
        else:
            seconds, rate, tflops = float(row[4]), float(row[5]), float(row[6])
            assert seconds > 0 and rate == pytest.approx(1 / seconds, rel=0.01) and tflops > 0


def test_data_loader_benchmark_times_samples_and_worker_counts(capsys, tmp_path):
    output = tmp_path / "loader.md"
    assert data_loader.main(["--images", "2", "--height", "64", "--width", "128", "--crop", "48,96",
                             "--workers", "0,2", "--batches-per-worker", "2", "--samples", "3",
                             "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.read_text() == printed and "from 2 generated 128x64 PNG scenes" in printed
    (whole,), (decoding,) = _table_rows(printed, "the whole"), _table_rows(printed, "of which decoding")
    assert 0 < float(decoding[1].split()[0]) < float(whole[1])
    rows = _table_rows(printed, "0 (main process)") + _table_rows(printed, "2 |")
    assert [row[0] for row in rows] == ["0 (main process)", "2"]
    assert all(float(row[1]) > 0 for row in rows)
    assert float(rows[1][2]) == pytest.approx(float(rows[1][1]) / 2, abs=0.06)  # per worker
    assert "100 images/s needs about" in printed


@pytest.mark.slow
def test_gpu_check_op_part_builds_tests_and_writes_the_op_table(repo_root, tmp_path):
    """benchmarks/gpu_check.sh OUT op with QUICK=1 (on the CPU: the GPU tests skip): every step ends with exit 0 and
    results.md holds the op table, plain PyTorch first; an unknown PART is a usage error."""
    env = dict(os.environ, QUICK="1", PYTHON=sys.executable)
    script = str(repo_root / "benchmarks" / "gpu_check.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "out"), "op"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("machine", "build the kernels", "GPU tests",
                 "criss-cross attention op (with each kernel design choice switched)"):
        assert f"== {name}: exit 0 after" in done.stdout
    assert "== throughput" not in done.stdout
    results = (tmp_path / "out" / "results.md").read_text()
    rows = _table_rows(results, "1 | fp32 | nchw | op |")
    assert [row[4] for row in rows] == ["plain", "reference", "kernels", "kernels, energy_dtype=input"]
    assert rows[0][9] == "1.00x [1.00-1.00] / 1.00x [1.00-1.00]"
    pairs = _table_rows(results, "1 | bf16 | nchw | energy_dtype: float32 vs input |")
    assert len(pairs) == 1 and all(float(cell.split()[0]) > 0 for cell in pairs[0][4:])
    bad = subprocess.run(["bash", script, str(tmp_path / "bad"), "everything"], capture_output=True, text=True)
    assert bad.returncode == 2 and "PART must be all, op, ab or throughput" in bad.stderr


@pytest.mark.slow
def test_gpu_check_ab_part_writes_the_training_step_pairs(repo_root, tmp_path):
    """benchmarks/gpu_check.sh OUT ab with QUICK=1 on the CPU: the norm pair's and the design choices' tables."""
    env = dict(os.environ, QUICK="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(repo_root / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "ab"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== GPU tests" not in done.stdout and "== throughput" not in done.stdout
    rows = _table_rows((tmp_path / "out" / "results.md").read_text(), "1 |")
    assert [(row[1], row[3]) for row in rows[:4]] == [("bn", "channels_last"), ("bn", "NCHW"),
                                                      ("inplace_abn", "channels_last"), ("inplace_abn", "NCHW")]
    assert [row[-1] for row in rows[4:]] == ["default", "column_gemm=per_image", "softmax_loads=scalar",
                                             "energy_dtype=input"]
    assert all(float(row[8].removesuffix(" ms")) > 0 for row in rows[:2] + rows[4:])


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_quickly_and_keeps_rows_past_a_timeout(repo_root, tmp_path):
    """QUICK=1 (tiny sizes; no compiled row, for time): every step's table, and the exit code; then timeouts: the
    training step's keeps the rows it finished, and the steps after it still run."""
    env = dict(os.environ, QUICK="1", PYTHON=sys.executable, TRAIN_ROWS="1:off:nchw:0,1:bf16:nhwc:0")
    script = str(repo_root / "benchmarks" / "gpu_check_throughput.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert files == ["data_loader.md", "gpu_check_throughput.log", "inference.md", "train_step.md"]
    for heading in ("## prepare", "## train_step", "## data_loader", "## inference", "0 step(s) failed"):
        assert heading in done.stdout
    assert len([line for line in (tmp_path / "out" / "train_step.md").read_text().splitlines()
                if line.startswith("| 1 |")]) == 2
    assert "The same with cudnn.benchmark on:" in (tmp_path / "out" / "inference.md").read_text()
    env.update(TIMEOUT_TRAIN="15", TIMEOUT_LOADER="1", TIMEOUT_INFERENCE="1",
               TRAIN_ROWS="1:off:nchw:0,1:off:nhwc:0,1:off:nhwc:0,1:off:nhwc:0,1:off:nhwc:0")
    done = subprocess.run(["bash", script, str(tmp_path / "stopped")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "(train_step: stopped by its 15 s timeout" in done.stdout
    rows = [line for line in (tmp_path / "stopped" / "train_step.md").read_text().splitlines()
            if line.startswith("| 1 |")]
    assert 1 <= len(rows) < 5 and "3 step(s) failed" in done.stdout
    assert "(inference: stopped by its 1 s timeout" in done.stdout  # the steps after a timeout still run


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
