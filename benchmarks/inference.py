"""Time the inference of one image with CCNet (random weights): sliding window and whole image, fp32 and bf16, NCHW
and channels_last, tiles one at a time or batched.

    python -m benchmarks.inference                          # CCNet-R101, one 1024x2048 image, 769x769 tiles
    python -m benchmarks.inference --amp bf16 --layouts nhwc --modes sliding --tile-batch 1,8   # a subset
    python -m benchmarks.inference --backbone tiny --image-size 256,512 --tile 129 --device cpu   # a quick look

What evaluate.py and predict.py run for an image: ``utils.inference.predict_logits`` (sliding window of ``--tile``
tiles with 1/3 overlap, or the whole image) of the model in eval mode (without the auxiliary head) wrapped in
``engine.inference_model.InferenceModel`` (the memory format, autocast, float32 logits), from a preprocessed image already
on the device to the full-resolution logits; reading and writing files are not timed. Every combination of the
comma-separated ``--modes``, ``--layouts``, ``--amp`` and ``--tile-batch`` values (the tile batch for sliding rows
only) is a row, in one process (one model, converted between the layouts): ``--warmup`` untimed calls (cuDNN's
autotuning with ``--cudnn-benchmark 1``), then the median of ``--repeats``. Columns: seconds per image, images/s, the
forward passes' TFLOP/s (counted by ``benchmarks.measure.count_gflops`` in eval mode: tiles x a tile's forward
pass, or the whole image's), and the peak memory during the calls (``benchmarks.measure.PeakMemory``). Prints a
Markdown table; ``--output`` also writes it to a file, rewritten after each row.
"""
import statistics
import sys
from typing import List, Optional

import torch

from benchmarks.measure import PeakMemory, add_device_argument, count_gflops, describe_device, time_calls, write_lines
from engine.inference_model import InferenceModel
from engine.train_step import AMP_DTYPES
from networks import BACKBONES, build_model
from utils.cli import (EXIT_OK, ArgumentParser, csv_choices, csv_of, parse_bool, parse_non_negative_int,
                       parse_positive_int, parse_size)
from utils.inference import predict_logits, tile_starts

MODES = ("sliding", "whole")
LAYOUTS = {"nchw": False, "nhwc": True}
LAYOUT_NAMES = {"nchw": "NCHW", "nhwc": "channels_last"}
NUM_CLASSES = 19


def parse_args(argv=None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=tuple(BACKBONES))
    parser.add_argument("--recurrence", type=parse_non_negative_int, default=2, help="criss-cross attention loops R")
    parser.add_argument("--image-size", type=parse_size, default=(1024, 2048), help="the image: H,W")
    parser.add_argument("--tile", type=parse_size, default=(769, 769), help="sliding-window tile: SIZE or H,W")
    parser.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help="sliding and/or whole")
    parser.add_argument("--layouts", type=csv_choices(tuple(LAYOUTS)), default=list(LAYOUTS),
                        help="memory formats (nhwc = channels_last), comma-separated")
    parser.add_argument("--amp", type=csv_choices(tuple(AMP_DTYPES)), default=["off", "bf16"],
                        help="precisions, comma-separated (fp16 needs a GPU)")
    parser.add_argument("--tile-batch", type=csv_of(parse_positive_int), default=[1],
                        help="sliding window: tiles per forward pass, comma-separated")
    parser.add_argument("--cudnn-benchmark", type=parse_bool, default=False, metavar="0|1",
                        help="cuDNN autotuning (the tools leave it off)")
    parser.add_argument("--repeats", type=parse_positive_int, default=5, help="timed calls per row")
    parser.add_argument("--warmup", type=parse_non_negative_int, default=2, help="untimed calls first")
    add_device_argument(parser)
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    return parser.parse_args(argv)


def inference_table(args) -> str:
    """Measure every row of ``args`` (from :func:`parse_args`) in this process; returns the Markdown table."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    with device:
        model = build_model("ccnet", args.backbone, NUM_CLASSES, args.recurrence, norm="bn").eval()
    image = torch.randn(1, 3, *args.image_size, device=device) * 50
    height, width = args.image_size
    tiles = len(tile_starts(height, args.tile[0])) * len(tile_starts(width, args.tile[1]))
    gflops = {mode: count_gflops("ccnet", args.backbone, args.recurrence, size, training=False)["total"]
              for mode, size in (("sliding", args.tile), ("whole", args.image_size))}
    gflops["sliding"] *= tiles
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    lines = [f"Inference of one {height}x{width} image with CCNet-{args.backbone} (R={args.recurrence}, random "
             f"weights, eval mode) on {describe_device(args.device)}, torch {torch.__version__}, cudnn.benchmark "
             f"{'on' if args.cudnn_benchmark else 'off'}; sliding window: {tiles} tiles of {args.tile[0]}x"
             f"{args.tile[1]} ({gflops['sliding']:.4g} GFLOP), whole image: {gflops['whole']:.4g} GFLOP; median of "
             f"{args.repeats} after {args.warmup} warm-up.", "",
             f"| mode | precision | layout | tiles per pass | s per image | images/s | TFLOP/s | {memory} |",
             "|---|---|---|---|---|---|---|---|"]
    write_lines(args.output, lines)
    for layout in args.layouts:
        for amp in args.amp:
            for mode in args.modes:
                for tile_batch in (args.tile_batch if mode == "sliding" else [None]):
                    lines.append(_row(model, image, args, mode, layout, amp, tile_batch, gflops[mode]))
                    print(lines[-1], file=sys.stderr, flush=True)
                    write_lines(args.output, lines)
    return "\n".join(lines)


def _row(model, image, args, mode: str, layout: str, amp: str, tile_batch: Optional[int], gflops: float) -> str:
    precision = "fp32" if amp == "off" else amp
    cells = f"| {mode} | {precision} | {LAYOUT_NAMES[layout]} | {tile_batch or '-'} |"
    if amp == "fp16" and args.device != "cuda":
        return f"{cells} n/a: fp16 needs a GPU | | | |"
    model.to(memory_format=torch.contiguous_format)  # InferenceModel converts it to channels_last where asked
    runner = InferenceModel(model, LAYOUTS[layout], AMP_DTYPES[amp])
    tile_size = tuple(args.tile) if mode == "sliding" else None
    try:
        with PeakMemory(args.device) as memory:
            times = time_calls(lambda: predict_logits(runner, image, tile_size, tile_batch=tile_batch or 1),
                               args.repeats, args.device, warmup=args.warmup)
    except Exception as error:  # e.g. out of memory: shown in its row; the other rows still run
        return f"{cells} n/a: {type(error).__name__}: {str(error).splitlines()[0]} | | | |"
    median = statistics.median(times)
    return (f"{cells} {median:.4f} | {1 / median:.2f} | {gflops / median / 1e3:.3g} | "
            f"{memory.peak / 2 ** 30:.2f} GiB |")


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done (a row that failed says why), 2 bad command line."""
    print(inference_table(parse_args(argv)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
