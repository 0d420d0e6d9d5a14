"""Backend selection and on-demand building of the C++ / CUDA kernels.

Backends: ``"cuda"`` (kernels in ``csrc/cuda``), ``"cpu"`` (kernel in ``csrc/cpu``), ``"reference"`` (pure PyTorch,
``reference.py``) and ``"auto"``: the kernel for the tensors' device when it supports their dtype, else the
reference (on both devices the kernels are the faster choice, see ``python -m cc_attention.benchmark``).
The choice comes from the function argument, else the environment variable ``CCNET_CC_BACKEND``, else ``"auto"``.

The kernels are compiled with :func:`torch.utils.cpp_extension.load` the first time they are needed (cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; the CPU kernel, built for the host's vector
ISA, under a name that includes a hash of the CPU's instruction-set flags). A build that fails warns once, with the
compiler's error lines, and the reference is used from then on.
"""
import hashlib
import os
import platform
import re
import threading
import warnings
from pathlib import Path

import torch

BACKENDS = ("auto", "cuda", "cpu", "reference")
ENV_VAR = "CCNET_CC_BACKEND"
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

_CSRC = Path(__file__).resolve().parent / "csrc"
_built = {}  # kernel kind ("cpu" / "cuda") -> extension module, or None after a failed build
_build_lock = threading.Lock()


def _cpu_flags() -> tuple:
    """(compile, link) flags for the CPU kernel: -O3 with fused multiply-adds, the host's vector ISA on x86, and
    OpenMP on Linux (at::parallel_for runs serially in code compiled without it; torch itself uses libgomp)."""
    compile_flags, link_flags = ["-O3", "-ffp-contract=fast"], []
    if platform.machine().lower() in ("x86_64", "amd64"):
        compile_flags.append("-march=native")
    if platform.system() == "Linux":
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags


def _cpu_tag() -> str:
    """A short tag of the host CPU's instruction sets for the CPU kernel's cache name: the kernel is compiled with
    ``-march=native``, so a cache shared by different CPUs (a home folder on a cluster) must not hand one CPU's
    build to another (SIGILL). A hash of the ``flags`` line of /proc/cpuinfo, else of the machine and processor."""
    identity = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            identity = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), None)
    except OSError:
        pass
    if identity is None:
        identity = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(" ".join(sorted(identity.split(":", 1)[-1].split())).encode()).hexdigest()[:10]


def cpu_extension_name() -> str:
    """``ccnet_cc_attention_cpu_<machine>_<ISA hash>``: one cached build per kind of CPU."""
    machine = re.sub(r"\W", "_", platform.machine().lower()) or "cpu"
    return f"ccnet_cc_attention_cpu_{machine}_{_cpu_tag()}"


def _prepare_cuda_build(cpp_extension) -> None:
    """Settings a CUDA build needs beyond torch's defaults.

    * CUDA_HOME: ``$CUDA_HOME`` / ``$CUDA_PATH``, else ``/usr/local/cuda`` when it exists. torch guesses it once, at
      import, from the ``nvcc`` on the PATH, which is wrong when that ``nvcc`` is a wrapper script outside the
      toolkit (then ``-lcudart`` is not found).
    * TORCH_CUDA_ARCH_LIST: ``9.0`` when no GPU is visible (CI compiles the sources without a GPU; torch otherwise
      fails looking for the GPU's architecture).
    """
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home is None and Path("/usr/local/cuda/bin/nvcc").exists():
        cuda_home = "/usr/local/cuda"
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def build_extension(kind: str, verbose: bool = False):
    """Compile (or load from the cache) the ``kind`` kernels, ``"cpu"`` or ``"cuda"``; raises on failure."""
    from torch.utils import cpp_extension

    if kind == "cpu":
        compile_flags, link_flags = _cpu_flags()
        return cpp_extension.load(
            name=cpu_extension_name(),
            sources=[str(_CSRC / "cpu" / "cc_attention_cpu.cpp")],
            extra_cflags=compile_flags,
            extra_ldflags=link_flags,
            verbose=verbose,
        )
    if kind == "cuda":
        if torch.version.cuda is None:
            raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
        _prepare_cuda_build(cpp_extension)
        return cpp_extension.load(
            name="ccnet_cc_attention_cuda",
            sources=[str(_CSRC / "cuda" / "cc_attention_cuda.cu")],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            verbose=verbose,
        )
    raise ValueError(f"unknown kernel kind {kind!r}; expected 'cpu' or 'cuda'")


def _failure_reason(error: Exception) -> str:
    """The compiler's error lines from a failed build (or the last lines of its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("FAILED")]
    return "\n".join((errors or lines)[-8:])


def kernels(kind: str):
    """The built ``kind`` extension module, or None when it cannot be built (warned about once)."""
    with _build_lock:
        if kind not in _built:
            try:
                _built[kind] = build_extension(kind)
            except Exception as error:  # any build problem: compiler missing, compile error, no CUDA, ...
                warnings.warn(
                    f"cc_attention: building the {kind} kernels failed; using the pure-PyTorch reference instead. "
                    f"Reason:\n{_failure_reason(error)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _built[kind] = None
        return _built[kind]


def requested_backend(backend=None) -> str:
    """The backend asked for: the argument, else ``$CCNET_CC_BACKEND``, else ``"auto"``; validated."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} is {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def select(backend, tensor: torch.Tensor):
    """Resolve ``backend`` for ``tensor``'s device and dtype: returns (name, kernel module or None).

    ``name`` is ``"cuda"``, ``"cpu"`` or ``"reference"``; a kernel that failed to build gives ``"reference"``.
    An explicit kernel backend that cannot take the tensor (device, dtype) raises ValueError.
    """
    name = requested_backend(backend)
    device, dtype = tensor.device.type, tensor.dtype
    if name == "reference":
        return name, None
    if name == "auto":
        if device not in KERNEL_DTYPES or dtype not in KERNEL_DTYPES[device]:
            return "reference", None
        name = device
    elif device != name:
        raise ValueError(f"backend {name!r} needs {name} tensors, got tensors on {tensor.device}")
    elif dtype not in KERNEL_DTYPES[name]:
        supported = ", ".join(str(t).replace("torch.", "") for t in KERNEL_DTYPES[name])
        raise ValueError(f"backend {name!r} supports {supported}; got {str(dtype).replace('torch.', '')}")
    module = kernels(name)
    return (name, module) if module is not None else ("reference", None)
