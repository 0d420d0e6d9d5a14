"""Benchmark of the criss-cross attention op and the RCCA block against a non-local block.

    python -m benchmarks.cc_attention_op [--batch 1 2] [--size 97] [--channels 512] [--repeats 5] [--device cpu]

Prints a Markdown table: for every workload (the op alone: ca_weight + softmax + ca_map; RCCA with R=2: the
module, 1x1 projections included, applied twice; a non-local block, embedded Gaussian, inter channels C/2) and
every backend available on the device: forward and forward+backward time (median of --repeats after a warm-up),
peak memory, achieved GFLOP/s (and as a share of the measured GEMM ceiling), and ratios against the reference
(plain PyTorch) row of the same workload. Peak memory (``benchmarks.measure.PeakMemory``): its growth during one
run of each phase; on CPU the resident set of a fresh process per row, on CUDA max_memory_allocated.
"""
import os
import statistics
import sys

import torch
from torch import nn

from benchmarks.measure import PeakMemory, add_device_argument, describe_device, run_isolated, time_calls
from cc_attention import CrissCrossAttention, backends, criss_cross_attention
from networks import NonLocalBlock  # the model's own block (its zero-initialized output conv: same cost)
from utils.cli import EXIT_OK, ArgumentParser, parse_positive_int

RECURRENCE = 2


def _flops(workload: str, n: int, c: int, size: int) -> float:
    """Multiply-adds x 2 of the convolutions and products (softmax and elementwise ops not counted)."""
    pixels = size * size
    keys = 2 * size - 1
    op = 2 * n * pixels * keys * (c // 8 + c)
    if workload == "op":
        return op
    if workload == "rcca":
        projections = 2 * n * pixels * c * (2 * (c // 8) + c)
        return RECURRENCE * (projections + op)
    return 2 * n * (pixels * c * c * 2 + pixels * pixels * c)  # non-local: 3 + 1 convs, two HW x HW products


def _build(workload: str, backend: str, n: int, c: int, size: int, device: str):
    """(forward closure, inputs needing grad, output-gradient tensor) for one table row."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    if workload == "op":
        inputs = [randn(n, c // 8, size, size), randn(n, c // 8, size, size), randn(n, c, size, size)]
        run = lambda: criss_cross_attention(*inputs, backend=backend)  # noqa: E731
    elif workload == "rcca":
        torch.manual_seed(0)
        module = CrissCrossAttention(c, backend=None if backend == "reference" else backend).to(device)
        nn.init.constant_(module.gamma, 0.5)
        inputs = [randn(n, c, size, size)]
        if backend == "reference":  # plain PyTorch: three 1x1 convolutions and the reference op
            def step(x):
                q, k, v = module.query_conv(x), module.key_conv(x), module.value_conv(x)
                return module.gamma * criss_cross_attention(q, k, v, backend="reference") + x
        else:
            step = module

        def run():
            x = inputs[0]
            for _ in range(RECURRENCE):
                x = step(x)
            return x
    else:
        module = NonLocalBlock(c).to(device)
        inputs = [randn(n, c, size, size)]
        run = lambda: module(inputs[0])  # noqa: E731
    for t in inputs:
        t.requires_grad_()
    return run, inputs, randn(n, c, size, size)


def _phases(run, inputs, grad):
    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        run().backward(grad)
        for t in inputs:
            t.grad = None

    return forward, forward_backward


def peak_growth_mib(workload, backend, n, c, size, device):
    """Peak memory growth (MiB) of one forward and of one forward+backward, after a small run that loads the
    kernels and starts the threads. On the CPU call it in a fresh process (``run_isolated``)."""
    run, inputs, grad = _build(workload, backend, n, c, size, device)
    small_run, _, small_grad = _build(workload, backend, 1, c, 3, device)
    small_run().backward(small_grad)
    peaks = []
    for phase in _phases(run, inputs, grad):
        with PeakMemory(device) as memory:
            phase()
        peaks.append(memory.growth / 2**20)
    return peaks


def gemm_ceiling(device: str, repeats: int) -> float:
    """GFLOP/s of a large float32 torch.mm on the device (TF32 off): the best of ``repeats`` runs (a ceiling)."""
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seconds = min(time_calls(lambda: torch.mm(a, b), repeats, device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * size**3 / seconds / 1e9


def rows_for(device: str):
    """(workload, label, backend) of every table row on the device."""
    kernel = device if backends.kernels(device) is not None else None
    rows = []
    for workload, name in (("op", "op (ca_weight + softmax + ca_map)"), ("rcca", f"RCCA R={RECURRENCE}")):
        rows.append((workload, name, "reference"))
        if kernel:
            rows.append((workload, name, kernel))
    rows.append(("nonlocal", "non-local (C/2)", "-"))
    return rows


def run_benchmark(batches, size, channels, repeats, device):
    ceiling = gemm_ceiling(device, repeats)
    lines = [
        f"Device: {describe_device(device)}, torch {torch.__version__}; input N x {channels} x {size} x {size}, "
        f"float32; GEMM ceiling (torch.mm float32): {ceiling:.0f} GFLOP/s.",
        "",
        "| N | workload | backend | fwd ms | fwd+bwd ms | peak MiB fwd | peak MiB fwd+bwd | GFLOP/s fwd (% ceiling) "
        "| speed-up fwd / fwd+bwd | memory fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in batches:
        reference = {}
        for workload, label, backend in rows_for(device):
            run, inputs, grad = _build(workload, backend, n, channels, size, device)
            forward, forward_backward = _phases(run, inputs, grad)
            times = [statistics.median(time_calls(phase, repeats, device)) for phase in (forward, forward_backward)]
            del run, inputs, grad, forward, forward_backward
            measured = (workload, backend, n, channels, size, device)
            peaks = run_isolated(peak_growth_mib, *measured) if device == "cpu" else peak_growth_mib(*measured)
            key = "rcca" if workload == "nonlocal" else workload
            if backend == "reference":
                reference[key] = (times, peaks)
            ref_times, ref_peaks = reference[key]
            gflops = _flops(workload, n, channels, size) / times[0] / 1e9
            lines.append(
                f"| {n} | {label} | {backend} | {times[0] * 1e3:.1f} | {times[1] * 1e3:.1f} | {peaks[0]:.0f} | "
                f"{peaks[1]:.0f} | {gflops:.0f} ({100 * gflops / ceiling:.0f}%) | "
                f"{ref_times[0] / times[0]:.2f}x / {ref_times[1] / times[1]:.2f}x | "
                f"{peaks[0] / max(ref_peaks[0], 1e-9):.2f} / {peaks[1] / max(ref_peaks[1], 1e-9):.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)  # progress; the whole table goes to stdout
    ceiling_end = gemm_ceiling(device, repeats)
    lines += [
        "",
        f"GEMM ceiling measured again after the rows: {ceiling_end:.0f} GFLOP/s (a large difference from the first "
        "measurement means the machine was not quiet).",
        "",
        "Ratios: against the reference row of the same workload (the non-local block against RCCA's reference: plain "
        "PyTorch, three 1x1 convolutions and the reference op). speed-up = reference time / time; memory = peak / "
        "reference peak. FLOPs count the 1x1 projections and the attention products (multiply-adds x 2).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=parse_positive_int, nargs="+", default=[1, 2], help="batch sizes")
    parser.add_argument("--size", type=parse_positive_int, default=97, help="feature map height = width")
    parser.add_argument("--channels", type=parse_positive_int, default=512, help="input channels C, >= 8")
    parser.add_argument("--repeats", type=parse_positive_int, default=5, help="timed runs per measurement")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.channels < 8:
        parser.error(f"--channels must be >= 8 (the query and key have C/8), got {args.channels}")
    os.environ.pop(backends.ENV_VAR, None)  # rows name their backend explicitly
    print(run_benchmark(args.batch, args.size, args.channels, args.repeats, args.device))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
