"""CPU latency of the exported network: onnxruntime against PyTorch, the same network on the same input.

    python -m benchmarks.onnx_latency                                  # CCNet-R101, 769x769, batch 1
    python -m benchmarks.onnx_latency --backbone tiny --size 129 --repeats 3   # a quick look

The network has random weights (the time does not depend on them), batch-norm statistics measured on random images
and the attention's ``gamma`` at 1, so that the attention counts in its logits. It is exported with
``engine.onnx_export`` (what export_onnx.py writes) to a temporary folder, beside its weights. Each row runs in
a fresh process (``benchmarks.measure.run_isolated``) with the same number of threads (``--threads``, default
torch's): one untimed call, then ``--repeats`` timed forward passes on one image batch; the table gives the median
and the fastest, the peak resident memory of the process during the calls (Python, torch and the runtime
included) and the largest difference of its logits from onnxruntime's.

Rows: PyTorch as evaluate.py runs the network (eager, inference mode; the attention on the C++ ``cpu`` kernel;
until eval mode skips it, the auxiliary head is computed too: about 6 % of the FLOPs at 769x769, not in the ONNX
graph), PyTorch with the attention on the ``reference`` backend (the formulation in the ONNX file), and
onnxruntime (CPU execution provider, all graph optimizations). Prints a Markdown table (also to ``--output``).
"""
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from benchmarks.measure import PeakMemory, describe_device, run_isolated, time_calls
from engine.onnx_export import (INPUT_NAME, OUTPUT_NAME, ExportedSegmenter, ExportError, export_onnx,
                                onnxruntime_session)
from networks import BACKBONES, build_model
from utils.cli import EXIT_OK, ArgumentParser, parse_non_negative_int, parse_positive_int, parse_size, report_failure

NUM_CLASSES = 19
ROWS = (("pytorch", "cpu"), ("pytorch", "reference"), ("onnxruntime", "reference"))  # runtime, attention backend


@dataclass(frozen=True)
class LatencyConfig:
    backbone: str
    size: Tuple[int, int]
    batch_size: int
    repeats: int
    threads: int


def build_network(backbone: str) -> torch.nn.Module:
    """The benchmarked network's architecture (CCNet, R=2, BatchNorm)."""
    return build_model("ccnet", backbone, NUM_CLASSES, recurrence=2, norm="bn")


def make_network(backbone: str) -> torch.nn.Module:
    """The benchmarked network, in eval mode: random weights (seed 0), batch-norm statistics of two random
    224x224 images, ``gamma`` 1."""
    torch.manual_seed(0)
    model = build_network(backbone)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0  # running statistics := those of the one calibration batch
    with torch.no_grad():
        model.head.cca.gamma.fill_(1.0)
        model.train()(torch.rand(2, 3, 224, 224) * 255 - 120)
    return model.eval()


def _images(config: LatencyConfig) -> torch.Tensor:
    return torch.rand((config.batch_size, 3, *config.size), generator=torch.Generator().manual_seed(1)) * 255 - 120


def measure(config: LatencyConfig, runtime: str, backend: str, folder: str) -> dict:
    """One row, in this process, of the network saved in ``folder`` (``weights.pth``, ``network.onnx``):
    ``{"times", "peak", "logits"}`` (seconds per call, bytes, the last call's logits as a numpy array)."""
    torch.set_num_threads(config.threads)
    images = _images(config)
    if runtime == "onnxruntime":
        session = onnxruntime_session(os.path.join(folder, "network.onnx"), config.threads)
        feed = {INPUT_NAME: images.numpy()}

        def call():
            return session.run([OUTPUT_NAME], feed)[0]
    else:
        model = build_network(config.backbone)
        model.load_state_dict(torch.load(os.path.join(folder, "weights.pth"), weights_only=True))
        model.head.cca.backend = backend
        network = ExportedSegmenter(model.eval())

        def call():
            with torch.inference_mode():
                return network(images).numpy()
    outputs = []
    with PeakMemory("cpu") as memory:
        times = time_calls(lambda: outputs.append(call()), config.repeats, "cpu", warmup=1)
    return {"times": times, "peak": memory.peak, "logits": outputs[-1]}


def latency_table(config: LatencyConfig, folder: str) -> str:
    """The Markdown table of every row of :data:`ROWS` (each in a fresh process) for the network saved in
    ``folder`` (see :func:`measure`); rows go to stderr as they come."""
    height, width = config.size
    torch.set_num_threads(config.threads)
    lines = [f"Forward pass of CCNet-{config.backbone} (R=2, {NUM_CLASSES} classes) at {height}x{width}, batch "
             f"{config.batch_size}, on {describe_device('cpu')}; torch "
             f"{torch.__version__}, onnxruntime {onnxruntime_version()}; median and fastest of {config.repeats} "
             "after one untimed call.", "",
             "| runtime | attention | median | fastest | peak RSS | max abs logit difference from onnxruntime |",
             "|---|---|---|---|---|---|"]
    results = {}
    for runtime, backend in ROWS:
        try:
            results[runtime, backend] = run_isolated(measure, config, runtime, backend, folder)
        except Exception as error:  # shown in its row; the other rows still run
            results[runtime, backend] = f"{type(error).__name__}: {error}".splitlines()[0]
    reference = results["onnxruntime", "reference"]
    for runtime, backend in ROWS:
        result = results[runtime, backend]
        if isinstance(result, str):
            lines.append(f"| {runtime} | {backend} | n/a: {result} | | | |")
        else:
            difference = ("-" if runtime == "onnxruntime" or isinstance(reference, str) else
                          f"{np.abs(result['logits'] - reference['logits']).max():.1e} "
                          f"(largest logit {np.abs(reference['logits']).max():.1f})")
            lines.append(f"| {runtime} | {backend} | {_duration(statistics.median(result['times']))} | "
                         f"{_duration(min(result['times']))} | {result['peak'] / 2 ** 30:.2f} GiB | {difference} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "(not installed)"
    return onnxruntime.__version__


def main(argv=None) -> int:
    """Exit codes: 0 done (a row that failed says why), 1 the export failed (one line), 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=tuple(BACKBONES))
    parser.add_argument("--size", type=parse_size, default=(769, 769), help="input size: SIZE or H,W")
    parser.add_argument("--batch-size", type=parse_positive_int, default=1, help="images per forward pass")
    parser.add_argument("--repeats", type=parse_positive_int, default=3, help="timed forward passes per row")
    parser.add_argument("--threads", type=parse_non_negative_int, default=0,
                        help="intra-op threads of both runtimes (0: torch's default)")
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    config = LatencyConfig(args.backbone, args.size, args.batch_size, args.repeats,
                           args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as folder:
        network = make_network(args.backbone)
        torch.save(network.state_dict(), os.path.join(folder, "weights.pth"))
        try:
            export_onnx(network, os.path.join(folder, "network.onnx"), args.size)
        except ExportError as error:
            return report_failure(error)
        table = latency_table(config, folder)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
