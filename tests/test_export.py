"""export_onnx.py: the tiny CCNet exported to ONNX and run by onnxruntime gives PyTorch's logits at any batch and
size; other heads and R; a missing exporter package is one line."""
import json
import sys

import numpy as np
import pytest
import torch

import export_onnx
from engine.onnx_export import INPUT_NAME, OUTPUT_NAME, exportable, onnxruntime_session
from networks import build_model
from utils.checkpoint import save_checkpoint

TOLERANCE = 1e-4  # max |logit difference|, float32


def needs_onnx(test):
    """The exporter's package (onnxscript, which brings onnx) and onnxruntime: skipped without them, an error under
    CI=true (requirements-dev.txt installs them)."""
    return pytest.mark.extra("onnxscript")(pytest.mark.extra("onnxruntime")(test))


def _snapshot(path, model="ccnet", backbone="tiny", recurrence=2, dataset="cityscapes", num_classes=19):
    """A snapshot whose logits are large and depend on the attention: gamma 1 (a new model's is 0, which would
    leave the attention out of the logits) and a scaled-up classifier."""
    torch.manual_seed(0)
    network = build_model(model, backbone=backbone, num_classes=num_classes, recurrence=recurrence, norm="bn")
    with torch.no_grad():
        if model == "ccnet":
            network.head.cca.gamma.fill_(1.0)
        network.head.bottleneck[3].weight.mul_(50.0)
    args = {"model": model, "backbone": backbone, "recurrence": recurrence, "dataset": dataset,
            "num_classes": num_classes}
    save_checkpoint({"model": network.state_dict(), "args": args}, path)
    return network.eval()


def _max_differences(network, path, shapes):
    """``[(max |onnxruntime - PyTorch|, max |PyTorch|)]`` of ``network`` and the file at ``path``, one per shape."""
    session, wrapper = onnxruntime_session(str(path)), exportable(network)
    results = []
    for index, shape in enumerate(shapes):
        images = torch.rand(shape, generator=torch.Generator().manual_seed(index)) * 255 - 120
        with torch.no_grad():
            expected = wrapper(images).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], network.dsn[3].out_channels, *shape[2:])
        results.append((float(np.abs(got - expected).max()), float(np.abs(expected).max())))
    return results


@needs_onnx
def test_tiny_ccnet_runs_in_onnxruntime_like_pytorch_on_two_sizes(tmp_path, capsys):
    import onnx

    network = _snapshot(tmp_path / "tiny.pth", dataset="ade20k", num_classes=150)
    output = tmp_path / "out" / "tiny.onnx"
    assert export_onnx.main(["--restore-from", str(tmp_path / "tiny.pth"), "--output", str(output),
                             "--input-size", "64,96"]) == 0
    printed = capsys.readouterr().out
    assert "batch, height and width dynamic" in printed and printed.count("onnxruntime check") == 2
    differences = _max_differences(network, output, [(1, 3, 64, 96), (2, 3, 75, 50)])
    assert all(difference <= TOLERANCE for difference, _ in differences), differences
    assert all(scale > 1.0 for _, scale in differences)  # the logits are not all tiny: the bound means something
    graph = onnx.load(str(output))
    dims = [[dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in (graph.graph.input[0], graph.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", 150, "height", "width"]]
    assert graph.opset_import[0].version >= 17
    assert {node.domain for node in graph.graph.node} == {""}  # standard operators only: no custom op
    assert {"Einsum", "GatherElements", "ScatterElements"} <= {node.op_type for node in graph.graph.node}
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    assert metadata["dataset"] == "ade20k" and json.loads(metadata["classes"])[:3] == ["wall", "building", "sky"]


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize("model, backbone, recurrence", [
    ("ccnet", "tiny", 1), ("ccnet", "tiny", 3), ("ccnet", "tiny", 0), ("nonlocal", "tiny", 2),
    ("baseline", "tiny", 2), ("ccnet", "resnet50", 2)])
def test_every_head_backbone_and_recurrence_exports(tmp_path, model, backbone, recurrence):
    network = _snapshot(tmp_path / "net.pth", model, backbone, recurrence)
    output = tmp_path / "net.onnx"
    assert export_onnx.main(["--restore-from", str(tmp_path / "net.pth"), "--output", str(output),
                             "--input-size", "48,64", "--skip-check"]) == 0
    differences = _max_differences(network, output, [(1, 3, 48, 64), (2, 3, 57, 41)])
    assert all(difference <= TOLERANCE for difference, _ in differences), differences


def test_a_missing_exporter_package_is_one_line(tmp_path, monkeypatch, failed_run):
    _snapshot(tmp_path / "tiny.pth")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    message = failed_run(export_onnx.main, ["--restore-from", str(tmp_path / "tiny.pth"),
                                            "--output", str(tmp_path / "tiny.onnx")])
    assert message == "the ONNX export needs the onnxscript package (pip install -r requirements-dev.txt)"
    assert not (tmp_path / "tiny.onnx").exists()
