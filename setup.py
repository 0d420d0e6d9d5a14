"""The optional ahead-of-time build of the op's kernels (pyproject.toml holds everything else).

``CC_ATTENTION_BUILD=1 pip install --no-build-isolation .`` compiles ``cc_attention/_kernels_cpu`` (and
``_kernels_cuda``, the CUDA variant, when this torch has CUDA and nvcc is found; ``CC_ATTENTION_BUILD=cpu``: the CPU
variant only) against the installed torch, for machines that run the op without a compiler (a cluster's compute
nodes); ``cc_attention.library`` loads them instead of compiling on first use. The CPU code is built for the
compiler's default target unless ``CFLAGS`` says more (e.g. ``CFLAGS=-march=x86-64-v3``; the first-use build tunes
it to the host CPU instead). Without the variable nothing is compiled.
"""
import os
import sys

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

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cc_attention.library import COMMON_SOURCES, CUDA_SOURCES, cuda_library_include_paths

    csrc = "cc_attention/csrc"
    sources = [f"{csrc}/{source}" for source in COMMON_SOURCES]
    options = dict(include_dirs=[os.path.abspath(csrc)], py_limited_api=False, extra_link_args=["-fopenmp"],
                   extra_compile_args={"cxx": ["-O3", "-ffp-contract=fast", "-fopenmp"], "nvcc": ["-O3"]})
    ext_modules.append(cpp_extension.CppExtension("cc_attention._kernels_cpu", sources, **options))
    if build == "1" and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        options["include_dirs"] += cuda_library_include_paths(cpp_extension.CUDA_HOME)
        ext_modules.append(cpp_extension.CUDAExtension(
            "cc_attention._kernels_cuda", sources + [f"{csrc}/{source}" for source in CUDA_SOURCES], **options))
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
