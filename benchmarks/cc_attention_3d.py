"""Benchmark of the 3-D (video) criss-cross attention against plain PyTorch and a 3-D non-local block, side by side.

    python -m benchmarks.cc_attention_3d                       # T = 1, 5; 65x65 and 97x97; C = 512 (C' = 64)
    python -m benchmarks.cc_attention_3d --sizes 33 --clip-lengths 1 3 --repeats 3

For every (T, size) of the features (query and key C/8 channels, value C, one clip of T frames of size x size):

* ``op``: ``criss_cross_attention_3d`` through its registered operator (``registered``: the analytic backward from
  the saved row / column / time blocks), through autograd on the reference (``reference``), and the original's
  plain-PyTorch ``bmm`` formulation (``plain``, :func:`plain_criss_cross_attention_3d`, its two faults mended);
* ``RCCA R=2``: ``CrissCrossAttention3D`` applied twice, with the registered operator and with the plain attention;
* ``non-local``: one non-local block over all ``T * size * size`` positions of the clip (inter channels C/2,
  ``networks.NonLocalBlock`` on the clip's positions), the paper's comparison; skipped (with the reason) when its
  attention matrix alone would need more than ``--max-attention-gib``.

The compiled 3-D kernels are not built yet: the ``registered`` rows run the operator's pure-PyTorch implementation.
Columns and ratios as in ``benchmarks.cc_attention_op`` (median times, peak memory from ``benchmarks.measure``,
ratios against the ``plain`` row of the workload; the non-local block against RCCA with the plain attention).
"""
import os
import statistics
import sys
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.cc_attention_op import phases
from benchmarks.measure import PeakMemory, add_device_argument, describe_device, run_isolated, time_calls
from cc_attention import CrissCrossAttention3D, backends, criss_cross_attention_3d
from networks import NonLocalBlock
from utils.cli import EXIT_OK, ArgumentParser, parse_positive_int

RECURRENCE = 2
ROWS = (("op", "plain"), ("op", "reference"), ("op", "registered"), ("rcca", "plain"), ("rcca", "registered"),
        ("nonlocal", "non-local"))
WORKLOAD_LABELS = {"op": "op", "rcca": f"RCCA R={RECURRENCE}", "nonlocal": "non-local (C/2)"}
BASELINE_WORKLOAD = {"op": "op", "rcca": "rcca", "nonlocal": "rcca"}
BYTES = 4  # float32


def _lines(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``(N, C, T, H, W) -> (N * <the other two axes>, C, L)``: the features of every line along ``axis`` (2: time,
    3: columns, 4: rows), a copy."""
    others = [dim for dim in (2, 3, 4) if dim != axis]
    return t.permute(0, *others, 1, axis).contiguous().view(-1, t.shape[1], t.shape[axis])


def plain_criss_cross_attention_3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The original's plain-PyTorch 3-D formulation (``functions3d.py``: one ``bmm`` per line of each axis, an
    infinite diagonal subtracted, one softmax over the concatenated energies), with its two faults mended: the time
    diagonal is masked too (the position is a key once, of its row), and the row attention goes back through the
    right permutation. ``(N, C', T, H, W)`` x ``(N, C', T, H, W)`` x ``(N, C, T, H, W)`` -> ``(N, C, T, H, W)``."""
    n, _, time, height, width = query.shape

    def energies(axis):
        length = query.shape[axis]
        energy = torch.bmm(_lines(query, axis).transpose(1, 2), _lines(key, axis))  # (lines, L, L')
        if axis == 4:
            return energy
        return energy - torch.diag(query.new_full((length,), float("inf")))  # the position is a row key only

    energy_time = energies(2).view(n, height, width, time, time).permute(0, 3, 1, 2, 4)  # (N, T, H, W, T')
    energy_columns = energies(3).view(n, time, width, height, height).permute(0, 1, 3, 2, 4)  # (N, T, H, W, H')
    energy_rows = energies(4).view(n, time, height, width, width)  # (N, T, H, W, W')
    attention = torch.softmax(torch.cat([energy_columns, energy_rows, energy_time], dim=4), dim=4)
    columns, rows, times = torch.split(attention, [height, width, time], dim=4)
    columns = columns.permute(0, 1, 3, 2, 4).contiguous().view(-1, height, height)
    rows = rows.contiguous().view(-1, width, width)
    times = times.permute(0, 2, 3, 1, 4).contiguous().view(-1, time, time)
    channels = value.shape[1]
    out_columns = torch.bmm(_lines(value, 3), columns.transpose(1, 2)).view(n, time, width, channels, height)
    out_rows = torch.bmm(_lines(value, 4), rows.transpose(1, 2)).view(n, time, height, channels, width)
    out_time = torch.bmm(_lines(value, 2), times.transpose(1, 2)).view(n, height, width, channels, time)
    return (out_columns.permute(0, 3, 1, 4, 2) + out_rows.permute(0, 3, 1, 2, 4)
            + out_time.permute(0, 3, 4, 1, 2))


def non_local_3d(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """A non-local block over every position of the clip ``x`` ``(N, C, T, H, W)``: the 2-D block on the clip's
    ``T * H`` rows of ``W`` positions (its 1x1 convolutions act per position, its attention over all of them)."""
    return block(x.flatten(2, 3)).view_as(x)


@dataclass(frozen=True)
class Clip:
    """The inputs of one group of rows: one clip of ``time`` frames of ``channels`` x ``size`` x ``size``."""

    time: int
    size: int
    channels: int
    device: str

    def random(self, generator: torch.Generator, channels: int) -> torch.Tensor:
        return torch.randn(1, channels, self.time, self.size, self.size, generator=generator, device=self.device)

    def non_local_gib(self) -> float:
        """GiB of the non-local block's float32 attention matrix."""
        return (self.time * self.size * self.size) ** 2 * BYTES / 2**30


def build_workload(workload: str, implementation: str, clip: Clip):
    """(forward closure, inputs that need gradients, gradient of the output) for one table row."""
    generator = torch.Generator(clip.device).manual_seed(0)
    c = clip.channels
    if workload == "op":
        inputs = [clip.random(generator, c // 8), clip.random(generator, c // 8), clip.random(generator, c)]
        if implementation == "plain":
            run = lambda: plain_criss_cross_attention_3d(*inputs)  # noqa: E731
        else:
            backend = "auto" if implementation == "registered" else "reference"
            run = lambda: criss_cross_attention_3d(*inputs, backend=backend)  # noqa: E731
    elif workload == "rcca":
        torch.manual_seed(0)
        module = CrissCrossAttention3D(c, backend="auto").to(clip.device)
        nn.init.constant_(module.gamma, 0.5)
        if implementation == "plain":
            def step(x):
                return module.gamma * plain_criss_cross_attention_3d(*module.project(x)) + x
        else:
            step = module
        inputs = [clip.random(generator, c)]

        def run():
            x = inputs[0]
            for _ in range(RECURRENCE):
                x = step(x)
            return x
    else:
        block = NonLocalBlock(c).to(clip.device)
        inputs = [clip.random(generator, c)]
        run = lambda: non_local_3d(block, inputs[0])  # noqa: E731
    for t in inputs:
        t.requires_grad_()
    return run, inputs, clip.random(generator, c)


def peak_growth_mib(workload: str, implementation: str, clip: Clip):
    """Peak memory (MiB) that one forward and one forward+backward add. On the CPU call it in a fresh process."""
    run, inputs, grad = build_workload(workload, implementation, clip)
    peaks = []
    for phase in phases(run, inputs, grad):
        with PeakMemory(clip.device) as memory:
            phase()
        peaks.append(memory.growth / 2**20)
    return peaks


def measure_row(workload: str, implementation: str, clip: Clip, repeats: int):
    """((forward s, forward+backward s), (forward MiB, forward+backward MiB)) of one row."""
    run, inputs, grad = build_workload(workload, implementation, clip)
    times = [statistics.median(time_calls(phase, repeats, clip.device, warmup=1))
             for phase in phases(run, inputs, grad)]
    del run, inputs, grad
    if clip.device == "cpu":
        peaks = run_isolated(peak_growth_mib, workload, implementation, clip)
    else:
        peaks = peak_growth_mib(workload, implementation, clip)
    return times, peaks


def run_benchmark(clip_lengths, sizes, channels, repeats, device, max_attention_gib) -> str:
    lines = [
        f"3-D criss-cross attention on {describe_device(device)}, torch {torch.__version__}: one clip, query/key "
        f"{channels // 8} x T x S x S, value {channels} x T x S x S, float32; median of {repeats} runs; registered = "
        "the ccnet operator (no compiled 3-D kernels yet: its pure-PyTorch implementation), plain = the original's "
        "bmm formulation, faults mended.",
        "",
        "| T | S | workload | implementation | fwd ms | fwd+bwd ms | peak MiB fwd | peak MiB fwd+bwd "
        "| vs plain: speed-up fwd / fwd+bwd | vs plain: memory fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for time in clip_lengths:
        for size in sizes:
            clip = Clip(time, size, channels, device)
            plain = {}
            for workload, implementation in ROWS:
                label = f"| {time} | {size} | {WORKLOAD_LABELS[workload]} | {implementation} |"
                if workload == "nonlocal" and clip.non_local_gib() > max_attention_gib:
                    lines.append(f"{label} skipped: its attention matrix alone needs {clip.non_local_gib():.1f} GiB "
                                 f"(--max-attention-gib {max_attention_gib:g}) | | | | | |")
                    continue
                try:
                    times, peaks = measure_row(workload, implementation, clip, repeats)
                except Exception as error:  # one row fails (out of memory): the others still run
                    lines.append(f"{label} n/a: {type(error).__name__}: {str(error).splitlines()[0][:160]} | | | | | |")
                    continue
                if implementation == "plain":
                    plain[workload] = (times, peaks)
                plain_times, plain_peaks = plain.get(BASELINE_WORKLOAD[workload], (times, peaks))
                memory = " / ".join(f"{peak / base:.2f}" if base >= 1 else "n/a"
                                    for peak, base in zip(peaks, plain_peaks))
                lines.append(f"{label} {times[0] * 1e3:.1f} | {times[1] * 1e3:.1f} | {peaks[0]:.0f} | {peaks[1]:.0f} | "
                             f"{plain_times[0] / times[0]:.2f}x / {plain_times[1] / times[1]:.2f}x | {memory} |")
                print(lines[-1], file=sys.stderr, flush=True)  # progress; the whole table goes to stdout
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("--clip-lengths", type=parse_positive_int, nargs="+", default=[1, 5], help="frames T")
    parser.add_argument("--sizes", type=parse_positive_int, nargs="+", default=[65, 97], help="feature map H = W")
    parser.add_argument("--channels", type=parse_positive_int, default=512, help="value channels C, >= 8")
    parser.add_argument("--repeats", type=parse_positive_int, default=None,
                        help="timed runs per measurement (default: 20 on a GPU, 3 on the CPU)")
    parser.add_argument("--max-attention-gib", type=float, default=16.0,
                        help="skip the non-local rows whose attention matrix needs more")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.channels < 8:
        parser.error(f"--channels must be >= 8 (the query and key have C/8), got {args.channels}")
    os.environ.pop(backends.ENV_VAR, None)  # every row names its implementation
    print(run_benchmark(args.clip_lengths, args.sizes, args.channels,
                        args.repeats or (20 if args.device == "cuda" else 3), args.device, args.max_attention_gib))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
