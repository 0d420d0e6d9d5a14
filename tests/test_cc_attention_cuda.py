"""CUDA backend: the extension compiles wherever nvcc and a CUDA build of torch exist (CI included, no GPU
needed), and on a GPU it agrees with the reference in fp32 and bf16, forward and backward, also under autocast."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from cc_attention import CrissCrossAttention, backends, ca_map, ca_weight

SHAPES = [(2, 3, 5, 7), (1, 70, 6, 6), (3, 2, 9, 4), (1, 3, 1, 8), (2, 3, 7, 1)]


def _nvcc():
    """Path of nvcc (CUDA_HOME, /usr/local/cuda or the PATH), or None."""
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    found = next((str(c) for c in candidates if c.exists()), None)
    return found or shutil.which("nvcc")


def test_cuda_extension_compiles(monkeypatch):
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    if torch.version.cuda is None:
        message = f"torch {torch.__version__} is a CPU-only build: the CUDA extension cannot be compiled"
        if in_ci:
            pytest.fail(f"CI has nvcc ({nvcc}) but {message}")
        pytest.skip(message)
    if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    module = backends.build_extension("cuda")
    for name in ("ca_weight_forward", "ca_weight_backward", "ca_map_forward", "ca_map_backward"):
        assert callable(getattr(module, name))


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA kernels cannot run")


def _forward_backward(backend, shape, dtype, seed=0):
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, c, h, w, generator=generator), torch.randn(n, c, h, w, generator=generator),
               torch.randn(n, c + 5, h, w, generator=generator)]
    query, key, value = [(t * 0.5).to("cuda", dtype).requires_grad_() for t in tensors]
    energy = ca_weight(query, key, backend)
    out = ca_map(torch.softmax(energy.float(), dim=1).to(dtype), value, backend)
    weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    loss = (out.float() * weights).sum() + energy.float().square().mean()
    return [energy, out, *torch.autograd.grad(loss, (query, key, value))]


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(shape, dtype):
    if backends.kernels("cuda") is None:
        pytest.fail("the CUDA kernels did not build on a GPU machine (see the warning)")
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    expected = _forward_backward("reference", shape, torch.float32)  # fp32 reference for both dtypes
    actual = _forward_backward("cuda", shape, dtype)
    for name, a, e in zip(["energy", "out", "grad query", "grad key", "grad value"], actual, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **tolerance, msg=lambda m: f"{name} {shape} {dtype}: {m}")


@requires_gpu
def test_cuda_module_under_autocast():
    torch.manual_seed(0)
    module = CrissCrossAttention(32).cuda()
    torch.nn.init.constant_(module.gamma, 1.0)
    x = torch.randn(2, 32, 9, 11, device="cuda")
    expected = CrissCrossAttention(32, backend="reference").cuda()
    expected.load_state_dict(module.state_dict())
    with torch.autocast("cuda", dtype=torch.float16):
        out = module(x)
        out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), expected(x), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
