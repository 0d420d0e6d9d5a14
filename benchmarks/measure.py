"""The one measurement helper of the benchmarks: the default device, timing, peak memory, process isolation.

* :func:`default_device`, :func:`add_device_argument` (``--device``), :func:`describe_device` (for a table's title).
* :func:`time_calls`: seconds per call, with the GPU synchronized before and after each call (CUDA runs
  asynchronously: without that, a timer measures the launch, not the work).
* :func:`time_interleaved`: several functions timed in rounds, one call of each per round, so that other load on
  the machine falls on all alike; :func:`quartiles` and :func:`paired_ratios` summarize them (median and spread).
* :class:`PeakMemory`: the peak memory of a ``with`` block. CPU: the resident set size, Python and torch included
  (Linux: the kernel's high-water mark VmHWM, reset when the block starts); CUDA: ``torch.cuda.max_memory_allocated``
  (tensors only; the allocator's cache and the CUDA context are not counted).
* :func:`run_isolated`: a call in a fresh process, so that a configuration's peak memory is its own and one that
  crashes (out of memory) does not take the others down.
* :func:`count_gflops`: the FLOPs of one forward pass of CCNet, counted on the meta device.
* :func:`write_lines`: a table's lines to its ``--output`` file (rewritten as rows come: a stopped run keeps them).
* :func:`matmul_peak_tflops`, :func:`matmul_peaks`: the measured rate of a large matrix product, per precision: the
  ceiling that MFU figures divide by.
"""
import argparse
import multiprocessing
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from cc_attention import CrissCrossAttention
from networks import build_model

# The modules whose FLOPs count as "attention" in count_gflops (RCCA and the non-local comparison head).
ATTENTION_MODULES = ("head.cca", "head.non_local")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda``, by default :func:`default_device`; ``cuda`` without a visible GPU is refused."""
    def parse_device(text: str) -> str:
        if text not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
        if text == "cuda" and not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("no CUDA GPU is visible")
        return text

    parser.add_argument("--device", type=parse_device, default=default_device(), help="cpu or cuda")


def describe_device(device: str) -> str:
    """What a table should say it was measured on: the GPU's name, or the CPU and the threads torch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(function: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``function()``, after ``warmup`` untimed calls (allocator, kernel
    builds, cuDNN's choice of algorithms)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(functions: Dict[str, Callable[[], object]], rounds: int, device: str,
                     warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each call of each of ``functions`` (name -> function), in ``rounds`` rounds of one call of every
    function in turn, after ``warmup`` untimed rounds; the GPU synchronized around each call."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (linear interpolation; one value: all three)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


def paired_ratios(numerators: List[float], denominators: List[float]) -> List[float]:
    """``numerators[i] / denominators[i]`` for each round ``i`` of :func:`time_interleaved`: a ratio of two rows
    measured side by side in every round, which load that drifts between rounds leaves alone."""
    return [n / d for n, d in zip(numerators, denominators)]


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _max_rss_bytes() -> int:
    """The process's peak resident set size since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as memory: ...`` then ``memory.peak`` and ``memory.growth``, in bytes.

    ``peak``: the highest level during the block (CPU: resident set size; CUDA: allocated tensors); ``growth``: the
    peak minus the level when the block started, i.e. what the block itself needed. Where the CPU's counter cannot
    be reset (not Linux), the process's peak since it started stands in: run the block in a fresh process
    (:func:`run_isolated`) to make it the block's own.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self.growth = 0
        self._start = 0
        self._resettable = False

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._resettable = _reset_cpu_peak()
            self._start = _proc_status_bytes("VmRSS") if self._resettable else _max_rss_bytes()
        return self

    def __exit__(self, *exception) -> None:
        synchronize(self.device)
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _proc_status_bytes("VmHWM") if self._resettable else _max_rss_bytes()
        self.growth = self.peak - self._start


def run_isolated(function: Callable, *args):
    """``function(*args)`` in a fresh (spawned) process: returns its result or raises its exception
    (``BrokenProcessPool`` when the process dies). ``function`` must be importable: a module's top-level function."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def count_gflops(name: str, backbone: str, recurrence: int, size: Tuple[int, int],
                 training: bool = True) -> Dict[str, float]:
    """GFLOPs of one forward pass of ``build_model(name, backbone, recurrence=recurrence)`` at batch 1 on a ``size``
    input: ``{"total", "head", "attention"}``. Counted by ``FlopCounterMode`` on the meta device (shapes only):
    convolutions and matrix products, 1 multiply-add = 2 FLOPs; element-wise work is not counted; the criss-cross
    attention on its reference (einsum) path. ``training``: training mode, both heads (what a training step
    computes); False: eval mode, without the auxiliary DSN head (what inference computes)."""
    with torch.device("meta"):
        model = build_model(name, backbone=backbone, recurrence=recurrence, norm="bn").train(training)
        for module in model.modules():
            if isinstance(module, CrissCrossAttention):
                module.backend = "reference"
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, *size))
    per_module = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    prefix = type(model).__name__ + "."
    attention = sum(per_module.get(prefix + key, 0) for key in ATTENTION_MODULES)
    return {
        "total": counter.get_total_flops() / 1e9,
        "head": per_module.get(prefix + "head", 0) / 1e9,
        "attention": attention / 1e9,
    }


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int, repeats: int = 10, tf32: bool = False) -> float:
    """TFLOP/s of ``torch.mm`` of two ``size x size`` matrices of ``dtype`` on ``device`` (median of ``repeats``
    after 3 warm-up calls; 2 * size**3 FLOPs a product). ``tf32``: float32 products on TF32 tensor cores (CUDA),
    for this call only."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        times = time_calls(lambda: torch.mm(a, b), repeats, device, warmup=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    times.sort()
    return 2 * size ** 3 / times[len(times) // 2] / 1e12


def matmul_peaks(device: str, size: Optional[int] = None) -> Dict[str, float]:
    """The measured matrix-product peak of each precision on ``device``, TFLOP/s: ``bf16`` and ``fp32`` (true
    float32), on CUDA also ``fp16`` and ``tf32``. ``size``: of the square matrices (default 8192 on a GPU, 1024 on
    the CPU)."""
    size = size or (8192 if device == "cuda" else 1024)
    peaks = {"bf16": matmul_peak_tflops(device, torch.bfloat16, size)}
    if device == "cuda":
        peaks["fp16"] = matmul_peak_tflops(device, torch.float16, size)
        peaks["tf32"] = matmul_peak_tflops(device, torch.float32, size, tf32=True)
    peaks["fp32"] = matmul_peak_tflops(device, torch.float32, size)
    return peaks


def write_lines(path: Optional[str], lines: List[str]) -> None:
    """Write ``lines`` (one per line) to ``path``, replacing it; nothing when ``path`` is None."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
