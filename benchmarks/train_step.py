"""Time one training step (forward + backward + SGD step) of CCNet: fp32 vs bf16, BatchNorm vs InPlaceABN.

    python benchmark_train.py                                   # CCNet-R101, 769x769, batch 2 (the paper's)
    python benchmark_train.py --backbone tiny --size 256 --steps 3   # a quick look on a CPU

Each configuration runs in a fresh process (so that peak memory is its own): ``--warmup`` untimed steps, then
``--steps`` timed ones; the table gives the median step time, images/s and the peak memory (GPU: the largest
``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set size, Python and torch included).
Inputs are random tensors: data loading is not timed. Prints a Markdown table (also written to ``--output``).
"""
import argparse
import multiprocessing
import resource
import statistics
import sys
import time

import torch

from utils.cli import parse_size

AMP_CHOICES = ("off", "bf16", "fp16")
NORM_CHOICES = ("bn", "inplace_abn")


def _csv(choices):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        unknown = [value for value in values if value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {choices}")
        return values
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="resnet101", help="resnet101, resnet50 or tiny")
    parser.add_argument("--size", type=parse_size, default=(769, 769), help="crop size: SIZE or H,W")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--recurrence", type=int, default=2, help="criss-cross attention loops R")
    parser.add_argument("--amp", type=_csv(AMP_CHOICES), default=["off", "bf16"],
                        help="precisions to compare, comma-separated (fp16 needs a GPU)")
    parser.add_argument("--norm", type=_csv(NORM_CHOICES), default=list(NORM_CHOICES),
                        help="normalizations to compare, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cuDNN, JIT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def _skip_reason(norm: str, amp: str, device: str) -> str | None:
    from libs.norm import inplace_abn_available

    if norm == "inplace_abn" and not inplace_abn_available():
        return "inplace_abn not installed (`make inplace-abn`)"
    if norm == "inplace_abn" and amp == "bf16":
        return "InPlaceABN rejects bfloat16"
    if amp == "fp16" and device != "cuda":
        return "fp16 needs a GPU"
    return None


def measure(args, norm: str, amp: str) -> dict:
    """Run the steps of one configuration in this process; returns step times (s) and peak memory (bytes)."""
    from networks import build_model
    from engine.train_step import AMP_DTYPES, forward_loss, optimizer_step
    from utils.loss import CriterionDSN

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("ccnet", args.backbone, 19, args.recurrence, norm).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    criterion = CriterionDSN()
    height, width = args.size
    images = torch.randn(args.batch_size, 3, height, width, device=device) * 50
    labels = torch.randint(0, 19, (args.batch_size, height, width), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer_step(forward_loss(model, criterion, images, labels, AMP_DTYPES[amp]), optimizer, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"times": times, "peak": peak}


def _child(args, norm, amp, queue) -> None:
    try:
        queue.put(measure(args, norm, amp))
    except Exception as error:  # reported in the table, the other configurations still run
        queue.put({"error": f"{type(error).__name__}: {error}".splitlines()[0]})


def run_isolated(args, norm: str, amp: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(args, norm, amp, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    height, width = args.size
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    memory_label = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    lines = [f"Training step (forward + backward + SGD) of CCNet-{args.backbone}, R={args.recurrence}, "
             f"{height}x{width}, batch {args.batch_size}, on {device_name}, torch {torch.__version__}; "
             f"median of {args.steps} steps after {args.warmup} warm-up.", "",
             f"| norm | precision | step time | images/s | {memory_label} |", "|---|---|---|---|---|"]
    for norm in args.norm:
        for amp in args.amp:
            precision = "fp32" if amp == "off" else amp
            reason = _skip_reason(norm, amp, args.device)
            result = {"error": reason} if reason else run_isolated(args, norm, amp)
            if "error" in result:
                lines.append(f"| {norm} | {precision} | n/a: {result['error']} | | |")
            else:
                median = statistics.median(result["times"])
                lines.append(f"| {norm} | {precision} | {median:.3f} s | {args.batch_size / median:.2f} | "
                             f"{result['peak'] / 2 ** 30:.2f} GiB |")
            print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
