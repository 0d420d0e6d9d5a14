"""Benchmark of the criss-cross attention op against the original's plain-PyTorch formulation, side by side.

    python -m benchmarks.cc_attention_op                 # on a GPU: N = 1, 2, 8; float32, bfloat16; NCHW, NHWC
    python -m benchmarks.cc_attention_op --device cpu    # on the CPU: N = 1, 2; float32; NCHW
    python -m benchmarks.cc_attention_op --batch 8 --dtype bf16 --layout nhwc --repeats 50

For every (N, dtype, memory format) of the features (query and key C/8 channels, value C, H = W = --size), rows:

* ``op``: ``criss_cross_attention`` on the device's kernels (``kernels``), on the pure-PyTorch reference
  (``reference``), and the original's pure-PyTorch formulation (``plain``, :mod:`benchmarks.plain_attention`);
  with ``--design-choices``, the kernels again with one design choice switched to its alternative
  (``kernels, column_gemm=per_image``: ``cc_attention.library.DESIGN_CHOICES``);
* ``RCCA R=2``: ``CrissCrossAttention`` applied twice, its fused 1x1 projections included, with the kernels and with
  the plain attention in their place;
* ``non-local``: one non-local block (inter channels C/2, ``networks.NonLocalBlock``), the paper's comparison.

The rows of a (N, dtype, memory format) group are timed interleaved (``benchmarks.measure.time_interleaved``):
--repeats rounds of one forward and one forward+backward call of every row in turn, so that load on the machine
falls on all rows alike. Columns: forward and forward+backward time, median and [first quartile - third quartile] of
the rounds; the peak memory that one forward and one forward+backward add (``benchmarks.measure.PeakMemory``: on
CUDA allocated tensors; on the CPU the resident set of a fresh process per row); every ratio against the ``plain``
row of the same workload (the non-local block against RCCA with the plain attention): speed-up = the median [and
quartiles] of plain time / time paired round by round, memory = peak / plain peak. With ``--design-choices`` a
second table puts each choice's two sides next to each other: forward+backward time, and alternative / default
paired round by round (above 1: the default is faster).
"""
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from benchmarks.measure import (PeakMemory, add_device_argument, describe_device, paired_ratios, quartiles,
                                run_isolated, time_interleaved)
from benchmarks.plain_attention import plain_criss_cross_attention
from cc_attention import CrissCrossAttention, backends, criss_cross_attention, library
from networks import NonLocalBlock
from utils.cli import EXIT_OK, ArgumentParser, csv_choices, parse_positive_int

RECURRENCE = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (workload, implementation) in table order; each workload's ratios are against its "plain" row.
ROWS = (("op", "plain"), ("op", "reference"), ("op", "kernels"),
        ("rcca", "plain"), ("rcca", "kernels"), ("nonlocal", "non-local"))
# A design choice switched to one of its values for a kernels row: (name, value), or None for the process's own.
Choice = Optional[Tuple[str, str]]
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


def alternative_choices(names):
    """``[(name, the value it does not have now)]`` for each of the kernels' design choices ``names``."""
    library.load()
    return [(name, next(value for value in library.DESIGN_CHOICES[name][1] if value != library.design_choice(name)))
            for name in names]


def with_choice(run, choice: Choice):
    """``run`` with the kernels' design choice ``choice`` set during each call (then set back), or ``run`` itself."""
    if choice is None:
        return run
    name, value = choice

    def run_with_choice():
        saved = library.design_choice(name)
        library.set_design_choice(name, value)
        try:
            return run()
        finally:
            library.set_design_choice(name, saved)

    return run_with_choice


def build_workload(workload: str, implementation: str, features: Features, choice: Choice = None):
    """(forward closure, inputs that need gradients, gradient of the output) for one table row; ``choice``: a design
    choice of the kernels switched for a ``kernels`` row."""
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
    return with_choice(run, choice), inputs, features.random(generator, c)


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


def peak_growth_mib(workload: str, implementation: str, features: Features, choice: Choice = None):
    """Peak memory (MiB) that one forward and one forward+backward add, after a small run that loads the kernels.
    On the CPU call it in a fresh process (:func:`benchmarks.measure.run_isolated`)."""
    small = Features(1, features.channels, 3, features.dtype, features.layout, features.device)
    small_run, _, small_grad = build_workload(workload, implementation, small, choice)
    small_run().backward(small_grad)
    run, inputs, grad = build_workload(workload, implementation, features, choice)
    peaks = []
    for phase in phases(run, inputs, grad):
        with PeakMemory(features.device) as memory:
            phase()
        peaks.append(memory.growth / 2**20)
    return peaks


def _ratio(peak: float, plain_peak: float) -> str:
    """``peak / plain_peak``, or n/a when the plain row's peak is below the measurement's resolution."""
    return f"{peak / plain_peak:.2f}" if plain_peak >= 1 else "n/a"


def _spread(values, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """``median [first quartile-third quartile]`` of ``values`` times ``scale``."""
    first, median, third = (value * scale for value in quartiles(values))
    return f"{median:.{digits}f}{unit} [{first:.{digits}f}-{third:.{digits}f}]"


def _label(workload: str, implementation: str, choice: Choice) -> str:
    return implementation if choice is None else f"{implementation}, {choice[0]}={choice[1]}"


def measure_group(features: Features, rows, repeats: int):
    """``{row: ((forward times, forward+backward times), (forward MiB, forward+backward MiB))}`` for the rows
    ``(workload, implementation, choice)`` of one group, timed interleaved; a row that fails to build or run is
    ``{row: exception}``."""
    phase_functions, results = {}, {}
    for row in rows:
        try:
            run, inputs, grad = build_workload(*row[:2], features, row[2])
            for phase, function in zip(("fwd", "fwd+bwd"), phases(run, inputs, grad)):
                function()  # a row that cannot run fails here, alone
                phase_functions[row, phase] = function
        except Exception as error:  # out of memory, no kernels: the others still run
            phase_functions.pop((row, "fwd"), None)
            results[row] = error
    times = time_interleaved(phase_functions, repeats, features.device, warmup=2)
    phase_functions.clear()
    for row in rows:
        if row in results:
            continue
        try:
            if features.device == "cpu":
                peaks = run_isolated(peak_growth_mib, row[0], row[1], features, row[2])
            else:
                peaks = peak_growth_mib(row[0], row[1], features, row[2])
        except Exception as error:
            results[row] = error
            continue
        results[row] = ((times[row, "fwd"], times[row, "fwd+bwd"]), peaks)
    return results


def run_benchmark(batches, dtypes, layouts, size, channels, repeats, device, compared_choices=()) -> str:
    choices = alternative_choices(compared_choices) if compared_choices else []
    rows = [(workload, implementation, None) for workload, implementation in ROWS]
    rows[3:3] = [("op", "kernels", choice) for choice in choices]  # after the op's kernels row
    lines = [
        f"Criss-cross attention on {describe_device(device)}, torch {torch.__version__}: query/key N x {channels // 8} "
        f"x {size} x {size}, value N x {channels} x {size} x {size}; {repeats} rounds, the rows of a group "
        f"interleaved: median [first-third quartile]; kernels = cc_attention's {device} kernels, plain = the "
        f"original's pure-PyTorch formulation.",
        "",
        "| N | dtype | layout | workload | implementation | fwd ms | fwd+bwd ms | peak MiB fwd | peak MiB fwd+bwd "
        "| vs plain: speed-up fwd / fwd+bwd | vs plain: memory fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = ["", "Design choices of the kernels, side by side (forward+backward of the op; alternative / default "
             "above 1: the default is faster):", "",
             "| N | dtype | layout | choice | default fwd+bwd ms | alternative fwd+bwd ms | alternative / default |",
             "|---|---|---|---|---|---|---|"]
    for n in batches:
        for dtype in dtypes:
            for layout in layouts:
                features = Features(n, channels, size, dtype, layout, device)
                results = measure_group(features, rows, repeats)
                for workload, implementation, choice in rows:
                    label = (f"| {n} | {dtype} | {layout} | {WORKLOAD_LABELS[workload]} | "
                             f"{_label(workload, implementation, choice)} |")
                    result = results[workload, implementation, choice]
                    if isinstance(result, Exception):
                        lines.append(f"{label} n/a: {type(result).__name__}: {str(result).splitlines()[0][:160]} |"
                                     " | | | | |")
                        continue
                    times, peaks = result
                    plain_times, plain_peaks = times, peaks
                    baseline = results.get((BASELINE_WORKLOAD[workload], "plain", None))
                    if not isinstance(baseline, Exception) and baseline is not None:
                        plain_times, plain_peaks = baseline
                    speedups = " / ".join(_spread(paired_ratios(plain_phase, phase), unit="x")
                                          for plain_phase, phase in zip(plain_times, times))
                    memory_ratios = " / ".join(_ratio(peak, plain_peak) for peak, plain_peak in zip(peaks, plain_peaks))
                    lines.append(f"{label} {_spread(times[0], 1e3, digits=3)} | {_spread(times[1], 1e3, digits=3)} | "
                                 f"{peaks[0]:.0f} | {peaks[1]:.0f} | {speedups} | {memory_ratios} |")
                print("\n".join(lines[-len(rows):]), file=sys.stderr, flush=True)  # progress; the table -> stdout
                default = results[("op", "kernels", None)]
                for choice in choices:
                    alternative = results[("op", "kernels", choice)]
                    cells = f"| {n} | {dtype} | {layout} | {choice[0]}: {library.design_choice(choice[0])} vs {choice[1]} |"
                    if isinstance(default, Exception) or isinstance(alternative, Exception):
                        pairs.append(f"{cells} n/a | n/a | n/a |")
                        continue
                    pairs.append(f"{cells} {_spread(default[0][1], 1e3, digits=3)} | "
                                 f"{_spread(alternative[0][1], 1e3, digits=3)} | "
                                 f"{_spread(paired_ratios(alternative[0][1], default[0][1]))} |")
    return "\n".join(lines + (pairs if choices else []))


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
    parser.add_argument("--design-choices", type=csv_choices(tuple(library.DESIGN_CHOICES) + ("none",)),
                        default=None,
                        help="comma-separated design choices of the kernels to time with their other value too, "
                             f"or none (default: all on a GPU, none on the CPU): {', '.join(library.DESIGN_CHOICES)}")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.channels < 8:
        parser.error(f"--channels must be >= 8 (the query and key have C/8), got {args.channels}")
    gpu = args.device == "cuda"
    os.environ.pop(backends.ENV_VAR, None)  # every row names its implementation
    compared = args.design_choices if args.design_choices is not None else (list(library.DESIGN_CHOICES) if gpu
                                                                            else [])
    compared = [name for name in compared if name != "none"]
    print(run_benchmark(args.batch or ([1, 2, 8] if gpu else [1, 2]), args.dtype or (["fp32", "bf16"] if gpu else ["fp32"]),
                        args.layout or (["nchw", "nhwc"] if gpu else ["nchw"]), args.size, args.channels,
                        args.repeats or (30 if gpu else 9), args.device, compared))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
