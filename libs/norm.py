"""Activated batch normalization, one factory for every kind.

The original CCNet normalizes with ``InPlaceABNSync``: batch norm followed by an activation, computed in place.
The backbone uses it with ``activation="identity"`` (a separate ReLU follows), the heads with its default
``LeakyReLU(0.01)``. :func:`make_norm` returns a constructor ``norm(num_features, activation="identity")`` for:

* ``"inplace_abn"`` / ``"inplace_abn_sync"``: ``inplace_abn.InPlaceABN`` / ``InPlaceABNSync`` (optional package);
* ``"bn"``: :class:`BatchNormAct`, ``nn.BatchNorm2d`` followed by the same activation;
* ``"syncbn"``: :class:`SyncBatchNormAct`, ``nn.SyncBatchNorm`` followed by the same activation (multi-GPU
  without the optional package);
* ``"auto"``: the in-place kinds when ``inplace_abn`` imports, the BatchNorm kinds otherwise; the synchronized
  variant when ``torch.distributed`` is initialized with more than one process.

All kinds have the same parameters and state-dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and compute the same function in eval mode, so a checkpoint trained with one loads into
any other.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORM_KINDS = ("auto", "bn", "syncbn", "inplace_abn", "inplace_abn_sync")
ACTIVATIONS = ("identity", "leaky_relu")
LEAKY_RELU_SLOPE = 0.01  # InPlaceABN's default, used by the original heads

NormFactory = Callable[..., nn.Module]


def inplace_abn_available() -> bool:
    """Whether the optional ``inplace_abn`` package (compiled extension included) imports."""
    try:
        import inplace_abn  # noqa: F401
    except ImportError:
        return False
    return True


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"norm activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(x, LEAKY_RELU_SLOPE, inplace=True)
    return x


class BatchNormAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an activation (``"identity"`` or ``"leaky_relu"`` with slope 0.01).

    The BatchNorm stand-in for ``InPlaceABN``: same parameters, buffers and eval-mode output. It keeps the
    normalized tensor for the activation's backward pass, so it needs more activation memory than InPlaceABN.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, num_features: int, activation: str = "identity", **kwargs):
        _check_activation(activation)
        super().__init__(num_features, **kwargs)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activate(super().forward(x), self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class SyncBatchNormAct(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` followed by an activation: :class:`BatchNormAct` with statistics over all processes.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, num_features: int, activation: str = "identity", **kwargs):
        _check_activation(activation)
        super().__init__(num_features, **kwargs)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activate(super().forward(x), self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def resolve_norm_kind(kind: str) -> str:
    """The concrete kind ``"auto"`` stands for now (the others are returned unchanged, after validation)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    synchronized = _distributed_world_size() > 1
    if inplace_abn_available():
        return "inplace_abn_sync" if synchronized else "inplace_abn"
    return "syncbn" if synchronized else "bn"


def make_norm(kind: str = "auto") -> NormFactory:
    """A constructor ``norm(num_features, activation="identity"|"leaky_relu") -> nn.Module`` for ``kind``.

    ``kind`` is one of :data:`NORM_KINDS`; ``"auto"`` is resolved here, at model construction time (so build the
    model after ``torch.distributed`` is initialized to get the synchronized variant).
    """
    kind = resolve_norm_kind(kind)
    if kind == "bn":
        return BatchNormAct
    if kind == "syncbn":
        return SyncBatchNormAct
    if not inplace_abn_available():
        raise ImportError(
            f"norm={kind!r} needs the optional inplace_abn package (`make inplace-abn`); use norm='bn' or 'auto'"
        )
    import inplace_abn

    module = inplace_abn.InPlaceABN if kind == "inplace_abn" else inplace_abn.InPlaceABNSync

    def inplace_norm(num_features: int, activation: str = "identity") -> nn.Module:
        _check_activation(activation)
        return module(num_features, activation=activation, activation_param=LEAKY_RELU_SLOPE)

    return inplace_norm
