"""Criss-cross attention op: gradients, backend agreement, the module against a dense attention, input checks,
backend selection and the build-failure fallback (CPU; the CUDA tests are in test_cc_attention_cuda.py)."""
import warnings

import pytest
import torch

from cc_attention import CrissCrossAttention, backends, ca_map, ca_weight, criss_cross_attention
from cc_attention.reference import ca_map_reference, ca_weight_reference

# (N, C, H, W): H != W, batch > 1, odd sizes, 1 x W and H x 1, and more channels than one kernel pass (64).
SHAPES = [(2, 3, 5, 7), (1, 4, 6, 6), (3, 2, 9, 4), (1, 3, 1, 8), (2, 3, 7, 1), (1, 70, 5, 6)]  # C=70: 3 passes


def _inputs(shape, dtype=torch.float64, seed=0):
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    key = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    value = torch.randn(n, c + 2, h, w, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (query, key, value)]


def _forward_backward(backend, query, key, value):
    """Energy, output and the gradients of a loss that weights every element differently."""
    energy = ca_weight(query, key, backend)
    out = ca_map(torch.softmax(energy, dim=1), value, backend)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + energy.square().mean()
    return [energy, out, *torch.autograd.grad(loss, (query, key, value))]


@pytest.fixture(scope="module")
def cpu_kernel():
    module = backends.kernels("cpu")
    if module is None:
        pytest.skip("the C++ CPU kernel did not build on this machine (see the warning)")
    return module


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, cpu_kernel):
    query, key, value = _inputs((2, 3, 4, 5))
    attention = torch.rand(2, 4 + 5 - 1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: ca_weight(q, k, backend), (query, key))
    assert torch.autograd.gradcheck(lambda a, v: ca_map(a, v, backend), (attention, value))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_matches_reference(shape, dtype, cpu_kernel):
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    expected = _forward_backward("reference", *_inputs(shape, dtype))
    actual = _forward_backward("cpu", *_inputs(shape, dtype))
    for name, a, e in zip(["energy", "out", "grad query", "grad key", "grad value"], actual, expected):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m: f"{name} {shape}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_attention_matches_reference(shape, cpu_kernel):
    """criss_cross_attention on a kernel is one autograd node (in-place softmax); compare values and gradients."""
    def run(backend):
        query, key, value = _inputs(shape)
        out = criss_cross_attention(query, key, value, backend)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return [out, *torch.autograd.grad((out * weights).sum(), (query, key, value))]

    for name, a, e in zip(["out", "grad query", "grad key", "grad value"], run("cpu"), run("reference")):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {shape}: {m}")


def test_fused_attention_gradcheck(cpu_kernel):
    query, key, value = _inputs((2, 2, 3, 4))
    assert torch.autograd.gradcheck(lambda q, k, v: criss_cross_attention(q, k, v, "cpu"), (query, key, value))


def test_kernel_takes_channel_slices(cpu_kernel):
    """Query/key/value as channel slices of one tensor (what the module passes): batch stride is free."""
    qkv = torch.randn(2, 3 + 3 + 5, 6, 7, dtype=torch.float64)
    query, key, value = torch.split(qkv, [3, 3, 5], dim=1)
    expected = criss_cross_attention(query, key, value, "reference")
    torch.testing.assert_close(criss_cross_attention(query, key, value, "cpu"), expected)


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


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_equals_dense_attention(backend, cpu_kernel):
    torch.manual_seed(0)
    module = CrissCrossAttention(16, backend=backend).double()
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), _dense_criss_cross_attention(module, x))


def test_module_keeps_the_original_parameter_names():
    names = set(CrissCrossAttention(64).state_dict())
    expected = {f"{conv}.{p}" for conv in ("query_conv", "key_conv", "value_conv") for p in ("weight", "bias")}
    assert names == expected | {"gamma"}
    module = CrissCrossAttention(64)
    assert module.query_conv.weight.shape == (8, 64, 1, 1) and module.value_conv.weight.shape == (64, 64, 1, 1)


def test_module_gradients_reach_every_parameter(cpu_kernel):
    module = CrissCrossAttention(16)
    torch.nn.init.constant_(module.gamma, 0.5)
    module(torch.randn(1, 16, 5, 6)).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_cpu_autocast_runs_in_bfloat16():
    module = CrissCrossAttention(16)
    torch.nn.init.constant_(module.gamma, 1.0)
    x = torch.randn(1, 16, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    torch.testing.assert_close(out.float(), module(x), rtol=0.05, atol=0.05)


# --- input checks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ca_weight(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "query must be 4-D"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 6)), "same shape"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5).double()), "different dtypes"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5, device="meta")), "different devices"),
        (lambda: ca_weight(torch.zeros(1, 3, 4, 5, dtype=torch.long), torch.zeros(1, 3, 4, 5, dtype=torch.long)),
         "floating point"),
        (lambda: ca_map(torch.randn(1, 7, 4, 5), torch.randn(1, 3, 4, 5)), r"attention must be \(N, H\+W-1, H, W\)"),
        (lambda: ca_map(torch.randn(2, 8, 4, 5), torch.randn(1, 3, 4, 5)), "attention must be"),
        (lambda: criss_cross_attention(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5), torch.randn(1, 3, 4, 6)),
         "agree in N, H and W"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), "gpu"), "backend argument is 'gpu'"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), "cuda"), "needs cuda tensors"),
        (lambda: ca_weight(torch.randn(1, 3, 4, 5).half(), torch.randn(1, 3, 4, 5).half(), "cpu"),
         "supports float32, float64"),
        (lambda: CrissCrossAttention(16)(torch.randn(1, 8, 4, 5)), r"expects x of shape \(N, 16, H, W\)"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernel_rejects_layout_it_cannot_take(cpu_kernel):
    query = torch.randn(1, 3, 5, 4).transpose(2, 3)  # (1, 3, 4, 5), not contiguous in (C, H, W)
    with pytest.raises(ValueError, match=r"query contiguous in \(C, H, W\).*strides"):
        ca_weight(query, torch.randn(1, 3, 4, 5), "cpu")
    # The reference takes any layout.
    torch.testing.assert_close(
        ca_weight(query, query, "reference"), ca_weight_reference(query.contiguous(), query.contiguous())
    )


# --- backend selection and fallback ---------------------------------------------------------------------------

def test_environment_variable_selects_the_backend(monkeypatch):
    x = torch.randn(1, 2, 3, 4)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select(None, x) == ("reference", None)
    assert backends.select("reference", x.double()) == ("reference", None)
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="environment variable CCNET_CC_BACKEND is 'fast'"):
        backends.select(None, x)


def test_auto_picks_the_cpu_kernel_for_float_cpu_tensors(cpu_kernel, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select(None, torch.randn(1, 2, 3, 4)) == ("cpu", cpu_kernel)
    assert backends.select("auto", torch.randn(1, 2, 3, 4).bfloat16()) == ("reference", None)


def test_build_failure_warns_once_and_falls_back_to_the_reference(monkeypatch):
    compiler_output = (
        "Error building extension 'ccnet_cc_attention_cpu': [1/2] c++ -c cc_attention_cpu.cpp\n"
        "FAILED: cc_attention_cpu.o\n"
        "cc_attention_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed."
    )

    def failing_build(kind, verbose=False):
        raise RuntimeError(compiler_output)

    monkeypatch.setattr(backends, "_built", {})
    monkeypatch.setattr(backends, "build_extension", failing_build)
    query, key, value = _inputs((1, 3, 4, 5), torch.float32)
    with pytest.warns(RuntimeWarning, match=r"building the cpu kernels failed(.|\n)*'foo' was not declared"):
        out = criss_cross_attention(query, key, value, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = criss_cross_attention(query, key, value, "cpu")
    expected = ca_map_reference(torch.softmax(ca_weight_reference(query, key), dim=1), value)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


def test_fused_softmax_runs_in_float32_for_half_energies_and_in_place_otherwise():
    from cc_attention import functions
    energy = torch.randn(2, 9, 4, 6) * 30
    for dtype in (torch.float16, torch.bfloat16):
        half = energy.to(dtype)
        attention = functions._softmax_(half.clone())
        assert attention.dtype == dtype
        assert torch.equal(attention, torch.softmax(half.float(), dim=1).to(dtype))
        grad = torch.randn_like(half)
        expected = (attention.float() * (grad.float() - (grad.float() * attention.float()).sum(1, keepdim=True)))
        assert torch.equal(functions._softmax_backward_(grad, attention), expected.to(dtype))
    single = energy.clone()
    assert functions._softmax_(single) is single  # fp32: in place
    torch.testing.assert_close(single, torch.softmax(energy, dim=1))


def test_cpu_kernel_cache_name_records_the_cpu():
    from cc_attention import backends
    name = backends.cpu_extension_name()
    assert name.startswith("ccnet_cc_attention_cpu_") and name.isidentifier() and name == backends.cpu_extension_name()
    assert len(backends._cpu_tag()) == 10
