"""Time one training step (forward + backward + SGD step) of CCNet: fp32 vs bf16, BatchNorm vs InPlaceABN.

    python -m benchmarks.train_step                                    # CCNet-R101, 769x769, batch 2 (the paper's)
    python -m benchmarks.train_step --backbone tiny --size 256 --steps 3   # a quick look on a CPU

The step is train.py's (``engine.train_step``, the loss ``utils.loss.CriterionDSN``) on random inputs: data
loading is not timed. Each configuration runs in a fresh process (``benchmarks.measure.run_isolated``):
``--warmup`` untimed steps, then ``--steps`` timed ones. The table gives the median step time, images/s, the peak
memory during the steps (``benchmarks.measure.PeakMemory``: GPU: allocated tensors; CPU: the process's resident
set, Python and torch included) and how much of it the steps added to the built model (activations, gradients,
optimizer state, workspace). Prints a Markdown table (also written to ``--output``).
"""
import statistics
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from benchmarks.measure import PeakMemory, add_device_argument, describe_device, run_isolated, time_calls
from engine.train_step import AMP_DTYPES, forward_loss, optimizer_step
from libs.norm import inplace_abn_available
from networks import BACKBONES, build_model
from utils.cli import (EXIT_OK, ArgumentParser, csv_choices, parse_non_negative_int, parse_positive_int,
                       parse_size)
from utils.loss import CriterionDSN

NORM_CHOICES = ("bn", "inplace_abn")
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
    """Run the steps of ``config`` in this process: ``{"times": seconds per timed step, "peak", "growth"}`` (bytes,
    see ``PeakMemory``; the growth is over the built model, optimizer and inputs)."""
    device = torch.device(config.device)
    torch.manual_seed(0)
    model = build_model("ccnet", config.backbone, NUM_CLASSES, config.recurrence, config.norm).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    criterion = CriterionDSN()
    images = torch.randn(config.batch_size, 3, *config.size, device=device) * 50
    labels = torch.randint(0, NUM_CLASSES, (config.batch_size, *config.size), device=device)

    def step():
        optimizer_step(forward_loss(model, criterion, images, labels, AMP_DTYPES[config.amp]), optimizer, scaler)

    with PeakMemory(config.device) as memory:
        times = time_calls(step, config.steps, config.device, warmup=config.warmup)
    return {"times": times, "peak": memory.peak, "growth": memory.growth}


def step_table(configs: Sequence[StepConfig]) -> str:
    """A Markdown table of ``configs`` (each measured in a fresh process); the rows also go to stderr as they come."""
    first = configs[0]
    height, width = first.size
    memory = "peak GPU memory" if first.device == "cuda" else "peak RSS"
    lines = [f"Training step (forward + backward + SGD) of CCNet-{first.backbone}, R={first.recurrence}, "
             f"{height}x{width}, batch {first.batch_size}, on {describe_device(first.device)}, torch "
             f"{torch.__version__}; median of {first.steps} steps after {first.warmup} warm-up.", "",
             f"| norm | precision | step time | images/s | {memory} | added by the steps |",
             "|---|---|---|---|---|---|"]
    for config in configs:
        precision = "fp32" if config.amp == "off" else config.amp
        reason = skip_reason(config)
        if reason is None:
            try:
                result = run_isolated(measure_steps, config)
            except Exception as error:  # shown in its row; the other configurations still run
                reason = f"{type(error).__name__}: {error}".splitlines()[0]
        if reason is not None:
            lines.append(f"| {config.norm} | {precision} | n/a: {reason} | | | |")
        else:
            median = statistics.median(result["times"])
            lines.append(f"| {config.norm} | {precision} | {median:.3f} s | {config.batch_size / median:.2f} | "
                         f"{result['peak'] / 2 ** 30:.2f} GiB | {result['growth'] / 2 ** 30:.2f} GiB |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def configs_for(backbone: str, size: Tuple[int, int], batch_size: int, recurrence: int, norms: List[str],
                amps: List[str], steps: int, warmup: int, device: str) -> List[StepConfig]:
    """Every (norm, precision) pair, norms outer."""
    return [StepConfig(backbone, size, batch_size, recurrence, norm, amp, steps, warmup, device)
            for norm in norms for amp in amps]


def main(argv=None) -> int:
    """Exit codes: 0 done (a configuration that failed says why in its row), 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=tuple(BACKBONES))
    parser.add_argument("--size", type=parse_size, default=(769, 769), help="crop size: SIZE or H,W")
    parser.add_argument("--batch-size", type=parse_positive_int, default=2, help="images per step")
    parser.add_argument("--recurrence", type=parse_non_negative_int, default=2, help="criss-cross attention loops R")
    parser.add_argument("--amp", type=csv_choices(tuple(AMP_DTYPES)), default=["off", "bf16"],
                        help="precisions to compare, comma-separated (fp16 needs a GPU)")
    parser.add_argument("--norm", type=csv_choices(NORM_CHOICES), default=list(NORM_CHOICES),
                        help="normalizations to compare, comma-separated")
    parser.add_argument("--steps", type=parse_positive_int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=parse_non_negative_int, default=2,
                        help="untimed steps first (allocator, cuDNN, JIT)")
    add_device_argument(parser)
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    table = step_table(configs_for(args.backbone, args.size, args.batch_size, args.recurrence, args.norm, args.amp,
                                   args.steps, args.warmup, args.device))
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
