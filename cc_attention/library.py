"""The compiled op library: building it on first use, loading it, and the ops' fake (shape-only) kernels.

One library registers the ``ccnet::`` operators (``csrc/ops.cpp``) with their CPU kernels (``csrc/cpu``) and, where
a GPU is visible, their CUDA kernels (``csrc/cuda``); the dispatcher picks the kernel by the tensors' device. It is
compiled with :func:`torch.utils.cpp_extension.load` the first time a kernel is needed and cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name that records the CPU's instruction
sets (the CPU code is built with ``-march=native``: a cache shared between different CPUs must not hand one CPU's
build to another), the checkout and whether the CUDA kernels are in it.

The fake kernels say what each operator returns (shapes, dtypes, strides) without computing it: ``torch.compile``
and ``torch.export`` trace the operators with them. Inductor's on-disk cache keys compiled graphs without the fake
kernels' code: after changing one, clear the cache (``$TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``).
"""
import hashlib
import logging
import os
import platform
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
COMMON_SOURCES = ("ops.cpp", "cpu/cc_attention_cpu.cpp")
CUDA_SOURCES = ("cuda/cc_attention_cuda.cu",)
DEVICES = ("cpu", "cuda")


# The kernels' design choices that only a GPU can measure (csrc/cc_attention.h, DesignChoices): name -> (the
# environment variable read once, when the library loads; its values, the default first).
DESIGN_CHOICES = {
    "energy_dtype": ("CCNET_CC_ENERGY_DTYPE", ("float32", "input")),
    "column_gemm": ("CCNET_CC_COLUMN_GEMM", ("batched", "per_image")),
    "softmax_loads": ("CCNET_CC_SOFTMAX_LOADS", ("vector", "scalar")),
}


class _DropNoCudaRuntimeNotice(logging.Filter):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is imported by a CUDA
    build of torch on a machine without a GPU: expected here (the CPU kernels need no GPU), so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension():
    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntimeNotice())
    from torch.utils import cpp_extension

    return cpp_extension


def _cpu_flags() -> tuple:
    """(compile, link) flags for the C++ sources: -O3 with fused multiply-adds, the host's vector ISA on x86, and
    OpenMP on Linux (at::parallel_for runs serially in code compiled without it; torch itself uses libgomp)."""
    compile_flags, link_flags = ["-O3", "-ffp-contract=fast"], []
    if platform.machine().lower() in ("x86_64", "amd64"):
        compile_flags.append("-march=native")
    if platform.system() == "Linux":
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags


def _cpu_tag() -> str:
    """A short tag of the host CPU's instruction sets: a hash of the ``flags`` line of /proc/cpuinfo, else of the
    machine and processor names."""
    identity = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            identity = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), None)
    except OSError:
        pass
    if identity is None:
        identity = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(" ".join(sorted(identity.split(":", 1)[-1].split())).encode()).hexdigest()[:10]


def _checkout_tag() -> str:
    """A short hash of this checkout's ``csrc`` folder path. torch keys a cached build on the source paths and
    include paths too: two checkouts sharing one cache under one name would rebuild each other's library at every
    load."""
    return hashlib.sha1(str(_CSRC).encode()).hexdigest()[:6]


def library_name(with_cuda: bool) -> str:
    """``ccnet_cc_attention_<machine>_<ISA hash>_<checkout hash>[_cuda]``: one cached build per kind of CPU,
    checkout and variant."""
    machine = re.sub(r"\W", "_", platform.machine().lower()) or "cpu"
    return f"ccnet_cc_attention_{machine}_{_cpu_tag()}_{_checkout_tag()}" + ("_cuda" if with_cuda else "")


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


def cuda_library_include_paths(cuda_home: Optional[str]) -> List[str]:
    """Include folders with the CUDA libraries' headers (cuBLAS, cuSPARSE: ``ATen/cuda/CUDAContext.h`` includes them)
    where the toolkit at ``cuda_home`` lacks them: those of the ``nvidia`` wheels that torch installs."""
    if cuda_home is not None and (Path(cuda_home) / "include" / "cublas_v2.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(str(folder) for root in nvidia.__path__ for folder in Path(root).glob("*/include")
                  if (folder / "cublas_v2.h").exists() or (folder / "cusparse.h").exists())


def prebuilt_library(with_cuda: bool) -> Optional[Path]:
    """The library that an ahead-of-time build (``CC_ATTENTION_BUILD=1 pip install``, setup.py) put in the package:
    ``_kernels_cuda.so`` / ``_kernels_cpu.so``, or None."""
    path = Path(__file__).resolve().parent / f"_kernels_{'cuda' if with_cuda else 'cpu'}.so"
    return path if path.is_file() else None


def _announce_build(cpp_extension, name: str, with_cuda: bool) -> None:
    """One line on stderr when the library is about to be compiled (not when torch's cache holds it)."""
    try:
        cached = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private helper of torch's: if it changes, say it rather than nothing
        cached = False
    if not cached:
        print(f"cc_attention: building the {'CPU and CUDA' if with_cuda else 'CPU'} kernels (once, about "
              f"{'2 min' if with_cuda else '30 s'}) ...", file=sys.stderr, flush=True)


def build(with_cuda: bool, verbose: bool = False) -> None:
    """Load the prebuilt library (:func:`prebuilt_library`) or compile (or take from torch's cache) and load it,
    with or without the CUDA kernels; raises on failure.

    A process loads at most one variant: both define the ``ccnet`` operators.
    """
    prebuilt = prebuilt_library(with_cuda)
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        return
    cpp_extension = _cpp_extension()
    sources = list(COMMON_SOURCES)
    cuda_flags, include_paths = [], [str(_CSRC)]
    if with_cuda:
        if torch.version.cuda is None:
            raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
        _prepare_cuda_build(cpp_extension)
        sources += CUDA_SOURCES
        cuda_flags = ["-O3"]
        include_paths += cuda_library_include_paths(cpp_extension.CUDA_HOME)
    compile_flags, link_flags = _cpu_flags()
    _announce_build(cpp_extension, library_name(with_cuda), with_cuda)
    cpp_extension.load(
        name=library_name(with_cuda),
        sources=[str(_CSRC / source) for source in sources],
        extra_cflags=compile_flags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=link_flags,
        extra_include_paths=include_paths,
        is_python_module=False,
        verbose=verbose,
    )


def failure_reason(error: Exception) -> str:
    """The compiler's error lines of a failed build (or the last lines of its message), at most 8."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("FAILED")]
    return "\n".join((errors or lines)[-8:])


@dataclass
class LibraryState:
    """What :func:`load` achieved: the devices with kernels, and why the others have none."""

    devices: frozenset = frozenset()
    missing: Dict[str, str] = field(default_factory=dict)  # device type -> reason (may span lines)


_state: Optional[LibraryState] = None
_load_lock = threading.Lock()


def _wants_cuda() -> Optional[str]:
    """None when the CUDA kernels should be built here, else why not."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def load() -> LibraryState:
    """Build and load the library once per process (the CUDA variant when a GPU is visible; if that fails, the CPU
    variant); returns which devices have kernels. Later calls return the same state without locking."""
    global _state
    if _state is not None:
        return _state
    with _load_lock:
        if _state is None:
            chosen = _design_choices_from_environment()
            missing = {}
            cuda_reason = _wants_cuda()
            if cuda_reason is None:
                try:
                    build(with_cuda=True)
                    _register_fake_kernels()
                    _state = LibraryState(frozenset(DEVICES))
                    for name, value in chosen.items():
                        torch.ops.ccnet.set_design_choice(name, value)
                    return _state
                except Exception as error:  # any build problem: compiler, nvcc, toolkit mismatch, ...
                    cuda_reason = "building the CUDA kernels failed:\n" + failure_reason(error)
            missing["cuda"] = cuda_reason
            try:
                build(with_cuda=False)
                _register_fake_kernels()
                _state = LibraryState(frozenset({"cpu"}), missing)
                for name, value in chosen.items():
                    torch.ops.ccnet.set_design_choice(name, value)
            except Exception as error:
                reason = "building the kernels failed:\n" + failure_reason(error)
                _state = LibraryState(frozenset(), {device: reason for device in DEVICES})
    return _state


def _check_design_choice_name(name: str) -> None:
    if name not in DESIGN_CHOICES:
        raise ValueError(f"unknown design choice {name!r}; expected one of {', '.join(DESIGN_CHOICES)}")


def _check_design_choice(name: str, value: str, source: str) -> None:
    _check_design_choice_name(name)
    values = DESIGN_CHOICES[name][1]
    if value not in values:
        raise ValueError(f"{source} is {value!r}; expected one of {', '.join(values)}")


def _design_choices_from_environment() -> Dict[str, str]:
    """The design choices that the environment sets (validated: a bad value is a one-line ValueError)."""
    chosen = {}
    for name, (variable, _) in DESIGN_CHOICES.items():
        value = os.environ.get(variable)
        if value:
            _check_design_choice(name, value, f"environment variable {variable}")
            chosen[name] = value
    return chosen


def set_design_choice(name: str, value: str) -> None:
    """Set one of :data:`DESIGN_CHOICES` for this process (not while the op runs; loads the library first).
    Benchmarks and tests use it to compare both sides in one process; users set the environment variables."""
    _check_design_choice(name, value, f"design choice {name}")
    if load().devices:
        torch.ops.ccnet.set_design_choice(name, value)


def design_choice(name: str) -> str:
    """The current value of one of :data:`DESIGN_CHOICES` (loads the library first; without kernels, the
    default)."""
    _check_design_choice_name(name)
    return torch.ops.ccnet.design_choice(name) if load().devices else DESIGN_CHOICES[name][1][0]


def loaded_state() -> Optional[LibraryState]:
    """The state of an earlier :func:`load`, or None if nothing was loaded yet (for tests that replace it)."""
    return _state


# ---- fake kernels ----------------------------------------------------------------------------------------------


def _empty_features(like: torch.Tensor, sizes=None) -> torch.Tensor:
    """The allocation rule of ops.cpp: channels-last when ``like``'s channel stride is 1 (and C > 1), else
    contiguous."""
    channels_last = like.stride(1) == 1 and like.shape[1] > 1
    return torch.empty(sizes if sizes is not None else like.shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


BLOCK_ALIGNMENT = 8  # csrc/ops.cpp pads the last dimension of the attention buffers to a multiple of this


def _attention_buffers(features: torch.Tensor):
    """The saved attention of the fused op: ``(N, H, W, W')`` and ``(N, W, H, H')``, W' and H' padded."""
    n, _, height, width = features.shape

    def padded(keys):
        return (keys + BLOCK_ALIGNMENT - 1) // BLOCK_ALIGNMENT * BLOCK_ALIGNMENT

    return (features.new_empty(n, height, width, padded(width)), features.new_empty(n, width, height, padded(height)))


def _register_fake_kernels() -> None:
    register = torch.library.register_fake

    @register("ccnet::criss_cross_attention")
    def _(query, key, value):
        return _empty_features(value)

    @register("ccnet::criss_cross_attention_forward")
    def _(query, key, value):
        return (_empty_features(value), *_attention_buffers(value))

    @register("ccnet::criss_cross_attention_backward")
    def _(grad_out, query, key, value, attention_rows, attention_columns):
        return _empty_features(query), _empty_features(key), _empty_features(value)

    @register("ccnet::ca_weight")
    def _(query, key):
        n, _, height, width = query.shape
        return query.new_empty(n, height + width - 1, height, width)

    @register("ccnet::ca_weight_backward")
    def _(grad_energy, query, key):
        return _empty_features(query), _empty_features(key)

    @register("ccnet::ca_map")
    def _(attention, value):
        return _empty_features(value)

    @register("ccnet::ca_map_backward")
    def _(grad_out, attention, value):
        return attention.new_empty(attention.shape), _empty_features(value)
