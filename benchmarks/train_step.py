"""Time one training step (forward + backward + SGD step) of CCNet: precision, memory layout, torch.compile, batch.

    python -m benchmarks.train_step                    # CCNet-R101, 769x769, batch 2 and 8, {fp32, bf16} x {NCHW, NHWC}
    python -m benchmarks.train_step --batch-size 8 --amp bf16 --layouts nhwc --compile 0,1   # a subset
    python -m benchmarks.train_step --backbone tiny --size 129 --steps 3 --device cpu        # a quick look on a CPU

The step is train.py's (``engine.train_step``: the forward pass under autocast and the loss ``utils.loss.CriterionDSN``
as one module, ``torch.compile``'d with ``--compile 1``; backward; SGD, fused where train.py fuses it) on random
inputs: data loading is not timed. Every combination of the comma-separated ``--batch-size``, ``--norm``, ``--amp``,
``--layouts``, ``--compile``, ``--fused`` and ``--cudnn-benchmark`` values is a row, in that order of loops (the
first flag outermost), or ``--rows`` names the rows one by one (in order of importance, say); each runs in a fresh
process (``benchmarks.measure.run_isolated``): one first step, timed on
its own (it includes torch.compile's compilation and cuDNN's autotuning), ``--warmup`` - 1 more untimed steps, then
``--steps`` timed ones. Columns: the first step's time; the median step time and images/s; TFLOP/s and MFU: the step's
FLOPs (3x the forward pass's, counted by ``benchmarks.measure.count_gflops`` in training mode, both heads) over the
median time, and that over the matrix-product peak measured at the start of the run (``matmul_peak_tflops``: bf16
rows against the bf16 peak; fp32 rows against the TF32 peak where cuDNN's convolutions use TF32, torch's default,
else the fp32 one); the peak memory during the steps (``benchmarks.measure.PeakMemory``: GPU: allocated tensors; CPU:
the process's resident set, Python and torch included) and how much of it the steps added to the built model
(activations, gradients, optimizer state, workspace). Prints a Markdown table; ``--output`` also writes it to a file,
rewritten after each row (a run stopped half-way leaves the rows it measured).
"""
import argparse
import statistics
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.measure import (PeakMemory, add_device_argument, count_gflops, describe_device, matmul_peaks,
                                run_isolated, time_calls, write_lines)
from cc_attention import library
from engine.train_step import AMP_DTYPES, compile_forward_loss, fused_sgd_available, make_sgd, optimizer_step
from libs.norm import inplace_abn_available
from networks import BACKBONES, build_model
from utils.cli import (EXIT_OK, ArgumentParser, csv_choices, csv_of, parse_bool, parse_non_negative_int,
                       parse_positive_int, parse_size)
from utils.loss import CriterionDSN

NORM_CHOICES = ("bn", "inplace_abn")
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
LAYOUT_NAMES = {"nchw": "NCHW", "nhwc": "channels_last"}
NUM_CLASSES = 19


@dataclass(frozen=True)
class StepConfig:
    """One row of the table: the network, its input and how the step runs."""

    backbone: str
    size: Tuple[int, int]
    batch_size: int
    recurrence: int
    norm: str
    amp: str
    steps: int
    warmup: int
    device: str
    layout: str = "nchw"
    compile: bool = False
    fused: bool = False
    cudnn_benchmark: bool = True
    design_choice: Optional[Tuple[str, str]] = None  # a design choice of the attention kernels, else the defaults


def skip_reason(config: StepConfig) -> Optional[str]:
    """Why ``config`` cannot run here (shown in its row), or None."""
    if config.norm == "inplace_abn" and not inplace_abn_available():
        return "inplace_abn not installed (`make inplace-abn`)"
    if config.norm == "inplace_abn" and config.amp == "bf16":
        return "InPlaceABN rejects bfloat16"
    if config.amp == "fp16" and config.device != "cuda":
        return "fp16 needs a GPU"
    return None


def measure_steps(config: StepConfig) -> dict:
    """Run the steps of ``config`` in this process: ``{"first": seconds of the first step, "times": seconds per
    timed step, "peak", "growth"}`` (bytes, see ``PeakMemory``; the growth is over the built model, optimizer and
    inputs)."""
    device = torch.device(config.device)
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    if config.design_choice is not None:
        library.set_design_choice(*config.design_choice)
    torch.manual_seed(0)
    memory_format = LAYOUTS[config.layout]
    with device:  # initialized where it runs (fast on a GPU)
        model = build_model("ccnet", config.backbone, NUM_CLASSES, config.recurrence, config.norm)
    model = model.to(memory_format=memory_format).train()
    optimizer = make_sgd(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4, fused=config.fused)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    forward_and_loss = compile_forward_loss(model, CriterionDSN(), AMP_DTYPES[config.amp], config.compile)
    images = torch.randn(config.batch_size, 3, *config.size, device=device) * 50
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (config.batch_size, *config.size), device=device)

    def step():
        optimizer_step(forward_and_loss(images, labels), optimizer, scaler)

    with PeakMemory(config.device) as memory:
        (first,) = time_calls(step, 1, config.device, warmup=0)
        times = time_calls(step, config.steps, config.device, warmup=max(config.warmup - 1, 0))
    return {"first": first, "times": times, "peak": memory.peak, "growth": memory.growth}


def _peak_for(amp: str, peaks: Dict[str, float], device: str) -> Tuple[str, float]:
    """The matrix-product peak an ``amp`` row is compared with: (its name, TFLOP/s)."""
    if amp != "off":
        return amp, peaks[amp]
    if device == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32", peaks["tf32"]
    return "fp32", peaks["fp32"]


def _title(first: StepConfig, peaks: Optional[Dict[str, float]], step_gflops: float) -> str:
    height, width = first.size
    title = (f"Training step (forward + backward + SGD) of CCNet-{first.backbone}, R={first.recurrence}, "
             f"{height}x{width}, on {describe_device(first.device)}, torch {torch.__version__}; median of "
             f"{first.steps} steps after the first step and {max(first.warmup - 1, 0)} more warm-up; "
             f"{step_gflops:.4g} GFLOP per image and step (3x the forward pass).")
    if peaks is not None:
        title += (" Matrix-product peak measured in this run: " +
                  ", ".join(f"{name} {value:.3g} TFLOP/s" for name, value in peaks.items()) + ".")
        if first.device == "cuda":
            title += (f" TF32: {'on' if torch.backends.cudnn.allow_tf32 else 'off'} for cuDNN convolutions, "
                      f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} for matrix products (torch's "
                      "defaults: on, off); fp32 rows' MFU is against the "
                      f"{'TF32' if torch.backends.cudnn.allow_tf32 else 'fp32'} peak.")
    return title


def step_table(configs: Sequence[StepConfig], mfu: bool = True, output: Optional[str] = None) -> str:
    """A Markdown table of ``configs`` (each measured in a fresh process); the rows also go to stderr as they come
    and, with ``output``, the table so far to that file after each row. ``mfu``: measure the matrix-product peak
    first and add the TFLOP/s and MFU columns."""
    first = configs[0]
    peaks = run_isolated(matmul_peaks, first.device) if mfu else None
    step_gflops = {(config.backbone, config.size, config.recurrence): 0.0 for config in configs}
    for backbone, size, recurrence in step_gflops:
        step_gflops[backbone, size, recurrence] = 3 * count_gflops("ccnet", backbone, recurrence, size)["total"]
    memory = "peak GPU memory" if first.device == "cuda" else "peak RSS"
    lines = [_title(first, peaks, step_gflops[first.backbone, first.size, first.recurrence]), "",
             "| batch | norm | precision | layout | compile | SGD | cudnn.benchmark | first step | step time "
             f"| images/s | TFLOP/s | MFU | {memory} | added by the steps | attention kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    write_lines(output, lines)
    for config in configs:
        precision = "fp32" if config.amp == "off" else config.amp
        cells = (f"| {config.batch_size} | {config.norm} | {precision} | {LAYOUT_NAMES[config.layout]} | "
                 f"{'yes' if config.compile else 'no'} | {'fused' if config.fused else 'default'} | "
                 f"{('on' if config.cudnn_benchmark else 'off') if config.device == 'cuda' else '-'} |")
        reason = skip_reason(config)
        if reason is None:
            try:
                result = run_isolated(measure_steps, config)
            except Exception as error:  # shown in its row; the other configurations still run
                reason = f"{type(error).__name__}: {error}".splitlines()[0]
        kernels = "default" if config.design_choice is None else "=".join(config.design_choice)
        if reason is not None:
            lines.append(f"{cells} n/a: {reason} | | | | | | | {kernels} |")
        else:
            median = statistics.median(result["times"])
            tflops = config.batch_size * step_gflops[config.backbone, config.size, config.recurrence] / median / 1e3
            mfu_cell = "-"
            if peaks is not None:
                peak_name, peak = _peak_for(config.amp, peaks, config.device)
                mfu_cell = f"{100 * tflops / peak:.1f}% of {peak_name}"
            rate = f"| {tflops:.3g} | {mfu_cell} |"
            lines.append(f"{cells} {result['first']:.2f} s | {1000 * median:.1f} ms | {config.batch_size / median:.2f} "
                         f"{rate} {result['peak'] / 2 ** 30:.2f} GiB | {result['growth'] / 2 ** 30:.2f} GiB | "
                         f"{kernels} |")
        print(lines[-1], file=sys.stderr, flush=True)
        write_lines(output, lines)
    return "\n".join(lines)


def configs_for(backbone: str, size: Tuple[int, int], batch_sizes: Sequence[int], recurrence: int,
                norms: Sequence[str], amps: Sequence[str], steps: int, warmup: int, device: str,
                layouts: Sequence[str] = ("nchw",), compiles: Sequence[bool] = (False,),
                fused: Sequence[bool] = (False,), cudnn_benchmarks: Sequence[bool] = (True,)) -> List[StepConfig]:
    """Every combination, batch sizes outermost, then norms, precisions, layouts, compile, fused, cudnn.benchmark."""
    return [StepConfig(backbone, size, batch, recurrence, norm, amp, steps, warmup, device, layout, compiled,
                       fuse, autotune)
            for batch in batch_sizes for norm in norms for amp in amps for layout in layouts
            for compiled in compiles for fuse in fused for autotune in cudnn_benchmarks]


def parse_row(text: str) -> Tuple[int, str, str, bool, Optional[bool], Optional[bool]]:
    """``"8:bf16:nhwc:1"`` -> ``(8, "bf16", "nhwc", True, None, None)``: batch size, precision, layout, compile, and
    optionally fused SGD and cudnn.benchmark (``"8:bf16:nhwc:0:0:1"``; None: the flags' first value)."""
    parts = text.split(":")
    try:
        batch, amp, layout = int(parts[0]), parts[1], parts[2]
        switches = [parse_bool(part) for part in parts[3:]]
        valid = 4 <= len(parts) <= 6 and batch >= 1 and amp in AMP_DTYPES and layout in LAYOUTS
    except (ValueError, IndexError, argparse.ArgumentTypeError):
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"expected BATCH:PRECISION:LAYOUT:COMPILE[:FUSED[:CUDNN_BENCHMARK]], e.g. "
                                         f"8:bf16:nhwc:1 (precision {'/'.join(AMP_DTYPES)}, layout "
                                         f"{'/'.join(LAYOUTS)}, the switches 0/1), got {text!r}")
    compiled, fused, autotune = (switches + [None, None])[:3]
    return batch, amp, layout, compiled, fused, autotune


def parse_design_choice(text: str) -> Optional[Tuple[str, str]]:
    """``"default"`` -> None; ``"column_gemm=per_image"`` -> ``("column_gemm", "per_image")`` (checked against
    ``cc_attention.library.DESIGN_CHOICES``)."""
    if text == "default":
        return None
    name, _, value = text.partition("=")
    if value not in library.DESIGN_CHOICES.get(name, ((), ()))[1]:
        raise argparse.ArgumentTypeError(
            "expected default or NAME=VALUE with " + "; ".join(f"{choice}: {'/'.join(values)}" for choice, (_, values)
                                                                  in library.DESIGN_CHOICES.items()) + f", got {text!r}")
    return name, value


def main(argv=None) -> int:
    """Exit codes: 0 done (a configuration that failed says why in its row), 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=tuple(BACKBONES))
    parser.add_argument("--size", type=parse_size, default=(769, 769), help="crop size: SIZE or H,W")
    parser.add_argument("--batch-size", type=csv_of(parse_positive_int), default=[2, 8],
                        help="images per step, comma-separated")
    parser.add_argument("--recurrence", type=parse_non_negative_int, default=2, help="criss-cross attention loops R")
    parser.add_argument("--norm", type=csv_choices(NORM_CHOICES), default=["bn"],
                        help="normalizations to compare, comma-separated")
    parser.add_argument("--amp", type=csv_choices(tuple(AMP_DTYPES)), default=["off", "bf16"],
                        help="precisions to compare, comma-separated (fp16 needs a GPU)")
    parser.add_argument("--layouts", type=csv_choices(tuple(LAYOUTS)), default=list(LAYOUTS),
                        help="memory formats of the model and the input (nhwc = channels_last), comma-separated")
    parser.add_argument("--compile", type=csv_of(parse_bool), default=[False], metavar="0,1",
                        help="torch.compile of the forward pass and the loss: 0, 1 or 0,1")
    parser.add_argument("--fused", type=csv_of(parse_bool), default=None, metavar="0,1",
                        help="fused SGD step (default: what train.py does: fused on CUDA where torch has it)")
    parser.add_argument("--cudnn-benchmark", type=csv_of(parse_bool), default=[True], metavar="0,1",
                        help="cuDNN autotuning (train.py turns it on); no effect on the CPU")
    parser.add_argument("--steps", type=parse_positive_int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=parse_positive_int, default=3,
                        help="untimed steps first, the first one timed on its own (compilation, autotuning)")
    add_device_argument(parser)
    parser.add_argument("--rows", type=csv_of(parse_row), default=None, metavar="B:P:L:C[:F[:A]],...",
                        help="these rows, in this order, instead of the combinations: BATCH:PRECISION:LAYOUT:COMPILE"
                             "[:FUSED[:CUDNN_BENCHMARK]] each, e.g. 8:bf16:nhwc:1,2:off:nchw:0,8:bf16:nhwc:0:0 (the "
                             "norm, and fused and cudnn.benchmark where a row leaves them out: their flags' first "
                             "value)")
    parser.add_argument("--design-choices", type=csv_of(parse_design_choice), default=[None],
                        metavar="default,NAME=VALUE,...",
                        help="each row once per entry: default (the attention kernels' defaults) or a design choice "
                             "of the kernels switched, e.g. column_gemm=per_image (cc_attention.library."
                             "DESIGN_CHOICES); the last loop")
    parser.add_argument("--no-mfu", action="store_true", help="skip the matrix-product peak, TFLOP/s and MFU")
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    fused = args.fused if args.fused is not None else [fused_sgd_available(torch.device(args.device))]
    if args.rows:
        configs = [StepConfig(args.backbone, args.size, batch, args.recurrence, args.norm[0], amp, args.steps,
                              args.warmup, args.device, layout, compiled, fused[0] if fuse is None else fuse,
                              args.cudnn_benchmark[0] if autotune is None else autotune)
                   for batch, amp, layout, compiled, fuse, autotune in args.rows]
    else:
        configs = configs_for(args.backbone, args.size, args.batch_size, args.recurrence, args.norm, args.amp,
                              args.steps, args.warmup, args.device, args.layouts, args.compile, fused,
                              args.cudnn_benchmark)
    configs = [replace(config, design_choice=choice) for config in configs for choice in args.design_choices]
    print(step_table(configs, mfu=not args.no_mfu, output=args.output))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
