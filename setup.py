"""The optional ahead-of-time build of the op's kernels (pyproject.toml holds everything else).

``CC_ATTENTION_BUILD=1 pip install --no-build-isolation .`` compiles ``cc_attention/_kernels_cpu`` (and
``_kernels_cuda``, the CUDA variant, when this torch has CUDA and nvcc is found; ``CC_ATTENTION_BUILD=cpu``: the CPU
variant only) against the installed torch, for machines that run the op without a compiler (a cluster's compute
nodes). The CPU code is built for the compiler's default target unless ``CFLAGS`` says more (e.g.
``CFLAGS=-march=x86-64-v3``; the first-use build tunes it to the host CPU instead). Without the variable nothing is
compiled.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
build = os.environ.get("CC_ATTENTION_BUILD", "")
if build not in ("", "0", "1", "cpu"):
    raise SystemExit(f"CC_ATTENTION_BUILD={build}: expected 1 (every variant this machine can build), cpu, or 0")
if build in ("1", "cpu"):
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # else torch guesses from the nvcc on the PATH (maybe a wrapper)
    import torch
    from torch.utils import cpp_extension

    csrc = "cc_attention/csrc"
    common = [f"{csrc}/ops.cpp", f"{csrc}/cpu/cc_attention_cpu.cpp"]
    cflags = {"cxx": ["-O3", "-ffp-contract=fast", "-fopenmp"], "nvcc": ["-O3"]}
    options = dict(include_dirs=[os.path.abspath(csrc)], extra_compile_args=cflags, extra_link_args=["-fopenmp"],
                   py_limited_api=False)
    ext_modules.append(cpp_extension.CppExtension("cc_attention._kernels_cpu", common, **options))
    if build == "1" and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        ext_modules.append(cpp_extension.CUDAExtension("cc_attention._kernels_cuda",
                                                       common + [f"{csrc}/cuda/cc_attention_cuda.cu"], **options))
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
