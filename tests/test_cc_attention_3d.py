"""The 3-D (video) criss-cross attention: a dense masked-softmax oracle over every position of the clip, the
original's double-counted position caught, gradients (analytic backward and autograd), awkward shapes, NCDHW and
NDHWC, T = 1 against the 2-D op, the registered operators, torch.compile / torch.export, the block, the input
checks and the benchmark's baselines."""
import pytest
import torch

from benchmarks import cc_attention_3d, model_report
from benchmarks.cc_attention_3d import non_local_3d, plain_criss_cross_attention_3d
from cc_attention import CrissCrossAttention3D, backends, criss_cross_attention, criss_cross_attention_3d, library
from cc_attention.axes import criss_cross_attention_over_axes
from networks import NonLocalBlock

BACKENDS = ("auto", "reference")  # the registered operator and the autograd reference
# (N, C', C, T, H, W): odd sizes, T = 1, H = 1, W = 1, all three 1, batch > 1
SHAPES = [(2, 3, 5, 3, 4, 5), (1, 2, 3, 1, 4, 3), (1, 2, 3, 3, 1, 4), (1, 2, 3, 4, 3, 1), (1, 2, 2, 1, 1, 1),
          (2, 4, 3, 5, 3, 2)]
FORMATS = {"ncdhw": torch.contiguous_format, "ndhwc": torch.channels_last_3d}


def _inputs(shape, dtype=torch.float64, memory_format=torch.contiguous_format, seed=0):
    n, c_key, c_value, t, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, c, t, h, w, generator=generator) for c in (c_key, c_key, c_value)]
    return [x.to(dtype).contiguous(memory_format=memory_format).requires_grad_() for x in tensors]


def key_mask(time: int, height: int, width: int) -> torch.Tensor:
    """``(THW, THW)`` bool: ``mask[p, p']`` is True when ``p'`` is a key of ``p``: its row (itself included), its
    column (not itself) or its time line (not itself)."""
    t, y, x = torch.meshgrid(torch.arange(time), torch.arange(height), torch.arange(width), indexing="ij")
    t, y, x = t.flatten(), y.flatten(), x.flatten()
    same_t, same_y, same_x = (t[:, None] == t), (y[:, None] == y), (x[:, None] == x)
    row = same_t & same_y
    column = same_t & same_x & ~same_y
    time_line = same_y & same_x & ~same_t
    return row | column | time_line


def dense_attention(query, key, value, mask=None):
    """The oracle: ``(N, C', T, H, W)`` ... -> ``(N, C, T, H, W)``, one softmax over every position's keys of the
    dense ``(THW, THW)`` energies, the others masked out by ``key_mask``."""
    n, _, time, height, width = query.shape
    mask = key_mask(time, height, width) if mask is None else mask
    energy = torch.einsum("ncp,ncq->npq", query.flatten(2), key.flatten(2)).masked_fill(~mask, float("-inf"))
    out = torch.einsum("npq,ncq->ncp", torch.softmax(energy, dim=-1), value.flatten(2))
    return out.view(n, -1, time, height, width)


def double_counting_attention(query, key, value):
    """The original's faulty formulation (its functions3d.py): rows, columns and time lines concatenated into one
    softmax with only the column diagonal masked, so the position is a key of its row AND of its time line."""
    n, _, time, height, width = query.shape
    rows = torch.einsum("ncthw,ncthk->nthwk", query, key)
    columns = torch.einsum("ncthw,nctkw->nthwk", query, key)
    columns = columns.masked_fill(torch.eye(height, dtype=torch.bool).view(1, 1, height, 1, height), float("-inf"))
    times = torch.einsum("ncthw,nckhw->nthwk", query, key)
    attention = torch.softmax(torch.cat([rows, columns, times], dim=-1), dim=-1)
    a_rows, a_columns, a_times = torch.split(attention, [width, height, time], dim=-1)
    return (torch.einsum("nthwk,ncthk->ncthw", a_rows, value) + torch.einsum("nthwk,nctkw->ncthw", a_columns, value)
            + torch.einsum("nthwk,nckhw->ncthw", a_times, value))


def _weights(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)


def _with_gradients(function, query, key, value):
    out = function(query, key, value)
    return [out, *torch.autograd.grad((out * _weights(out)).sum(), (query, key, value))]


def test_key_mask_gives_every_position_t_plus_h_plus_w_minus_2_keys_itself_once():
    mask = key_mask(3, 4, 5)
    assert mask.sum(1).tolist() == [3 + 4 + 5 - 2] * 60
    assert mask.diagonal().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_op_equals_the_dense_masked_softmax(backend, layout, shape):
    query, key, value = _inputs(shape, memory_format=FORMATS[layout])
    expected = _with_gradients(dense_attention, *_inputs(shape))
    actual = _with_gradients(lambda q, k, v: criss_cross_attention_3d(q, k, v, backend), query, key, value)
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {index} {shape}: {m}")
    # the output keeps the inputs' memory format; the registered operator's gradients too (autograd's may not)
    for tensor in actual if backend == "auto" else actual[:1]:
        assert tensor.is_contiguous(memory_format=FORMATS[layout])


@pytest.mark.parametrize("shape", [(2, 3, 4, 3, 4, 5), (1, 2, 3, 2, 1, 3)])
def test_the_originals_double_counted_position_fails_the_oracle(shape):
    """The faulty formulation disagrees with the oracle (whose test would fail it); the op agrees."""
    query, key, value = _inputs(shape)
    expected = dense_attention(query, key, value)
    assert (double_counting_attention(query, key, value) - expected).abs().max() > 1e-3
    torch.testing.assert_close(criss_cross_attention_3d(query, key, value), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    query, key, value = _inputs((2, 2, 3, 3, 2, 4))
    assert torch.autograd.gradcheck(lambda q, k, v: criss_cross_attention_3d(q, k, v, backend), (query, key, value))


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_backward_equals_autograd_of_the_reference(layout, shape):
    """The registered operator's backward (from the saved blocks) against autograd through the reference."""
    expected = _with_gradients(lambda q, k, v: criss_cross_attention_3d(q, k, v, "reference"), *_inputs(shape))
    actual = _with_gradients(criss_cross_attention_3d, *_inputs(shape, memory_format=FORMATS[layout]))
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {index} {shape}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 1, 4, 5), (1, 2, 3, 1, 1, 6), (1, 2, 3, 1, 7, 1)])
def test_one_frame_equals_the_2d_op(backend, shape):
    query, key, value = _inputs(shape)
    actual = _with_gradients(lambda q, k, v: criss_cross_attention_3d(q, k, v, backend)[:, :, 0], query, key, value)
    expected = _with_gradients(lambda q, k, v: criss_cross_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                                     "reference"), query, key, value)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_the_2d_op_is_the_axes_function_without_a_time_axis():
    query, key, value = [t[:, :, 0] for t in _inputs((2, 3, 4, 1, 5, 6))]
    torch.testing.assert_close(criss_cross_attention_over_axes(query, key, value, (-1, -2)),
                               criss_cross_attention(query, key, value, "reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_against_float64(backend, dtype):
    """float32 and bfloat16 (energies and softmax in float32) against the float64 oracle."""
    shape = (1, 8, 6, 3, 5, 4)
    expected = _with_gradients(dense_attention, *_inputs(shape))
    actual = _with_gradients(lambda q, k, v: criss_cross_attention_3d(q, k, v, backend), *_inputs(shape, dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        assert float((a.detach().double() - e).norm() / e.norm()) <= tolerance


def test_registered_operators_pass_opcheck():
    """Schemas, fake kernels (dynamic shapes too) and the autograd registration of ccnet::criss_cross_attention_3d
    and of its backward."""
    query, key, value = _inputs((2, 3, 4, 3, 4, 5))
    torch.library.opcheck(torch.ops.ccnet.criss_cross_attention_3d.default, (query, key, value))
    out, *blocks = torch.ops.ccnet.criss_cross_attention_3d(query, key, value)
    assert [tuple(b.shape) for b in blocks] == [(2, 3, 4, 5, 5), (2, 3, 5, 4, 4), (2, 4, 5, 3, 3)]
    backward_inputs = [t.detach() for t in (torch.randn_like(out), query, key, value, *blocks)]  # no double backward
    torch.library.opcheck(torch.ops.ccnet.criss_cross_attention_3d_backward.default, backward_inputs)


# --- the block ------------------------------------------------------------------------------------------------

def test_block_has_the_2d_parameter_names_with_1x1x1_convolutions():
    module = CrissCrossAttention3D(64)
    names = {f"{conv}.{p}" for conv in ("query_conv", "key_conv", "value_conv") for p in ("weight", "bias")}
    assert set(module.state_dict()) == names | {"gamma"}
    assert module.query_conv.weight.shape == (8, 64, 1, 1, 1) and module.value_conv.weight.shape == (64, 64, 1, 1, 1)
    assert module.gamma.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", FORMATS)
def test_block_equals_the_dense_oracle(backend, layout):
    torch.manual_seed(0)
    module = CrissCrossAttention3D(16, backend=backend).double()
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=FORMATS[layout])
    out = module(x)
    expected = module.gamma * dense_attention(module.query_conv(x), module.key_conv(x), module.value_conv(x)) + x
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=FORMATS[layout])


def test_block_gradients_reach_every_parameter():
    module = CrissCrossAttention3D(16)
    torch.nn.init.constant_(module.gamma, 0.5)
    module(torch.randn(1, 16, 3, 4, 5)).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.fixture
def no_compile_caches():
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("layout", FORMATS)
def test_compile_fullgraph_of_the_block_matches_eager(layout, no_compile_caches):
    torch.manual_seed(0)
    module = CrissCrossAttention3D(16)
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 3, 5, 4).contiguous(memory_format=FORMATS[layout])
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch.compile(module, fullgraph=True)(x_compiled)  # fullgraph: a graph break is an error
    expected = module(x_eager)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-4)


def test_export_of_the_block_holds_the_registered_operator():
    torch.manual_seed(0)
    module = CrissCrossAttention3D(16)
    torch.nn.init.constant_(module.gamma, 0.7)
    x = torch.randn(2, 16, 3, 5, 4)
    exported = torch.export.export(module, (x,))
    assert any("ccnet.criss_cross_attention_3d" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), module(x))


# --- input checks and backends ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: criss_cross_attention_3d(*[torch.randn(1, 2, 4, 5)] * 3), "query must be 5-D"),
        (lambda: criss_cross_attention_3d(torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 6),
                                          torch.randn(1, 3, 3, 4, 5)), "same shape"),
        (lambda: criss_cross_attention_3d(torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5),
                                          torch.randn(1, 3, 2, 4, 5)), "agree in N, T, H and W"),
        (lambda: criss_cross_attention_3d(*[torch.randn(1, 2, 0, 4, 5)] * 3), "T, H, W >= 1"),
        (lambda: criss_cross_attention_3d(torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5).double(),
                                          torch.randn(1, 3, 3, 4, 5)), "different dtypes"),
        (lambda: criss_cross_attention_3d(*[torch.randn(1, 2, 3, 4, 5)] * 3, backend="cpu"),
         "backend argument is 'cpu', but the 3-D criss-cross attention has no compiled kernels yet"),
        (lambda: criss_cross_attention_3d(*[torch.randn(1, 2, 3, 4, 5)] * 3, backend="gpu"),
         "backend argument is 'gpu'"),
        (lambda: CrissCrossAttention3D(4), "needs in_channels >= 8"),
        (lambda: CrissCrossAttention3D(16)(torch.randn(1, 16, 4, 5)), r"expects x of shape \(N, 16, T, H, W\)"),
    ],
)
def test_bad_input_raises_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_environment_variable_naming_kernels_is_refused(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"environment variable {backends.ENV_VAR} is 'cuda'"):
        criss_cross_attention_3d(*[torch.randn(1, 2, 3, 4, 5)] * 3)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert criss_cross_attention_3d(*[torch.randn(1, 2, 3, 4, 5)] * 3).shape == (1, 2, 3, 4, 5)


# --- the benchmark ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 4, 3, 4, 5), (1, 2, 3, 1, 4, 3), (1, 2, 3, 3, 1, 1)])
def test_the_benchmarks_plain_formulation_computes_the_op(shape):
    """The benchmark's baseline (the original's bmm formulation, faults mended) is the op it is compared with."""
    query, key, value = _inputs(shape)
    torch.testing.assert_close(plain_criss_cross_attention_3d(query, key, value), dense_attention(query, key, value))


def test_the_benchmarks_non_local_block_attends_over_the_whole_clip():
    torch.manual_seed(0)
    block = NonLocalBlock(8)
    torch.nn.init.normal_(block.out.weight)
    x = torch.randn(1, 8, 3, 4, 5)
    changed = x.clone()
    changed[:, :, 0, 0, 0] += 1  # one position of the first frame changes every position of the last
    assert (non_local_3d(block, x)[:, :, 2] - non_local_3d(block, changed)[:, :, 2]).abs().min() > 0


@pytest.mark.slow
def test_the_benchmark_table_has_every_row():
    table = cc_attention_3d.run_benchmark([1, 3], [5], 16, repeats=1, device="cpu", max_attention_gib=1e-6)
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert len(rows) == 2 * len(cc_attention_3d.ROWS)
    assert sum("skipped: its attention matrix alone needs" in row for row in rows) == 2  # the non-local rows
    assert not any("n/a" in row for row in rows)


def test_the_model_reports_video_costs_are_counted_exactly():
    """3-D RCCA: the 1x1x1 projections and the three blocks' two products per loop; at T = 1 the 2-D figure."""
    channels, (height, width), time = 64, (9, 11), 3
    positions = time * height * width
    keys = time + height + width  # per block, the masked diagonal included (as the products compute it)
    macs_per_loop = (positions * channels * (channels // 8) * 2 + positions * channels * channels
                     + positions * keys * (channels // 8) + positions * keys * channels)
    costs = model_report.video_attention_costs((height, width), time, channels, recurrence=2)
    assert costs["rcca"] == (2 * 2 * macs_per_loop, 4 * 2 * positions * keys)
    inner = channels // 2
    non_local_macs = positions * channels * inner * 3 + 2 * positions ** 2 * inner + positions * inner * channels
    assert costs["non-local"] == (2 * non_local_macs, 4 * positions ** 2)


def test_the_3d_operator_and_the_2d_kernels_share_the_ccnet_library():
    """The Python-registered 3-D operators and the C++ library's 2-D operators live in one ``ccnet`` namespace:
    loading the kernels after the 3-D registration (what ``import cc_attention`` does) keeps both working."""
    reason = library.load().missing.get("cpu")
    if reason is not None:
        pytest.fail(f"the cpu kernels are not available: {reason}")
    query, key, value = _inputs((1, 2, 3, 2, 4, 5))
    torch.testing.assert_close(criss_cross_attention_3d(query, key, value), dense_attention(query, key, value))
    images = [t[:, :, 0] for t in (query, key, value)]
    torch.testing.assert_close(criss_cross_attention(*images, backend="cpu"),
                               criss_cross_attention(*images, backend="reference"))
