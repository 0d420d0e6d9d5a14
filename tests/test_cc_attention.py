"""The criss-cross attention op on every device and backend: agreement with the reference and with a dense masked
softmax, gradients, memory formats, awkward shapes, real sizes on a GPU, torch.compile / torch.export, the registered
operators, input checks and backend selection. CUDA cases run where a GPU is visible; the CUDA sources are compiled
wherever nvcc and a CUDA build of torch exist (CI included)."""
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.plain_attention import plain_criss_cross_attention
from cc_attention import CrissCrossAttention, backends, ca_map, ca_weight, criss_cross_attention, library, self_check
from cc_attention.reference import ca_map_reference, ca_weight_reference, criss_cross_attention_reference
from networks import build_model

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
# (device, backend): every device with its kernels and with the reference.
DEVICE_BACKENDS = [(device, backend) for device in DEVICES for backend in (device, "reference")]
# (N, C, H, W): H != W, batch > 1, odd sizes, 1 x W and H x 1, 1 x 1, more channels than one CPU pass (32).
SHAPES = [(2, 3, 5, 7), (1, 4, 6, 6), (3, 2, 9, 4), (1, 3, 1, 8), (2, 3, 7, 1), (1, 1, 1, 1), (1, 70, 5, 6)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU: the CUDA kernels cannot run")


def _require_kernels(device: str) -> None:
    """Build (or load) the kernels once; a build failure fails the tests that need them, with the reason."""
    reason = library.load().missing.get(device)
    if reason is not None:
        pytest.fail(f"the {device} kernels are not available: {reason}")


def _inputs(shape, dtype=torch.float64, device="cpu", memory_format=torch.contiguous_format, seed=0):
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(n, c, h, w, generator=generator), torch.randn(n, c, h, w, generator=generator),
               torch.randn(n, c + 2, h, w, generator=generator))
    return [t.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_() for t in tensors]


def _weights(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)


def _unfused(backend, query, key, value):
    """Energy, output and the gradients through ca_weight -> softmax -> ca_map."""
    energy = ca_weight(query, key, backend)
    out = ca_map(torch.softmax(energy, dim=1), value, backend)
    loss = (out * _weights(out)).sum() + energy.square().mean()
    return [energy, out, *torch.autograd.grad(loss, (query, key, value))]


def _fused(backend, query, key, value):
    """Output and the gradients of the fused op."""
    out = criss_cross_attention(query, key, value, backend)
    return [out, *torch.autograd.grad((out * _weights(out)).sum(), (query, key, value))]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach().double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


# --- agreement with the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("run", [_fused, _unfused], ids=["fused", "ca_weight+ca_map"])
def test_kernels_match_the_reference_in_float64(device, layout, shape, run):
    _require_kernels(device)
    expected = run("reference", *_inputs(shape, device=device))
    actual = run(device, *_inputs(shape, device=device, memory_format=FORMATS[layout]))
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {index} {shape}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", FORMATS)
def test_kernels_in_lower_precision(device, dtype, layout):
    """float32 (and 16-bit: on the CPU through ATen's batched products) against the float64 reference."""
    _require_kernels(device)
    shape = (2, 9, 6, 7)
    expected = _fused("reference", *_inputs(shape, device=device))
    actual = _fused(device, *_inputs(shape, dtype, device, FORMATS[layout]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype
        assert _relative_error(a, e) <= tolerance, f"output {index}: {_relative_error(a, e):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", FORMATS)
def test_outputs_keep_the_memory_format_of_the_inputs(device, layout):
    _require_kernels(device)
    memory_format = FORMATS[layout]
    query, key, value = _inputs((2, 4, 5, 6), device=device, memory_format=memory_format)
    out, *grads = _fused(device, query, key, value)
    for tensor in (out, *grads):
        assert tensor.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_take_channel_slices(device):
    """Query/key/value as channel slices of one tensor (what the module passes), NCHW and NHWC."""
    _require_kernels(device)
    for memory_format in FORMATS.values():
        qkv = torch.randn(2, 3 + 3 + 5, 6, 7, dtype=torch.float64, device=device).contiguous(memory_format=memory_format)
        query, key, value = torch.split(qkv, [3, 3, 5], dim=1)
        expected = criss_cross_attention(query, key, value, "reference")
        torch.testing.assert_close(criss_cross_attention(query, key, value, device), expected)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradcheck_float64(device, backend):
    if backend != "reference":
        _require_kernels(device)
    query, key, value = _inputs((2, 2, 3, 4), device=device)
    attention = torch.rand(2, 3 + 4 - 1, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: criss_cross_attention(q, k, v, backend), (query, key, value))
    assert torch.autograd.gradcheck(lambda q, k: ca_weight(q, k, backend), (query, key))
    assert torch.autograd.gradcheck(lambda a, v: ca_map(a, v, backend), (attention, value))


@requires_gpu
@pytest.mark.parametrize("shape", [(1, 512, 97, 97), (2, 512, 65, 129)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_at_real_sizes(shape, dtype, tolerance):
    """The feature map of a 769 crop (97 x 97) and of half a Cityscapes image (65 x 129), against float64."""
    _require_kernels("cuda")
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, c // 8, h, w, generator=generator), torch.randn(n, c // 8, h, w, generator=generator),
               torch.randn(n, c, h, w, generator=generator)]
    expected = _fused("reference", *[t.to("cuda", torch.float64).requires_grad_() for t in tensors])
    for memory_format in FORMATS.values():
        inputs = [t.to("cuda", dtype).contiguous(memory_format=memory_format).requires_grad_() for t in tensors]
        for index, (a, e) in enumerate(zip(_fused("cuda", *inputs), expected)):
            assert torch.isfinite(a).all()
            assert _relative_error(a, e) <= tolerance, f"output {index} {memory_format}: {_relative_error(a, e):.2e}"


# --- infinite and large energies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_one_minus_inf_energy_gets_weight_zero_like_torch_softmax(device, backend):
    """The pixel (2, 3) has one energy of -inf (-1e30 * 1e30 overflows float32) among finite ones: its attention is
    finite, with weight 0 on that key, as torch.softmax gives."""
    if backend != "reference":
        _require_kernels(device)
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(2, 1, 2, 5, 6, generator=generator)
    value = torch.randn(1, 4, 5, 6, generator=generator)
    query[0, 0, 2, 3] = -1e30
    key[0, 0] = 0
    key[0, 0, 2, 5] = 1e30  # a row key of (2, 3)
    energy = ca_weight_reference(query, key)
    assert torch.isneginf(energy[0, :, 2, 3]).sum() == 1 and torch.isfinite(energy[0, :, 2, 3]).sum() == 5 + 6 - 2
    query, key, value = (t.to(device) for t in (query, key, value))
    out = criss_cross_attention(query, key, value, backend)
    assert torch.isfinite(out).all()
    expected = ca_map_reference(torch.softmax(energy.double(), dim=1), value.cpu().double())
    torch.testing.assert_close(out[0, :, 2, 3].cpu().double(), expected[0, :, 2, 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_energies_beyond_the_float16_range_stay_finite(device, backend, dtype):
    """Every energy is 256 * 256 = 65536 (one channel; beyond 65504, the largest float16) plus a few units (the
    other channels): the energies and the softmax run in float32, so the output and the gradients are finite and
    agree with float64 (the query's and key's gradients in channel 0, 256 times the rounding of 16-bit energy
    gradients whose exact sum is 0, are left out of the comparison)."""
    if backend != "reference":
        _require_kernels(device)
    generator = torch.Generator().manual_seed(4)
    base = [torch.randn(2, 4, 5, 6, generator=generator), torch.randn(2, 4, 5, 6, generator=generator),
            torch.randn(2, 3, 5, 6, generator=generator)]
    base[0][:, 0] = base[1][:, 0] = 256
    assert ca_weight_reference(base[0], base[1]).min() > 65504
    expected = _fused("reference", *[t.to(device, dtype).double().requires_grad_() for t in base])
    actual = _fused(backend, *[t.to(device, dtype).requires_grad_() for t in base])
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"output {index}"
        if index in (1, 2):
            a, e = a[:, 1:], e[:, 1:]
        assert _relative_error(a, e) <= 2e-2, f"output {index}: {_relative_error(a, e):.2e}"


@pytest.fixture
def restore_design_choices():
    """The kernels' design choices as they were before the test."""
    _require_kernels("cpu")
    saved = {name: library.design_choice(name) for name in library.DESIGN_CHOICES}
    yield
    for name, value in saved.items():
        library.set_design_choice(name, value)


def test_design_choice_energy_dtype_input_keeps_float16_energies(restore_design_choices):
    """The switch's other side: float16 energies overflow (what the float32 default avoids)."""
    query = key = torch.full((1, 4, 3, 3), 130.0, dtype=torch.float16)
    value = torch.randn(1, 2, 3, 3).half()
    library.set_design_choice("energy_dtype", "input")
    assert library.design_choice("energy_dtype") == "input"
    assert torch.isnan(criss_cross_attention(query, key, value, "cpu")).all()
    library.set_design_choice("energy_dtype", "float32")
    assert torch.isfinite(criss_cross_attention(query, key, value, "cpu")).all()


def test_design_choices_are_checked(restore_design_choices, monkeypatch):
    with pytest.raises(ValueError, match="design choice column_gemm is 'fast'; expected one of batched, per_image"):
        library.set_design_choice("column_gemm", "fast")
    with pytest.raises(ValueError, match="unknown design choice 'tiles'"):
        library.design_choice("tiles")
    monkeypatch.setenv("CCNET_CC_SOFTMAX_LOADS", "wide")
    with pytest.raises(ValueError, match="environment variable CCNET_CC_SOFTMAX_LOADS is 'wide'; expected one of "
                                         "vector, scalar"):
        library._design_choices_from_environment()
    monkeypatch.setenv("CCNET_CC_SOFTMAX_LOADS", "scalar")
    assert library._design_choices_from_environment() == {"softmax_loads": "scalar"}


# --- the module -------------------------------------------------------------------------------------------------

def _dense_criss_cross_attention(module, x):
    """The block computed the slow way: for every pixel a softmax over its row and column (itself once)."""
    query, key, value = module.query_conv(x), module.key_conv(x), module.value_conv(x)
    n, _, height, width = x.shape
    out = torch.empty_like(x)
    for y in range(height):
        for x_ in range(width):
            keys = [(y, i) for i in range(width)] + [(j, x_) for j in range(height) if j != y]
            rows, cols = zip(*keys)
            energies = torch.einsum("nc,nck->nk", query[:, :, y, x_], key[:, :, list(rows), list(cols)])
            weights = torch.softmax(energies, dim=1)
            out[:, :, y, x_] = torch.einsum("nk,nck->nc", weights, value[:, :, list(rows), list(cols)])
    return module.gamma * out + x


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", FORMATS)
def test_module_equals_dense_attention(device, backend, layout):
    torch.manual_seed(0)
    module = CrissCrossAttention(16, backend=backend).to(device, torch.float64)
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, device=device).contiguous(memory_format=FORMATS[layout])
    out = module(x)
    torch.testing.assert_close(out, _dense_criss_cross_attention(module, x))
    if backend != "reference":  # the kernels keep the memory format through the block
        assert out.is_contiguous(memory_format=FORMATS[layout])


def test_plain_pytorch_baseline_computes_the_same_function():
    """The benchmark's baseline (the original's pure-PyTorch formulation) is the op it is compared with."""
    query, key, value = _inputs((2, 4, 6, 5))
    torch.testing.assert_close(plain_criss_cross_attention(query, key, value),
                               criss_cross_attention(query, key, value, "reference"))


def test_module_keeps_the_original_parameter_names():
    names = set(CrissCrossAttention(64).state_dict())
    expected = {f"{conv}.{p}" for conv in ("query_conv", "key_conv", "value_conv") for p in ("weight", "bias")}
    assert names == expected | {"gamma"}
    module = CrissCrossAttention(64)
    assert module.query_conv.weight.shape == (8, 64, 1, 1) and module.value_conv.weight.shape == (64, 64, 1, 1)


def test_module_needs_at_least_one_query_channel():
    with pytest.raises(ValueError, match=r"CrissCrossAttention\(4\): in_dim must be >= 8 .* or pass query_channels"):
        CrissCrossAttention(4)
    with pytest.raises(ValueError, match=r"query_channels must be >= 1, got 0"):
        CrissCrossAttention(16, query_channels=0)
    module = CrissCrossAttention(4, query_channels=2)
    assert module.query_conv.out_channels == module.key_conv.out_channels == 2
    assert module(torch.randn(1, 4, 3, 5)).shape == (1, 4, 3, 5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_module_output_keeps_the_autocast_dtype(backend):
    """Under CPU bfloat16 autocast a block fed by a convolution returns bfloat16 (gamma, a float32 parameter, does
    not promote the residual sum to float32)."""
    torch.manual_seed(0)
    conv, module = torch.nn.Conv2d(3, 16, 1), CrissCrossAttention(16, backend=backend)
    torch.nn.init.constant_(module.gamma, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(torch.randn(1, 3, 5, 6))
        out = module(features)
    assert features.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.gamma.grad is not None and module.gamma.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_module_gradients_reach_every_parameter(device):
    module = CrissCrossAttention(16).to(device)
    torch.nn.init.constant_(module.gamma, 0.5)
    module(torch.randn(1, 16, 5, 6, device=device)).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_attention_in_bfloat16(device):
    """Under autocast the op computes in bfloat16 (fp32 inputs are cast), close to the float32 result."""
    module = CrissCrossAttention(16).to(device)
    torch.nn.init.constant_(module.gamma, 1.0)
    x = torch.randn(1, 16, 6, 5, device=device)
    query, key, value = module.project(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        attended = criss_cross_attention(query, key, value)
        out = module(x)
    assert attended.dtype == torch.bfloat16
    torch.testing.assert_close(attended.float(), criss_cross_attention(query, key, value), rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.float(), module(x), rtol=0.05, atol=0.05)


# --- registered operators: torch.library checks, torch.compile, torch.export --------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_registered_operators_pass_torch_library_opcheck(device):
    """Schemas, fake kernels (also with dynamic shapes through AOTAutograd) and autograd registrations."""
    _require_kernels(device)
    query, key, value = _inputs((2, 3, 4, 5), device=device)
    attention = torch.rand(2, 8, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.ccnet.criss_cross_attention.default, (query, key, value))
    torch.library.opcheck(torch.ops.ccnet.ca_weight.default, (query, key))
    torch.library.opcheck(torch.ops.ccnet.ca_map.default, (attention, value))


@pytest.fixture
def no_compile_caches():
    """torch.compile without Inductor's on-disk caches: they key compiled graphs without the fake kernels' code."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("layout", FORMATS)
def test_compile_fullgraph_of_the_module_matches_eager(layout, no_compile_caches, fresh_decisions):
    """Also the first use inside dynamo's tracing: the self-check runs there (on real tensors) without a graph
    break."""
    _require_kernels("cpu")
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 6, 7).contiguous(memory_format=FORMATS[layout])
    x_compiled = x.clone().requires_grad_()
    x_eager = x.clone().requires_grad_()
    compiled = torch.compile(module, fullgraph=True)  # fullgraph: a graph break is an error
    out = compiled(x_compiled)
    expected = module(x_eager)
    torch.testing.assert_close(out, expected)
    assert backends._self_check_errors == {("cpu", torch.float32): None}
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.slow
def test_compile_fullgraph_of_the_tiny_ccnet_matches_eager(no_compile_caches):
    _require_kernels("cpu")
    torch.manual_seed(0)
    model = build_model("ccnet", "tiny", num_classes=5, recurrence=2, norm="bn").eval()
    images = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        expected = model(images)
        actual = torch.compile(model, fullgraph=True)(images)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_export_of_the_module_and_of_the_tiny_ccnet():
    _require_kernels("cpu")
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 6, 7)
    exported = torch.export.export(module, (x,))
    assert any("ccnet.criss_cross_attention" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), module(x))
    model = build_model("ccnet", "tiny", num_classes=5, recurrence=2, norm="bn").eval()
    images = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        exported_model = torch.export.export(model, (images,))
        for a, e in zip(exported_model.module()(images), model(images)):
            torch.testing.assert_close(a, e)


# --- input checks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ca_weight(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "query must be 4-D"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 6)), "same shape"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5).double()), "different dtypes"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5, device="meta")), "different devices"),
        (lambda: ca_weight(torch.zeros(1, 3, 4, 5, dtype=torch.long), torch.zeros(1, 3, 4, 5, dtype=torch.long)),
         "floating point"),
        (lambda: ca_weight(torch.randn(1, 3, 0, 5), torch.randn(1, 3, 0, 5)), "H >= 1 and W >= 1"),
        (lambda: ca_map(torch.randn(1, 7, 4, 5), torch.randn(1, 3, 4, 5)), r"attention must be \(N, H\+W-1, H, W\)"),
        (lambda: ca_map(torch.randn(2, 8, 4, 5), torch.randn(1, 3, 4, 5)), "attention must be"),
        (lambda: criss_cross_attention(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5), torch.randn(1, 3, 4, 6)),
         "agree in N, H and W"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), "gpu"), "backend argument is 'gpu'"),
        (lambda: CrissCrossAttention(16)(torch.randn(1, 8, 4, 5)), r"expects x of shape \(N, 16, H, W\)"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- backend selection ------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_decisions(monkeypatch):
    """Backend decisions, self-checks and warnings start afresh (and are restored afterwards)."""
    monkeypatch.setattr(backends, "_decisions", {})
    monkeypatch.setattr(backends, "_warned_devices", set())
    monkeypatch.setattr(backends, "_self_check_errors", {})
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv(self_check.ENV_VAR, raising=False)


def test_environment_variable_selects_the_backend(fresh_decisions, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.uses_kernels(None, "cpu") is False
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="environment variable CCNET_CC_BACKEND is 'fast'"):
        backends.uses_kernels(None, "cpu")


def test_auto_uses_the_kernels_of_the_device(fresh_decisions):
    _require_kernels("cpu")
    assert backends.uses_kernels(None, "cpu") is True
    assert backends.uses_kernels("auto", "meta") is False  # no kernels for that device: the reference


def test_explicit_backend_for_tensors_on_another_device_is_a_one_line_error(fresh_decisions):
    query = torch.randn(1, 3, 4, 5)
    with pytest.raises(backends.BackendUnavailableError, match=r"^backend 'cuda' needs cuda tensors, got tensors on "
                                                                r"cpu$"):
        ca_weight(query, query, "cuda")


FAILED_BUILD = ("building the kernels failed:\n"
                "cc_attention_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n"
                "ops.cpp:7:1: error: expected ';'")


def test_explicit_backend_whose_kernels_did_not_build_is_a_one_line_error(fresh_decisions, monkeypatch):
    monkeypatch.setattr(library, "_state", library.LibraryState(frozenset(), {"cpu": FAILED_BUILD,
                                                                                "cuda": "no CUDA GPU is visible"}))
    query, key, value = _inputs((1, 3, 4, 5), torch.float32)
    with pytest.raises(backends.BackendUnavailableError) as raised:
        criss_cross_attention(query, key, value, "cpu")
    message = str(raised.value)
    assert "\n" not in message and "'foo' was not declared" in message and message.startswith("backend 'cpu'")
    with pytest.raises(backends.BackendUnavailableError, match=r"^backend 'cuda' cannot run: no CUDA GPU is visible$"):
        backends.uses_kernels("cuda", "cuda")


def test_auto_warns_once_and_falls_back_to_the_reference(fresh_decisions, monkeypatch):
    monkeypatch.setattr(library, "_state", library.LibraryState(frozenset(), {"cpu": FAILED_BUILD}))
    query, key, value = _inputs((1, 3, 4, 5), torch.float32)
    with pytest.warns(RuntimeWarning, match=r"no cpu kernels \(building the kernels failed(.|\n)*'foo' was not"):
        out = criss_cross_attention(query, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = criss_cross_attention(query, key, value, "auto")
    expected = ca_map_reference(torch.softmax(ca_weight_reference(query, key), dim=1), value)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


def _wrong_kernel(query, key, value):
    """A deliberately wrong fused op: the attention of every pixel over its keys, with query and key swapped."""
    return criss_cross_attention_reference(key, query, value)


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_passes_and_takes_milliseconds(fresh_decisions, device):
    _require_kernels(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        self_check.kernel_error(device, dtype)  # warm-up: the first call of each path allocates
        start = time.perf_counter()
        assert self_check.kernel_error(device, dtype) is None
        assert time.perf_counter() - start < 0.5  # a few ms on a quiet 2-core machine; headroom for a loaded one


def test_a_kernel_that_fails_its_self_check_is_not_used(fresh_decisions, monkeypatch):
    """auto: one warning naming the error, then the reference; explicit "cpu": a one-line error; the check runs
    once per (device, dtype)."""
    _require_kernels("cpu")
    calls, real_kernels = [], self_check._kernels
    monkeypatch.setattr(self_check, "_kernels", lambda *tensors: calls.append(None) or _wrong_kernel(*tensors))
    query, key, value = _inputs((1, 3, 4, 5), torch.float32)
    with pytest.warns(RuntimeWarning, match=r"no cpu kernels \(their self-check in float32 failed: output differs "
                                            r"from the reference by .* on a NCHW"):
        out = criss_cross_attention(query, key, value)
    torch.testing.assert_close(out, criss_cross_attention_reference(query, key, value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        criss_cross_attention(query, key, value, "auto")
    with pytest.raises(backends.BackendUnavailableError, match=r"^backend 'cpu' failed its self-check in float32: "
                                                               r"output differs"):
        criss_cross_attention(query, key, value, "cpu")
    assert len(calls) == 1
    monkeypatch.setattr(self_check, "_kernels", real_kernels)
    assert backends.uses_kernels("cpu", "cpu", torch.float64)  # another dtype: its own check, which passes


def test_a_kernel_that_raises_in_its_self_check_is_not_used(fresh_decisions, monkeypatch):
    _require_kernels("cpu")

    def crash(*tensors):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(self_check, "_kernels", crash)
    with pytest.raises(backends.BackendUnavailableError, match=r"self-check in float32: RuntimeError: CUDA error: an "
                                                               r"illegal memory access was encountered$"):
        backends.uses_kernels("cpu", "cpu", torch.float32)


def test_selfcheck_0_skips_the_self_check(fresh_decisions, monkeypatch):
    _require_kernels("cpu")
    monkeypatch.setattr(self_check, "_kernels", lambda *tensors: pytest.fail("the self-check ran"))
    monkeypatch.setenv(self_check.ENV_VAR, "0")
    assert backends.uses_kernels(None, "cpu", torch.float32) is True


def test_self_check_runs_on_real_tensors_while_export_traces(fresh_decisions):
    """The first use inside torch.export's tracing (fake tensors): the check still computes, on real tensors."""
    _require_kernels("cpu")
    module = CrissCrossAttention(16)
    exported = torch.export.export(module, (torch.randn(1, 16, 4, 5),))
    assert backends._self_check_errors == {("cpu", torch.float32): None}
    assert any("ccnet.criss_cross_attention" in str(node.target) for node in exported.graph.nodes)


def test_library_name_records_the_cpu_the_checkout_and_the_variant(monkeypatch, tmp_path):
    name = library.library_name(with_cuda=False)
    assert name.startswith("ccnet_cc_attention_") and name.isidentifier() and name == library.library_name(False)
    assert library.library_name(with_cuda=True) == name + "_cuda"
    assert len(library._cpu_tag()) == 10
    monkeypatch.setattr(library, "_CSRC", tmp_path / "csrc")  # another checkout: another cached build
    assert library.library_name(with_cuda=False) != name


# --- the CUDA sources compile without a GPU -----------------------------------------------------------------------

def _nvcc():
    """Path of nvcc (CUDA_HOME, /usr/local/cuda or the PATH), or None."""
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    found = next((str(c) for c in candidates if c.exists()), None)
    return found or shutil.which("nvcc")


@pytest.mark.slow
def test_cuda_library_compiles_and_registers_the_cuda_kernels(repo_root, in_ci):
    """In a fresh process (a process loads one variant of the library): build the CUDA variant and check that the
    operators have CUDA kernels."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    if torch.version.cuda is None:
        message = f"torch {torch.__version__} is a CPU-only build: the CUDA kernels cannot be compiled"
        if in_ci:
            pytest.fail(f"CI has nvcc ({nvcc}) but {message}")
        pytest.skip(message)
    script = ("import torch\nfrom cc_attention import library\nlibrary.build(with_cuda=True)\n"
              "for name in ('criss_cross_attention_forward', 'criss_cross_attention_backward', 'ca_weight', "
              "'ca_weight_backward', 'ca_map', 'ca_map_backward'):\n"
              "    assert torch._C._dispatch_has_kernel_for_dispatch_key('ccnet::' + name, 'CUDA'), name\n"
              "print('ok')\n")
    environment = dict(os.environ, PYTHONPATH=str(repo_root))
    environment.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=environment, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
