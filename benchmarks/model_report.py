"""Model report: parameters, GFLOPs and training memory of CCNet against a non-local head and no attention.

    python -m benchmarks.model_report                  # ResNet-101, 769x769 and 1024x2048, memory on cuda if present
    python -m benchmarks.model_report --skip-memory    # counts only (a few seconds)

GFLOPs are counted by ``benchmarks.measure.count_gflops`` (``torch.utils.flop_counter.FlopCounterMode`` on the meta
device: shapes only, nothing is computed): convolutions and matrix products (the attention's einsum/bmm included),
1 multiply-add = 2 FLOPs, the convention of the paper's "RCCA: 16.5 GFLOPs" figure. Element-wise work (norms,
activations, softmax) is not counted. The criss-cross attention is counted on its reference (einsum) path. The
forward pass is counted in training mode, with both heads (the auxiliary DSN head on layer3 included, as a
training step computes it); in eval mode the network skips the DSN head.

The video table compares the 3-D RCCA (R=2 loops of ``CrissCrossAttention3D``, 512 channels) with one non-local
block over all the positions of a clip of T frames of head features (``--video-features``, 97x97: a 769x769 crop),
the paper's efficiency argument extended to video: GFLOPs counted the same way, and the float32 attention maps that
a training step keeps for the backward pass (RCCA: the row, column and time blocks of every loop, ``T*h*w*(T+h+w)``
entries a loop; non-local: ``(T*h*w)^2``).

The memory table is the training-step benchmark (``benchmarks.train_step``: forward, the training loss,
backward and the SGD step, in a fresh process) for two steps of CCNet (R=2) at batch 1, fp32, with BatchNorm and
with InPlaceABN.
"""
import sys
from typing import Dict, Sequence, Tuple

import torch

from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cc_attention_3d import non_local_3d
from benchmarks.measure import add_device_argument, count_gflops
from cc_attention import CrissCrossAttention3D
from benchmarks.train_step import NORM_CHOICES, configs_for, step_table
from networks import BACKBONES, NonLocalBlock, build_model
from utils.cli import EXIT_OK, ArgumentParser, parse_positive_int, parse_size

# (label, build_model name, recurrence)
VARIANTS = (
    ("RCCA, R=1", "ccnet", 1),
    ("RCCA, R=2", "ccnet", 2),
    ("non-local", "nonlocal", 0),
    ("no attention", "baseline", 0),
)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def flops_table(backbone: str, sizes: Sequence[Tuple[int, int]]) -> str:
    lines = [
        "| head | input | params (M) | head params (M) | GFLOPs model | GFLOPs head | GFLOPs attention |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name, recurrence in VARIANTS:
        with torch.device("meta"):
            model = build_model(name, backbone=backbone, recurrence=recurrence, norm="bn")
        params, head_params = count_parameters(model) / 1e6, count_parameters(model.head) / 1e6
        for size in sizes:
            gflops = count_gflops(name, backbone, recurrence, size)
            lines.append(
                f"| {label} | {size[0]}x{size[1]} | {params:.2f} | {head_params:.2f} | {gflops['total']:.1f} "
                f"| {gflops['head']:.1f} | {gflops['attention']:.1f} |"
            )
    return "\n".join(lines)


def video_attention_costs(features: Tuple[int, int], time: int, channels: int = 512,
                          recurrence: int = 2) -> Dict[str, Tuple[float, int]]:
    """``{"rcca": (FLOPs, attention bytes), "non-local": (...)}`` over one clip of ``time`` frames of ``channels x
    h x w`` features: the FLOPs of one forward pass (counted on the meta device, the 3-D attention on its reference
    path) and the bytes of the float32 attention maps kept for the backward pass."""
    height, width = features
    positions = time * height * width
    with torch.device("meta"):
        rcca, non_local = CrissCrossAttention3D(channels, backend="reference"), NonLocalBlock(channels)
        clip = torch.empty(1, channels, time, height, width)
        with FlopCounterMode(display=False) as rcca_counter:
            x = clip
            for _ in range(recurrence):
                x = rcca(x)
        with FlopCounterMode(display=False) as non_local_counter:
            non_local_3d(non_local, clip)
    return {"rcca": (rcca_counter.get_total_flops(), 4 * recurrence * positions * (time + height + width)),
            "non-local": (non_local_counter.get_total_flops(), 4 * positions ** 2)}


def video_attention_table(features: Tuple[int, int], clip_lengths: Sequence[int], channels: int = 512,
                          recurrence: int = 2) -> str:
    """The 3-D RCCA against a non-local block over clips of each of ``clip_lengths`` frames
    (:func:`video_attention_costs`)."""
    lines = ["| T | features | module | GFLOPs | attention maps MiB (float32) |", "|---|---|---|---|---|"]
    for time in clip_lengths:
        costs = video_attention_costs(features, time, channels, recurrence)
        for key, label in (("rcca", f"RCCA 3-D, R={recurrence}"), ("non-local", "non-local")):
            flops, attention_bytes = costs[key]
            lines.append(f"| {time} | {channels}x{features[0]}x{features[1]} | {label} | {flops / 1e9:.1f} | "
                         f"{attention_bytes / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=tuple(BACKBONES))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(769, 769), (1024, 2048)],
                        help="inputs for the parameter / FLOP table, H,W or HxW")
    parser.add_argument("--memory-size", type=parse_size, default=(769, 769), help="input of the memory table")
    add_device_argument(parser)
    parser.add_argument("--skip-memory", action="store_true", help="only parameters and FLOPs")
    parser.add_argument("--video-features", type=parse_size, default=(97, 97),
                        help="head features h,w of each frame for the video table (97,97: a 769x769 crop)")
    parser.add_argument("--clip-lengths", type=parse_positive_int, nargs="+", default=[1, 5],
                        help="frames T of the video table")
    args = parser.parse_args(argv)
    print(f"### {args.backbone}: parameters and GFLOPs (batch 1)\n")
    print(flops_table(args.backbone, args.sizes))
    print("\n### Video: 3-D RCCA against a non-local block over a clip (batch 1)\n")
    print(video_attention_table(args.video_features, args.clip_lengths))
    if not args.skip_memory:
        print(f"\n### {args.backbone}: memory of one training step (batch 1, RCCA R=2)\n")
        print(step_table(configs_for(args.backbone, args.memory_size, batch_sizes=[1], recurrence=2,
                                     norms=list(NORM_CHOICES), amps=["off"], steps=1, warmup=1, device=args.device),
                         mfu=False))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
