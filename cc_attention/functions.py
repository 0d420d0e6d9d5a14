"""The op's public functions: input checks, autocast handling, backend dispatch, autograd wrappers.

``backend`` is ``"auto"`` (default), ``"cuda"``, ``"cpu"`` or ``"reference"``; see :mod:`cc_attention.backends`.
"""
import torch
from torch.autograd.function import once_differentiable

from . import backends
from .reference import ca_map_reference, ca_weight_reference


def _describe(**tensors) -> str:
    return ", ".join(f"{name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     for name, t in tensors.items())


def _check_common(**tensors) -> None:
    """Every tensor is a 4-D floating-point tensor; all share device and dtype. ValueError otherwise."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, C, H, W); got {_describe(**tensors)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {_describe(**tensors)}")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"tensors on different devices: {_describe(**tensors)}")
    if len({t.dtype for t in tensors.values()}) > 1:
        raise ValueError(f"tensors of different dtypes: {_describe(**tensors)}")


def _check_weight_inputs(query, key) -> None:
    _check_common(query=query, key=key)
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape (N, C', H, W); got {_describe(query=query, key=key)}")


def _check_map_inputs(attention, value) -> None:
    _check_common(attention=attention, value=value)
    n, _, height, width = value.shape
    if attention.shape != (n, height + width - 1, height, width):
        raise ValueError(
            f"attention must be (N, H+W-1, H, W) = {(n, height + width - 1, height, width)} for value (N, C, H, W); "
            f"got {_describe(attention=attention, value=value)}"
        )


def _check_kernel_layout(backend: str, **tensors) -> None:
    """The kernels take tensors contiguous in (C, H, W) (any batch stride)."""
    for name, t in tensors.items():
        if t.shape[0] > 0 and not t[0].is_contiguous():
            raise ValueError(
                f"the {backend} kernel needs {name} contiguous in (C, H, W); got {name} {tuple(t.shape)} with strides "
                f"{t.stride()} (call .contiguous())"
            )


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device, cast them all to the autocast dtype (the kernels accumulate in
    fp32); otherwise return them unchanged."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
    return tensors


class _KernelOp(torch.autograd.Function):
    """One of the two ops on a kernel module: ``op`` is ``"ca_weight"`` or ``"ca_map"``, calling
    ``<op>_forward(first, second)`` and ``<op>_backward(grad, first, second) -> (grad_first, grad_second)``."""

    @staticmethod
    def forward(ctx, kernel_module, op: str, first, second):
        ctx.backward_kernel = getattr(kernel_module, f"{op}_backward")
        ctx.save_for_backward(first, second)
        return getattr(kernel_module, f"{op}_forward")(first, second)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        first, second = ctx.saved_tensors
        grad_first, grad_second = ctx.backward_kernel(grad_output.to(first.dtype).contiguous(), first, second)
        return None, None, grad_first, grad_second


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _softmax_(energy: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, in place for fp32/fp64 (the energies are not kept: saves one attention-sized buffer).
    fp16/bf16 energies (autocast) are normalized in float32 and the attention cast back to their dtype."""
    if energy.dtype in _HALF_DTYPES:
        return _softmax_(energy.float()).to(energy.dtype)
    energy.sub_(energy.amax(dim=1, keepdim=True)).exp_()
    return energy.div_(energy.sum(dim=1, keepdim=True))


def _softmax_backward_(grad_attention: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``attention * (grad_attention - sum_k attention * grad_attention)``: in place into ``grad_attention`` for
    fp32/fp64; in float32 (cast back) for fp16/bf16, like the forward."""
    if grad_attention.dtype in _HALF_DTYPES:
        return _softmax_backward_(grad_attention.float(), attention.float()).to(grad_attention.dtype)
    return grad_attention.sub_((grad_attention * attention).sum(dim=1, keepdim=True)).mul_(attention)


class _CrissCrossAttention(torch.autograd.Function):
    """ca_map(softmax(ca_weight(query, key)), value) on a kernel module, fused: the softmax and its backward run in
    place and only the attention (not the energies) is kept for the backward."""

    @staticmethod
    def forward(ctx, kernel_module, query, key, value):
        attention = _softmax_(kernel_module.ca_weight_forward(query, key))
        ctx.kernel_module = kernel_module
        ctx.save_for_backward(query, key, value, attention)
        return kernel_module.ca_map_forward(attention, value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, attention = ctx.saved_tensors
        grad_attention, grad_value = ctx.kernel_module.ca_map_backward(
            grad_out.to(value.dtype).contiguous(), attention, value
        )
        grad_energy = _softmax_backward_(grad_attention, attention)
        grad_query, grad_key = ctx.kernel_module.ca_weight_backward(grad_energy, query, key)
        return None, grad_query, grad_key, grad_value


def ca_weight(query: torch.Tensor, key: torch.Tensor, backend=None) -> torch.Tensor:
    """Criss-cross energies: ``(N, C', H, W) x (N, C', H, W) -> (N, H+W-1, H, W)``.

    For the pixel ``(y, x)``, channels ``[0, W)`` hold ``<query[:, y, x], key[:, y, x']>`` for ``x' = 0..W-1`` and
    channels ``[W, W+H-1)`` hold ``<query[:, y, x], key[:, y', x]>`` for ``y' != y`` in increasing order.
    """
    query, key = _autocast(query, key)
    _check_weight_inputs(query, key)
    name, kernel_module = backends.select(backend, query)
    if kernel_module is None:
        return ca_weight_reference(query, key)
    _check_kernel_layout(name, query=query, key=key)
    return _KernelOp.apply(kernel_module, "ca_weight", query, key)


def ca_map(attention: torch.Tensor, value: torch.Tensor, backend=None) -> torch.Tensor:
    """Aggregation along rows and columns: ``(N, H+W-1, H, W) x (N, C, H, W) -> (N, C, H, W)``.

    ``out[:, c, y, x] = sum_k attention[:, k, y, x] * value[:, c, key_k(y, x)]`` in the layout of :func:`ca_weight`.
    """
    attention, value = _autocast(attention, value)
    _check_map_inputs(attention, value)
    name, kernel_module = backends.select(backend, value)
    if kernel_module is None:
        return ca_map_reference(attention, value)
    _check_kernel_layout(name, attention=attention, value=value)
    return _KernelOp.apply(kernel_module, "ca_map", attention, value)


def criss_cross_attention(query, key, value, backend=None) -> torch.Tensor:
    """``ca_map(softmax(ca_weight(query, key), dim=1), value)``: ``(N, C', H, W)``, ``(N, C', H, W)``,
    ``(N, C, H, W)`` -> ``(N, C, H, W)``. On a kernel backend the three steps run as one autograd node."""
    query, key, value = _autocast(query, key, value)
    _check_weight_inputs(query, key)
    _check_common(query=query, value=value)
    if query.shape[0] != value.shape[0] or query.shape[2:] != value.shape[2:]:
        raise ValueError(f"query and value must agree in N, H and W; got {_describe(query=query, value=value)}")
    name, kernel_module = backends.select(backend, value)
    if kernel_module is None:
        return ca_map_reference(torch.softmax(ca_weight_reference(query, key), dim=1), value)
    _check_kernel_layout(name, query=query, key=key, value=value)
    return _CrissCrossAttention.apply(kernel_module, query, key, value)
