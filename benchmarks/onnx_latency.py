"""CPU latency of the exported network: onnxruntime against PyTorch, the same network on the same input.

    python -m benchmarks.onnx_latency                                  # CCNet-R101, 769x769, batch 1
    python -m benchmarks.onnx_latency --backbone tiny --size 129 --repeats 3   # a quick look

The network has random weights (the time does not depend on them), batch-norm statistics measured on random images
and the attention's ``gamma`` at 1, so that the attention counts in its logits. It is exported with
``engine.onnx_export`` (what export_onnx.py writes) to a temporary folder, beside its weights. Each row runs in a
fresh process of its own (one runtime's threads never wait beside another's) with the same number of threads
(``--threads``, default torch's), on one image batch, and the rows take turns: one untimed call of each, then
``--repeats`` rounds of one timed call of each, so that whatever else runs on the machine slows every row alike.
The table gives the median and the fastest call, and the largest difference of the logits from onnxruntime's.

Rows: PyTorch as evaluate.py runs the network (eager, inference mode; the attention on the C++ ``cpu`` kernel;
until eval mode skips it, the auxiliary head is computed too: about 6 % of the FLOPs at 769x769, not in the ONNX
graph), PyTorch with the attention on the ``reference`` backend (the formulation in the ONNX file), and
onnxruntime (CPU execution provider, all graph optimizations). Prints a Markdown table (also to ``--output``).
"""
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from benchmarks.measure import describe_device, time_calls
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


_row: dict = {}  # in a row's worker process: its forward pass ("call"), or why it could not be built ("error")


def _start_row(config: LatencyConfig, runtime: str, backend: str, folder: str) -> None:
    """A row's worker process starts here: its forward pass of the network saved in ``folder`` (``weights.pth``,
    ``network.onnx``), a call returning the logits as a numpy array."""
    try:
        torch.set_num_threads(config.threads)
        images = _images(config)
        if runtime == "onnxruntime":
            session = onnxruntime_session(os.path.join(folder, "network.onnx"), config.threads)
            feed = {INPUT_NAME: images.numpy()}
            _row["call"] = lambda: session.run([OUTPUT_NAME], feed)[0]
            return
        model = build_network(config.backbone)
        model.load_state_dict(torch.load(os.path.join(folder, "weights.pth"), weights_only=True))
        model.head.cca.backend = backend
        network = ExportedSegmenter(model.eval())

        def call() -> np.ndarray:
            with torch.inference_mode():
                return network(images).numpy()
        _row["call"] = call
    except Exception as error:  # raised by the first call instead, with its message
        _row["error"] = error


def _timed_call(keep_logits: bool) -> Tuple[float, Optional[np.ndarray]]:
    """One forward pass in a row's worker process: its seconds, and its logits if ``keep_logits``."""
    if "error" in _row:
        raise _row["error"]
    outputs = []
    seconds = time_calls(lambda: outputs.append(_row["call"]()), 1, "cpu", warmup=0)[0]
    return seconds, outputs[0] if keep_logits else None


def measure(config: LatencyConfig, folder: str) -> Dict[Tuple[str, str], object]:
    """Every row of :data:`ROWS`, each in a fresh process of its own, the calls taking turns: a first, untimed call
    of each, then ``config.repeats`` rounds of one timed call of each row, so that other load on the machine falls
    on every row alike. Returns ``{row: {"times", "logits"}}``, or the one-line error of a row that could not run."""
    context = multiprocessing.get_context("spawn")
    workers = {row: ProcessPoolExecutor(1, mp_context=context, initializer=_start_row, initargs=(config, *row, folder))
               for row in ROWS}
    results: Dict[Tuple[str, str], object] = {row: {"times": [], "logits": None} for row in ROWS}
    try:
        for round_ in range(config.repeats + 1):  # round 0: the untimed call
            for row, worker in workers.items():
                if isinstance(results[row], str):
                    continue
                try:
                    seconds, logits = worker.submit(_timed_call, round_ == config.repeats).result()
                except Exception as error:  # shown in its row; the other rows still run
                    results[row] = f"{type(error).__name__}: {error}".splitlines()[0]
                    continue
                if round_:
                    results[row]["times"].append(seconds)
                if logits is not None:
                    results[row]["logits"] = logits
    finally:
        for worker in workers.values():
            worker.shutdown()
    return results


def latency_table(config: LatencyConfig, folder: str) -> str:
    """The Markdown table of :func:`measure` for the network saved in ``folder``."""
    height, width = config.size
    torch.set_num_threads(config.threads)
    lines = [f"Forward pass of CCNet-{config.backbone} (R=2, {NUM_CLASSES} classes) at {height}x{width}, batch "
             f"{config.batch_size}, on {describe_device('cpu')}; torch {torch.__version__}, onnxruntime "
             f"{onnxruntime_version()}; each row in its own process; median and fastest of {config.repeats} rounds "
             "(one call of each row in turn) after one untimed call of each.", "",
             "| runtime | attention | median | fastest | max abs logit difference from onnxruntime |",
             "|---|---|---|---|---|"]
    results = measure(config, folder)
    reference = results["onnxruntime", "reference"]
    for runtime, backend in ROWS:
        result = results[runtime, backend]
        if isinstance(result, str):
            lines.append(f"| {runtime} | {backend} | n/a: {result} | | |")
            continue
        difference = ("-" if runtime == "onnxruntime" or isinstance(reference, str) else
                      f"{np.abs(result['logits'] - reference['logits']).max():.1e} "
                      f"(largest logit {np.abs(reference['logits']).max():.1f})")
        lines.append(f"| {runtime} | {backend} | {_duration(statistics.median(result['times']))} | "
                     f"{_duration(min(result['times']))} | {difference} |")
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
