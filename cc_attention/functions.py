"""The op's public functions: input checks, autocast, and the choice between the kernels and the reference.

On the kernels each function is ONE registered operator (``torch.ops.ccnet.*``, see ``csrc/ops.cpp``) with its own
autograd node, fake kernel and CPU / CUDA kernels: ``torch.compile`` keeps it in the graph and ``torch.export``
exports it. ``backend`` is ``None`` (``$CCNET_CC_BACKEND``, else ``"auto"``), ``"auto"``, ``"cuda"``, ``"cpu"`` or
``"reference"``; see :mod:`cc_attention.backends`.

Tensors are ``(N, C, H, W)`` in any memory format: outputs shaped like a feature tensor take its format
(channels-last in, channels-last out). The attention layout ``(N, H+W-1, H, W)``: for the pixel ``(y, x)``,
channels ``[0, W)`` hold its row keys ``x' = 0..W-1`` and channels ``[W, W+H-1)`` its column keys ``y' != y`` in
increasing order.
"""
import torch

from . import backends
from .reference import ca_map_reference, ca_weight_reference, criss_cross_attention_reference


def _describe(**tensors) -> str:
    return ", ".join(f"{name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     for name, t in tensors.items())


def _check_common(**tensors) -> None:
    """Every tensor is a 4-D floating-point tensor with H, W >= 1; all share device and dtype. ValueError
    otherwise."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, C, H, W); got {_describe(**tensors)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {_describe(**tensors)}")
        if t.shape[2] < 1 or t.shape[3] < 1:
            raise ValueError(f"{name} must have H >= 1 and W >= 1; got {_describe(**tensors)}")
    first = next(iter(tensors.values()))
    if any(t.device != first.device for t in tensors.values()):
        raise ValueError(f"tensors on different devices: {_describe(**tensors)}")
    if any(t.dtype != first.dtype for t in tensors.values()):
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


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device, cast them all to the autocast dtype (the kernels accumulate in
    float32); otherwise return them unchanged."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors
    device_type = tensors[0].device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def ca_weight(query: torch.Tensor, key: torch.Tensor, backend=None) -> torch.Tensor:
    """Criss-cross energies: ``(N, C', H, W) x (N, C', H, W) -> (N, H+W-1, H, W)`` (contiguous).

    For the pixel ``(y, x)``, channels ``[0, W)`` hold ``<query[:, y, x], key[:, y, x']>`` for ``x' = 0..W-1`` and
    channels ``[W, W+H-1)`` hold ``<query[:, y, x], key[:, y', x]>`` for ``y' != y`` in increasing order. The energies
    have the inputs' dtype: in float16 an energy beyond 65504 is inf (:func:`criss_cross_attention` keeps them in
    float32).
    """
    query, key = _autocast(query, key)
    _check_weight_inputs(query, key)
    if backends.uses_kernels(backend, query.device.type, query.dtype):
        return torch.ops.ccnet.ca_weight(query, key)
    return ca_weight_reference(query, key)


def ca_map(attention: torch.Tensor, value: torch.Tensor, backend=None) -> torch.Tensor:
    """Aggregation along rows and columns: ``(N, H+W-1, H, W) x (N, C, H, W) -> (N, C, H, W)``.

    ``out[:, c, y, x] = sum_k attention[:, k, y, x] * value[:, c, key_k(y, x)]`` in the layout of :func:`ca_weight`.
    """
    attention, value = _autocast(attention, value)
    _check_map_inputs(attention, value)
    if backends.uses_kernels(backend, value.device.type, value.dtype):
        return torch.ops.ccnet.ca_map(attention, value)
    return ca_map_reference(attention, value)


def criss_cross_attention(query, key, value, backend=None) -> torch.Tensor:
    """``ca_map(softmax(ca_weight(query, key), dim=1), value)``: ``(N, C', H, W)``, ``(N, C', H, W)``,
    ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    On the kernels it is one fused operator: the attention never takes the public layout, and only the attention is
    kept for the backward pass. For 16-bit inputs the energies and the softmax are float32 on every backend (an
    energy |q.k| > 65504 stays finite); the attention and the output have the inputs' dtype.
    """
    query, key, value = _autocast(query, key, value)
    _check_weight_inputs(query, key)
    _check_common(query=query, value=value)
    if query.shape[0] != value.shape[0] or query.shape[2:] != value.shape[2:]:
        raise ValueError(f"query and value must agree in N, H and W; got {_describe(query=query, value=value)}")
    if backends.uses_kernels(backend, value.device.type, value.dtype):
        return torch.ops.ccnet.criss_cross_attention(query, key, value)
    return criss_cross_attention_reference(query, key, value)
