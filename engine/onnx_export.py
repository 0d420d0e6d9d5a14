"""A trained network as an ONNX file (what export_onnx.py writes), and its check against PyTorch with onnxruntime.

The exported graph is :class:`ExportedSegmenter`: a preprocessed image batch ``image`` ``(N, 3, H, W)`` (BGR minus
the mean, as ``dataset.transforms.image_to_tensor`` makes it) -> ``logits`` ``(N, K, H, W)``: the main head's
logits upsampled to the input size (``utils.logits.upsample_logits``, corners aligned), i.e. what
``utils.inference.predict_whole`` computes; the auxiliary head is not in the graph. The criss-cross attention runs
on its pure-PyTorch reference (einsum, and a gather / scatter with an index computed from the feature map's height,
no ``torch.diag``): plain ONNX operators, where the compiled kernels would be custom operators no runtime knows.

The export goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``, which needs the ``onnxscript``
package) with the batch, height and width dynamic: sizes are symbols in the graph, not Python numbers fixed at
export time. Where a dimension cannot stay dynamic, the export fixes it to the example's size instead;
:func:`export_onnx` says which are dynamic, read from the file.

Needs the packages of requirements-dev.txt: ``onnx`` and ``onnxscript`` to export, ``onnxruntime`` to check.
"""
import logging
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from cc_attention import CrissCrossAttention
from utils.logits import upsample_logits

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 18
AXES = {0: "batch", 2: "height", 3: "width"}  # the axes of the input and the output that may stay dynamic


class ExportError(RuntimeError):
    """The export could not run (a package missing, the exporter failing); the message says why in one line."""


class Comparison(NamedTuple):
    """onnxruntime against PyTorch on one image batch."""

    shape: Tuple[int, ...]  # the batch's (N, 3, H, W)
    max_difference: float  # max |onnxruntime logit - PyTorch logit|
    max_logit: float  # max |PyTorch logit|
    same_class: float  # the fraction of pixels whose argmax class is the same


class ExportedSegmenter(nn.Module):
    """``model`` (in eval mode) as deployed: ``(N, 3, H, W)`` preprocessed images -> ``(N, K, H, W)`` main logits
    at the input's size. Takes the first output of the model's list, so it holds whether eval mode returns
    ``[main, aux]`` or ``[main]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.model(images)
        main = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return upsample_logits(main, images.shape[-2:])


def exportable(model: nn.Module) -> ExportedSegmenter:
    """``model`` in eval mode, its criss-cross attention on the ``reference`` backend, wrapped for export (the
    model itself is changed: use a copy to keep it as it was)."""
    for module in model.modules():
        if isinstance(module, CrissCrossAttention):
            module.backend = "reference"
    return ExportedSegmenter(model).eval()


def _require(package: str, purpose: str):
    try:
        return __import__(package)
    except ImportError:
        raise ExportError(f"{purpose} needs the {package} package (pip install -r requirements-dev.txt)") from None


def export_onnx(model: nn.Module, path: str, input_size: Tuple[int, int],
                metadata: Optional[Dict[str, str]] = None) -> Dict[str, bool]:
    """Write ``exportable(model)`` to ``path`` as one ONNX file (opset :data:`OPSET`, weights inside), with
    ``metadata`` as the model's metadata properties. ``input_size``: ``(H, W)`` of the example input, the size a
    fixed dimension takes. Returns ``{"batch": dynamic?, "height": ..., "width": ...}`` as the file says."""
    _require("onnxscript", "the ONNX export")
    onnx = _require("onnx", "the ONNX export")
    wrapper = exportable(model)
    example = torch.zeros(2, 3, *input_size)  # batch 2: the exporter specializes dimensions of size 1
    axes = {name: dict(AXES) for name in (INPUT_NAME, OUTPUT_NAME)}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*dynamic_axes.*")  # the way to name the axes, documented
            program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    except Exception as error:  # the exporter's errors are many and long: one line, the first of its message
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"the ONNX export failed: {type(error).__name__}: {message}") from error
    finally:
        exporter_log.setLevel(level)
    program.model.metadata_props.update(metadata or {})
    program.save(path, external_data=False)
    shape = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return {name: bool(shape[axis].dim_param) for axis, name in AXES.items()}


def onnxruntime_session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session of the file ``path``, with ``threads`` intra-op threads (default: onnxruntime's)."""
    onnxruntime = _require("onnxruntime", "running the ONNX file")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_with_onnxruntime(model: nn.Module, path: str, shapes: Sequence[Tuple[int, int, int, int]],
                             seed: int = 0) -> List[Comparison]:
    """Run ``exportable(model)`` and the ONNX file on random image batches of each ``(N, 3, H, W)`` shape (pixels
    of a preprocessed image: about -120..150); one :class:`Comparison` each."""
    session = onnxruntime_session(path)
    wrapper = exportable(model)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for shape in shapes:
        images = torch.rand(shape, generator=generator) * 255 - 120
        with torch.no_grad():
            expected = wrapper(images).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime gave logits of shape {got.shape} for {tuple(shape)}, PyTorch "
                              f"{expected.shape}")
        results.append(Comparison(tuple(shape), float(np.abs(got - expected).max()), float(np.abs(expected).max()),
                                  float((got.argmax(1) == expected.argmax(1)).mean())))
    return results
