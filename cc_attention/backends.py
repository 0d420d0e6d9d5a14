"""Which implementation computes the op: the compiled kernels or the pure-PyTorch reference.

Backends: ``"cpu"`` / ``"cuda"`` (the kernels for that device: ``csrc/``, see :mod:`cc_attention.library`),
``"reference"`` (pure PyTorch, ``reference.py``) and ``"auto"``: the kernels of the tensors' device. The choice comes
from the function argument, else the environment variable ``CCNET_CC_BACKEND``, else ``"auto"``.

* An explicitly requested kernel backend that cannot run (tensors on another device, kernels that did not build,
  no GPU) raises :class:`BackendUnavailableError` with the reason in one line.
* ``"auto"`` falls back to the reference, with one warning per device, when the kernels of the tensors' device did
  not build; on devices without kernels (e.g. ``meta``) it uses the reference silently.
* Before the kernels of a device first run in a dtype, they pass a self-check against the reference
  (:mod:`cc_attention.self_check`, a few milliseconds; ``CCNET_CC_SELFCHECK=0`` skips it). A failure disables them
  for that device and dtype in this process: ``"auto"`` warns once, naming the error, and uses the reference; an
  explicit ``"cpu"`` / ``"cuda"`` raises :class:`BackendUnavailableError`.

The decision is made once per (backend, environment variable, device, dtype) and cached; ``torch.compile`` takes it
as a constant (no guard, no graph break).
"""
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import library, self_check

BACKENDS = ("auto", "cuda", "cpu", "reference")
ENV_VAR = "CCNET_CC_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested kernel backend cannot run here; the message says why, in one line."""


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: the argument, else ``$CCNET_CC_BACKEND``, else ``"auto"``; validated."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} is {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_decisions: Dict[Tuple[Optional[str], Optional[str], str, Optional[torch.dtype]], bool] = {}
_warned_devices = set()
_self_check_errors: Dict[Tuple[str, torch.dtype], Optional[str]] = {}  # (device type, dtype) -> error or None


def _one_line(reason: str) -> str:
    return "; ".join(line for line in reason.splitlines() if line)


def self_check_error(device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why the (built) kernels of ``device_type`` must not run in ``dtype`` in this process: their self-check's
    error, run once per (device type, dtype); None when they passed, when ``$CCNET_CC_SELFCHECK`` is 0 or the dtype
    is not known."""
    if dtype is None or not self_check.enabled():
        return None
    if (device_type, dtype) not in _self_check_errors:
        _self_check_errors[device_type, dtype] = self_check.kernel_error(device_type, dtype)
    return _self_check_errors[device_type, dtype]


def _decide(backend: Optional[str], device_type: str, dtype: Optional[torch.dtype]) -> bool:
    name = requested_backend(backend)
    if name == "reference":
        return False
    if name == "auto":
        if device_type not in library.DEVICES:
            return False
        reason = library.load().missing.get(device_type)
        failed_check = self_check_error(device_type, dtype) if reason is None else None
        if failed_check is not None:
            reason = f"their self-check in {str(dtype).replace('torch.', '')} failed: {failed_check}"
        if reason is not None:
            warned = (device_type, dtype) if failed_check is not None else device_type  # once per device (and dtype)
            if warned not in _warned_devices:
                _warned_devices.add(warned)
                warnings.warn(f"cc_attention: no {device_type} kernels ({reason}); using the pure-PyTorch reference",
                              RuntimeWarning, stacklevel=4)
            return False
        return True
    if device_type != name:
        raise BackendUnavailableError(f"backend {name!r} needs {name} tensors, got tensors on {device_type}")
    reason = library.load().missing.get(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run: {_one_line(reason)}")
    failed_check = self_check_error(name, dtype)
    if failed_check is not None:
        raise BackendUnavailableError(f"backend {name!r} failed its self-check in "
                                      f"{str(dtype).replace('torch.', '')}: {failed_check}")
    return True


@torch.compiler.assume_constant_result
def uses_kernels(backend: Optional[str], device_type: str, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the op runs on the compiled kernels (else on the reference) for ``dtype`` tensors on ``device_type``
    with ``backend`` (None: ``$CCNET_CC_BACKEND``, else ``"auto"``). The first call for a device may build the
    kernels; the first for a (device, dtype) runs their self-check (``dtype`` None: no self-check)."""
    key = (backend, os.environ.get(ENV_VAR), device_type, dtype)
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = _decide(backend, device_type, dtype)
    return decision
