"""Model report: parameters, GFLOPs and training memory of CCNet against a non-local head and no attention.

    python -m networks.report                      # ResNet-101, 769x769 and 1024x2048, memory on cuda if present
    python -m networks.report --skip-memory        # counts only (a few seconds)

GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, nothing is
computed): convolutions and matrix products (the attention's einsum/bmm included), 1 multiply-add = 2 FLOPs, the
convention of the paper's "RCCA: 16.5 GFLOPs" figure. Element-wise work (norms, activations, softmax) is not
counted. The criss-cross attention is counted on its reference (einsum) path.

Peak memory is of one training step (forward + backward, batch 1) in a fresh process: peak RSS on the CPU
(``ru_maxrss``; "activations" = peak minus the RSS after building the model), ``max_memory_allocated`` on CUDA.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from cc_attention import CrissCrossAttention
from libs.norm import inplace_abn_available
from utils.cli import parse_size

from .model import build_model

# (label, build_model name, recurrence)
VARIANTS = (
    ("RCCA, R=1", "ccnet", 1),
    ("RCCA, R=2", "ccnet", 2),
    ("non-local", "nonlocal", 0),
    ("no attention", "baseline", 0),
)
ATTENTION_MODULES = ("head.cca", "head.non_local")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def count_gflops(name: str, backbone: str, recurrence: int, size: Tuple[int, int]) -> Dict[str, float]:
    """GFLOPs of one forward pass at batch 1: ``{"total", "head", "attention"}`` (see the module docstring)."""
    with torch.device("meta"):
        model = build_model(name, backbone=backbone, recurrence=recurrence, norm="bn").eval()
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


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_training_step(norm: str, backbone: str, size: Tuple[int, int], device: str) -> Dict[str, float]:
    """One forward + backward of CCNet (R=2), batch 1, in THIS process: peak memory (MiB) and seconds."""
    torch.manual_seed(0)
    model = build_model("ccnet", backbone=backbone, norm=norm).to(device).train()
    images = torch.randn(1, 3, *size, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    start = time.perf_counter()
    main, aux = model(images)
    (main.mean() + 0.4 * aux.mean()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mib()
    return {"seconds": time.perf_counter() - start, "peak_mib": peak, "activations_mib": peak - before}


def memory_table(backbone: str, size: Tuple[int, int], device: str) -> str:
    """BN vs InPlaceABN, each measured in a fresh subprocess (peak RSS is per process)."""
    measure = "peak RSS" if device == "cpu" else "max_memory_allocated"
    lines = [
        f"| norm | device | input | {measure} (MiB) | minus model (MiB) | fwd+bwd (s) |",
        "|---|---|---|---|---|---|",
    ]
    for norm in ("bn", "inplace_abn"):
        if norm == "inplace_abn" and not inplace_abn_available():
            lines.append(f"| {norm} | {device} | {size[0]}x{size[1]} | not installed | | |")
            continue
        command = [sys.executable, "-m", "networks.report", "--backbone", backbone, "--device", device,
                   "--measure-step", norm, "--memory-size", f"{size[0]}x{size[1]}"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        lines.append(
            f"| {norm} | {device} | {size[0]}x{size[1]} | {result['peak_mib']:.0f} | "
            f"{result['activations_mib']:.0f} | {result['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "resnet50", "tiny"))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(769, 769), (1024, 2048)],
                        help="inputs for the parameter / FLOP table, HEIGHTxWIDTH")
    parser.add_argument("--memory-size", type=parse_size, default=(769, 769), help="input of the memory table")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-memory", action="store_true", help="only parameters and FLOPs")
    parser.add_argument("--measure-step", choices=("bn", "inplace_abn"),
                        help="internal: measure one training step with this norm and print it as JSON")
    args = parser.parse_args(argv)

    if args.measure_step:
        print(json.dumps(measure_training_step(args.measure_step, args.backbone, args.memory_size, args.device)))
        return
    print(f"### {args.backbone}: parameters and GFLOPs (batch 1)\n")
    print(flops_table(args.backbone, args.sizes))
    if not args.skip_memory:
        print(f"\n### {args.backbone}: one training step (forward + backward, batch 1, RCCA R=2)\n")
        print(memory_table(args.backbone, args.memory_size, args.device))


if __name__ == "__main__":
    main()
