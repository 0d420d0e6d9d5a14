"""The kernels' first-use self-check: before a process first runs a device's kernels in a dtype, they compute a tiny
criss-cross attention, forward and backward, NCHW and channels-last, and are compared with the pure-PyTorch reference
(in float64 on the same device). It takes a few milliseconds; :mod:`cc_attention.backends` runs it once per (device
type, dtype) and acts on its answer. ``CCNET_CC_SELFCHECK=0`` skips it.

It runs on real tensors even when called while ``torch.compile`` or ``torch.export`` trace the op (their dispatch
modes -- fake tensors, graph capture -- are set aside for it), outside autocast and with gradients on.
"""
import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .reference import criss_cross_attention_reference

ENV_VAR = "CCNET_CC_SELFCHECK"
SHAPE = (2, 3, 9, 11)  # (N, C', H, W): H != W, more than one 8-key vector per block row; value has C' + 2 channels
# The largest relative error (norm of the difference over the norm of the reference) that passes, per dtype.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def enabled() -> bool:
    """False when ``$CCNET_CC_SELFCHECK`` is ``0``."""
    return os.environ.get(ENV_VAR, "1") != "0"


def _kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The fused op on the registered kernels (what the self-check examines)."""
    return torch.ops.ccnet.criss_cross_attention(query, key, value)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual.detach().double() - expected.detach()).norm()
    return float(difference / expected.detach().norm().clamp(min=1e-30))


def _run(device_type: str, dtype: torch.dtype) -> Optional[str]:
    n, channels, height, width = SHAPE
    generator = torch.Generator().manual_seed(0)
    sizes = ((n, channels, height, width), (n, channels, height, width), (n, channels + 2, height, width))
    base = [torch.randn(size, generator=generator).to(device_type, dtype) for size in sizes]
    weights = torch.randn(sizes[2], generator=generator).to(device_type, dtype)
    expected_inputs = [t.double().requires_grad_() for t in base]
    expected_out = criss_cross_attention_reference(*expected_inputs)
    expected = [expected_out, *torch.autograd.grad((expected_out * weights.double()).sum(), expected_inputs)]
    for layout in (torch.contiguous_format, torch.channels_last):
        inputs = [t.contiguous(memory_format=layout).requires_grad_() for t in base]
        out = _kernels(*inputs)
        actual = [out, *torch.autograd.grad((out * weights).sum(), inputs)]
        for name, a, e in zip(("output", "grad query", "grad key", "grad value"), actual, expected):
            error = _relative_error(a, e)
            if not error <= TOLERANCES.get(dtype, 5e-2):  # NaN fails too
                layout_name = "channels-last" if layout == torch.channels_last else "NCHW"
                return (f"{name} differs from the reference by {error:.3g} (relative; at most "
                        f"{TOLERANCES.get(dtype, 5e-2):g} expected) on a {layout_name} {tuple(SHAPE)} input")
    return None


def kernel_error(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Run the self-check of the ``device_type`` kernels in ``dtype``: None when they agree with the reference,
    else what differs (one line; an exception the kernels raise is reported the same way)."""
    with _disable_current_modes(), torch.autocast(device_type, enabled=False), torch.inference_mode(False), \
            torch.enable_grad():
        try:
            return _run(device_type, dtype)
        except Exception as error:  # the kernels crash: that is the answer, not the caller's problem
            first_line = (str(error).strip().splitlines() or [""])[0]
            return f"{type(error).__name__}: {first_line}"
