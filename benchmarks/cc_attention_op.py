"""Benchmark of the criss-cross attention op against the original's plain-PyTorch formulation, side by side.

    python -m benchmarks.cc_attention_op                 # on a GPU: N = 1, 2, 8; float32, bfloat16; NCHW, NHWC
    python -m benchmarks.cc_attention_op --device cpu    # on the CPU: N = 1, 2; float32; NCHW
    python -m benchmarks.cc_attention_op --batch 8 --dtype bf16 --layout nhwc --repeats 50

For every (N, dtype, memory format) of the features (query and key C/8 channels, value C, H = W = --size), rows:

* ``op``: ``criss_cross_attention`` on the device's kernels (``kernels``), on the pure-PyTorch reference
  (``reference``), and the original's pure-PyTorch formulation (``plain``, :mod:`benchmarks.plain_attention`);
* ``RCCA R=2``: ``CrissCrossAttention`` applied twice, its fused 1x1 projections included, with the kernels and with
  the plain attention in their place;
* ``non-local``: one non-local block (inter channels C/2, ``networks.NonLocalBlock``), the paper's comparison.

Columns: forward and forward+backward time (median of --repeats after warm-up calls), the peak memory that one
forward and one forward+backward add (``benchmarks.measure.PeakMemory``: on CUDA allocated tensors; on the CPU the
resident set of a fresh process per row), and every ratio against the ``plain`` row of the same workload (the
non-local block against RCCA with the plain attention): speed-up = plain time / time, memory = peak / plain peak.
"""
import os
import statistics
import sys
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.measure import PeakMemory, add_device_argument, describe_device, run_isolated, time_calls
from benchmarks.plain_attention import plain_criss_cross_attention
from cc_attention import CrissCrossAttention, backends, criss_cross_attention
from networks import NonLocalBlock
from utils.cli import EXIT_OK, ArgumentParser, csv_choices, parse_positive_int

RECURRENCE = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (workload, implementation) in table order; each workload's ratios are against its "plain" row.
ROWS = (("op", "plain"), ("op", "reference"), ("op", "kernels"),
        ("rcca", "plain"), ("rcca", "kernels"), ("nonlocal", "non-local"))
WORKLOAD_LABELS = {"op": "op", "rcca": f"RCCA R={RECURRENCE}", "nonlocal": "non-local (C/2)"}
BASELINE_WORKLOAD = {"op": "op", "rcca": "rcca", "nonlocal": "rcca"}


@dataclass(frozen=True)
class Features:
    """The inputs of one group of rows: ``n`` images of ``channels`` x ``size`` x ``size`` features."""

    n: int
    channels: int
    size: int
    dtype: str
    layout: str
    device: str

    def random(self, generator: torch.Generator, channels: int) -> torch.Tensor:
        t = torch.randn(self.n, channels, self.size, self.size, generator=generator, device=self.device)
        return t.to(DTYPES[self.dtype]).contiguous(memory_format=LAYOUTS[self.layout])


def build_workload(workload: str, implementation: str, features: Features):
    """(forward closure, inputs that need gradients, gradient of the output) for one table row."""
    generator = torch.Generator(features.device).manual_seed(0)
    c = features.channels
    kernels = features.device
    if workload == "op":
        inputs = [features.random(generator, c // 8), features.random(generator, c // 8), features.random(generator, c)]
        if implementation == "plain":
            run = lambda: plain_criss_cross_attention(*inputs)  # noqa: E731
        else:
            backend = kernels if implementation == "kernels" else "reference"
            run = lambda: criss_cross_attention(*inputs, backend=backend)  # noqa: E731
    elif workload == "rcca":
        torch.manual_seed(0)
        module = CrissCrossAttention(c, backend=kernels).to(features.device, DTYPES[features.dtype])
        nn.init.constant_(module.gamma, 0.5)
        if implementation == "plain":
            def step(x):
                return module.gamma * plain_criss_cross_attention(*module.project(x)) + x
        else:
            step = module
        inputs = [features.random(generator, c)]

        def run():
            x = inputs[0]
            for _ in range(RECURRENCE):
                x = step(x)
            return x
    else:
        module = NonLocalBlock(c).to(features.device, DTYPES[features.dtype]).to(memory_format=LAYOUTS[features.layout])
        inputs = [features.random(generator, c)]
        run = lambda: module(inputs[0])  # noqa: E731
    for t in inputs:
        t.requires_grad_()
    return run, inputs, features.random(generator, c)


def phases(run, inputs, grad):
    """The forward alone (no graph kept) and the forward + backward of one row."""
    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        run().backward(grad)
        for t in inputs:
            t.grad = None

    return forward, forward_backward


def peak_growth_mib(workload: str, implementation: str, features: Features):
    """Peak memory (MiB) that one forward and one forward+backward add, after a small run that loads the kernels.
    On the CPU call it in a fresh process (:func:`benchmarks.measure.run_isolated`)."""
    small = Features(1, features.channels, 3, features.dtype, features.layout, features.device)
    small_run, _, small_grad = build_workload(workload, implementation, small)
    small_run().backward(small_grad)
    run, inputs, grad = build_workload(workload, implementation, features)
    peaks = []
    for phase in phases(run, inputs, grad):
        with PeakMemory(features.device) as memory:
            phase()
        peaks.append(memory.growth / 2**20)
    return peaks


def measure_row(workload: str, implementation: str, features: Features, repeats: int):
    """((forward s, forward+backward s), (forward MiB, forward+backward MiB)) of one row."""
    run, inputs, grad = build_workload(workload, implementation, features)
    times = [statistics.median(time_calls(phase, repeats, features.device, warmup=2))
             for phase in phases(run, inputs, grad)]
    del run, inputs, grad
    if features.device == "cpu":
        peaks = run_isolated(peak_growth_mib, workload, implementation, features)
    else:
        peaks = peak_growth_mib(workload, implementation, features)
    return times, peaks


def _ratio(peak: float, plain_peak: float) -> str:
    """``peak / plain_peak``, or n/a when the plain row's peak is below the measurement's resolution."""
    return f"{peak / plain_peak:.2f}" if plain_peak >= 1 else "n/a"


def run_benchmark(batches, dtypes, layouts, size, channels, repeats, device) -> str:
    lines = [
        f"Criss-cross attention on {describe_device(device)}, torch {torch.__version__}: query/key N x {channels // 8} "
        f"x {size} x {size}, value N x {channels} x {size} x {size}; median of {repeats} runs; kernels = "
        f"cc_attention's {device} kernels, plain = the original's pure-PyTorch formulation.",
        "",
        "| N | dtype | layout | workload | implementation | fwd ms | fwd+bwd ms | peak MiB fwd | peak MiB fwd+bwd "
        "| vs plain: speed-up fwd / fwd+bwd | vs plain: memory fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in batches:
        for dtype in dtypes:
            for layout in layouts:
                features = Features(n, channels, size, dtype, layout, device)
                plain = {}
                for workload, implementation in ROWS:
                    label = f"| {n} | {dtype} | {layout} | {WORKLOAD_LABELS[workload]} | {implementation} |"
                    try:
                        times, peaks = measure_row(workload, implementation, features, repeats)
                    except Exception as error:  # one row fails (out of memory, no kernels): the others still run
                        lines.append(f"{label} n/a: {type(error).__name__}: {str(error).splitlines()[0][:160]} |"
                                     " | | | | |")
                        print(lines[-1], file=sys.stderr, flush=True)
                        continue
                    if implementation == "plain":
                        plain[workload] = (times, peaks)
                    plain_times, plain_peaks = plain.get(BASELINE_WORKLOAD[workload], (times, peaks))
                    memory_ratios = " / ".join(_ratio(peak, plain_peak) for peak, plain_peak in zip(peaks, plain_peaks))
                    lines.append(
                        f"{label} {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {peaks[0]:.0f} | {peaks[1]:.0f} | "
                        f"{plain_times[0] / times[0]:.2f}x / {plain_times[1] / times[1]:.2f}x | {memory_ratios} |"
                    )
                    print(lines[-1], file=sys.stderr, flush=True)  # progress; the whole table goes to stdout
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=parse_positive_int, nargs="+", default=None,
                        help="batch sizes (default: 1 2 8 on a GPU, 1 2 on the CPU)")
    parser.add_argument("--dtype", type=csv_choices(tuple(DTYPES)), default=None,
                        help="comma-separated dtypes (default: fp32,bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--layout", type=csv_choices(tuple(LAYOUTS)), default=None,
                        help="comma-separated memory formats of the features (default: nchw,nhwc on a GPU, nchw on "
                             "the CPU)")
    parser.add_argument("--size", type=parse_positive_int, default=97, help="feature map height = width")
    parser.add_argument("--channels", type=parse_positive_int, default=512, help="value channels C, >= 8")
    parser.add_argument("--repeats", type=parse_positive_int, default=None,
                        help="timed runs per measurement (default: 30 on a GPU, 5 on the CPU)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.channels < 8:
        parser.error(f"--channels must be >= 8 (the query and key have C/8), got {args.channels}")
    gpu = args.device == "cuda"
    os.environ.pop(backends.ENV_VAR, None)  # every row names its implementation
    print(run_benchmark(args.batch or ([1, 2, 8] if gpu else [1, 2]), args.dtype or (["fp32", "bf16"] if gpu else ["fp32"]),
                        args.layout or (["nchw", "nhwc"] if gpu else ["nchw"]), args.size, args.channels,
                        args.repeats or (30 if gpu else 5), args.device))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
