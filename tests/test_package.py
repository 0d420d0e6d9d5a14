"""The op as an installed package: a wheel of the checkout, installed into a folder of its own and imported from
outside the checkout, builds its kernels on first use (saying so once) or, built ahead of time
(``CC_ATTENTION_BUILD=cpu``), loads them without a compiler."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

# Run from outside the checkout: the forward and backward of the kernels (not the reference) against the reference,
# and the module; prints where the package came from.
USE_THE_OP = """
import torch, cc_attention
from cc_attention import CrissCrossAttention, criss_cross_attention
from cc_attention.reference import criss_cross_attention_reference
q, k, v = (torch.randn(2, c, 5, 7, dtype=torch.float64, requires_grad=True) for c in (4, 4, 6))
out = criss_cross_attention(q, k, v, backend="cpu")
out.sum().backward()
expected = criss_cross_attention_reference(q, k, v)
assert torch.allclose(out, expected), (out - expected).abs().max()
assert q.grad is not None and torch.isfinite(q.grad).all()
block = CrissCrossAttention(16, backend="cpu")
assert block(torch.randn(1, 16, 6, 6)).shape == (1, 16, 6, 6)
video = cc_attention.CrissCrossAttention3D(16)  # the 3-D (video) op is in the package too
assert video(torch.randn(1, 16, 3, 4, 5)).shape == (1, 16, 3, 4, 5)
print("package:", cc_attention.__file__)
"""

pytestmark = pytest.mark.slow


def build_wheel(repo_root, out_dir, **env) -> str:
    """The wheel of a copy of what the package is made of (no build/ folder or library left by an earlier build)."""
    source = out_dir / "source"
    for name in ("pyproject.toml", "setup.py", "LICENSE", "docs/op.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo_root / name, source / name)
    shutil.copytree(repo_root / "cc_attention", source / "cc_attention",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out_dir)], check=True, env={**os.environ, **env}, cwd=out_dir)
    (wheel,) = out_dir.glob("cc_attention-*.whl")
    return str(wheel)


def install(wheel: str, target) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                   check=True)


def use_the_op(site, cwd, extensions_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    return subprocess.run([sys.executable, "-c", USE_THE_OP], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)


def test_the_wheel_holds_the_op_and_its_sources_only(repo_root, tmp_path):
    names = zipfile.ZipFile(build_wheel(repo_root, tmp_path)).namelist()
    assert "cc_attention/csrc/ops.cpp" in names and "cc_attention/csrc/cuda/cc_attention_cuda.cu" in names
    assert {name.split("/")[0] for name in names if not name.startswith("cc_attention-")} == {"cc_attention"}


def test_installed_package_builds_its_kernels_on_first_use_and_says_so_once(repo_root, tmp_path):
    install(build_wheel(repo_root, tmp_path), tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = use_the_op(tmp_path / "site", elsewhere, tmp_path / "extensions")
    assert first.returncode == 0, first.stderr
    assert f"package: {tmp_path / 'site'}" in first.stdout
    assert first.stderr.count("cc_attention: building the CPU kernels (once, about 30 s) ...") == 1
    second = use_the_op(tmp_path / "site", elsewhere, tmp_path / "extensions")
    assert second.returncode == 0, second.stderr
    assert "building" not in second.stderr


def test_kernels_built_ahead_of_time_load_without_a_compiler(repo_root, tmp_path):
    wheel = build_wheel(repo_root, tmp_path, CC_ATTENTION_BUILD="cpu", MAX_JOBS="2")
    assert "cc_attention/_kernels_cpu.so" in zipfile.ZipFile(wheel).namelist()
    install(wheel, tmp_path / "site")
    elsewhere, extensions = tmp_path / "elsewhere", tmp_path / "extensions"
    elsewhere.mkdir()
    result = use_the_op(tmp_path / "site", elsewhere, extensions)
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr
    assert not extensions.exists() or not any(extensions.iterdir())  # nothing compiled on first use
