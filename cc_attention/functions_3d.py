"""The 3-D (video) criss-cross attention: input checks, the backend choice and its registered ``ccnet::`` operators.

Every position ``(t, y, x)`` of an ``(N, C, T, H, W)`` clip attends to its row (``W`` keys, itself included), its
column (``H - 1`` keys) and its time line (``T - 1`` keys): ``T + H + W - 2`` keys, one softmax. The attention is
kept in three blocks (rows ``(N, T, H, W, W)``, columns ``(N, T, W, H, H)``, time ``(N, H, W, T, T)``:
:mod:`cc_attention.axes`).

Backends (``backend=``, else ``$CCNET_CC_BACKEND``, else ``"auto"``):

* ``"auto"``: the registered operator ``ccnet::criss_cross_attention_3d`` (registered here in Python with
  ``torch.library.custom_op``: a fake kernel for ``torch.compile`` / ``torch.export``, and an analytic backward,
  ``ccnet::criss_cross_attention_3d_backward``, that reads the saved attention blocks as the kernels will). Its
  implementation is the pure-PyTorch block computation of :mod:`cc_attention.axes` on any device.
* ``"reference"``: the same computation differentiated by autograd, plain PyTorch operators only (no custom op).
* ``"cpu"`` / ``"cuda"``: the compiled 3-D kernels, which are not built yet: a one-line ``ValueError``.
"""
from typing import Tuple

import torch

from . import backends
from .axes import (aggregate, attention_blocks, criss_cross_attention_backward_over_axes,
                   criss_cross_attention_over_axes)
from .functions import _autocast, _describe

AXES = (-1, -2, -3)  # rows first (they keep the position as a key), then columns, then time


def _check_features(**tensors) -> None:
    """Every tensor is a 5-D floating-point ``(N, C, T, H, W)`` tensor with T, H, W >= 1; all share device and dtype;
    N, T, H and W agree. ValueError (one line) otherwise."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must be 5-D (N, C, T, H, W); got {_describe(**tensors)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {_describe(**tensors)}")
        if min(t.shape[2:]) < 1:
            raise ValueError(f"{name} must have T, H, W >= 1; got {_describe(**tensors)}")
    query, key, value = tensors.values()
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape (N, C', T, H, W); got {_describe(**tensors)}")
    if query.shape[0] != value.shape[0] or query.shape[2:] != value.shape[2:]:
        raise ValueError(f"query and value must agree in N, T, H and W; got {_describe(**tensors)}")
    if any(t.device != query.device for t in tensors.values()):
        raise ValueError(f"tensors on different devices: {_describe(**tensors)}")
    if any(t.dtype != query.dtype for t in tensors.values()):
        raise ValueError(f"tensors of different dtypes: {_describe(**tensors)}")


def _like_features(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` in the memory format of ``like``: channels-last-3d (NDHWC) when its channel stride is 1, else
    contiguous."""
    channels_last = like.stride(1) == 1 and like.shape[1] > 1
    return out.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def _empty_blocks(value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, _, time, height, width = value.shape
    return (value.new_empty(n, time, height, width, width), value.new_empty(n, time, width, height, height),
            value.new_empty(n, height, width, time, time))


@torch.library.custom_op("ccnet::criss_cross_attention_3d", mutates_args=())
def _criss_cross_attention_3d_op(query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (N, C, T, H, W), rows, columns, time)``: the output and the attention blocks it saves."""
    blocks = attention_blocks(query, key, AXES)
    return (_like_features(aggregate(blocks, value, AXES), value), *blocks)


@_criss_cross_attention_3d_op.register_fake
def _(query, key, value):
    return (_like_features(torch.empty_like(value, memory_format=torch.contiguous_format), value),
            *_empty_blocks(value))


@torch.library.custom_op("ccnet::criss_cross_attention_3d_backward", mutates_args=())
def _criss_cross_attention_3d_backward_op(
        grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
        columns: torch.Tensor, time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of query, key and value from the saved attention blocks."""
    grads = criss_cross_attention_backward_over_axes(grad_out, query, key, value, (rows, columns, time), AXES)
    return tuple(_like_features(grad, like) for grad, like in zip(grads, (query, key, value)))


@_criss_cross_attention_3d_backward_op.register_fake
def _(grad_out, query, key, value, rows, columns, time):
    return tuple(_like_features(torch.empty_like(t, memory_format=torch.contiguous_format), t)
                 for t in (query, key, value))


def _setup_context(ctx, inputs, output):
    query, key, value = inputs
    _, rows, columns, time = output
    ctx.save_for_backward(query, key, value, rows, columns, time)


def _backward(ctx, grad_out, grad_rows, grad_columns, grad_time):
    """The attention blocks are saved for the backward, not differentiated: their gradients are ignored."""
    return torch.ops.ccnet.criss_cross_attention_3d_backward(grad_out.contiguous(), *ctx.saved_tensors)


_criss_cross_attention_3d_op.register_autograd(_backward, setup_context=_setup_context)


def _uses_registered_op(backend) -> bool:
    """True for ``"auto"``, False for ``"reference"``; ValueError for the kernel backends, not built yet."""
    name = backends.requested_backend(backend)
    if name in ("cpu", "cuda"):
        source = "backend argument" if backend is not None else f"environment variable {backends.ENV_VAR}"
        raise ValueError(f"{source} is {name!r}, but the 3-D criss-cross attention has no compiled kernels yet: use "
                         "'auto' or 'reference'")
    return name == "auto"


def criss_cross_attention_3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             backend=None) -> torch.Tensor:
    """``(N, C', T, H, W)`` x ``(N, C', T, H, W)`` x ``(N, C, T, H, W)`` -> ``(N, C, T, H, W)``.

    ``out[:, :, t, y, x] = sum over the T + H + W - 2 keys of softmax(<query at (t, y, x), key at the key>) * value
    at the key``; the keys: the row ``(t, y, x')`` for every ``x'`` (the position itself included), the column
    ``(t, y', x)`` for ``y' != y`` and the time line ``(t', y, x)`` for ``t' != t``. Inputs in any memory format;
    the output takes the format of ``value`` (channels-last-3d in, channels-last-3d out). ``backend``: see the
    module docstring.
    """
    query, key, value = _autocast(query, key, value)
    _check_features(query=query, key=key, value=value)
    if _uses_registered_op(backend):
        return torch.ops.ccnet.criss_cross_attention_3d(query, key, value)[0]
    return _like_features(criss_cross_attention_over_axes(query, key, value, AXES), value)
