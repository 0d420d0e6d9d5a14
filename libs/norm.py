"""Activated batch normalization, one factory for every kind.

The original CCNet normalizes with ``InPlaceABNSync``: batch norm followed by an activation, computed in place.
The backbone uses it with ``activation="identity"`` (a separate ReLU follows), the heads with its default
``LeakyReLU(0.01)``. :func:`make_norm` returns a constructor ``norm(num_features, activation="identity")`` for:

* ``"inplace_abn"`` / ``"inplace_abn_sync"``: ``inplace_abn.InPlaceABN`` / ``InPlaceABNSync`` (optional package);
* ``"bn"``: :class:`BatchNormAct`, an ``nn.BatchNorm2d`` followed by the same activation;
* ``"syncbn"``: :class:`SyncBatchNormAct`, an ``nn.SyncBatchNorm`` followed by the same activation (multi-GPU
  without the optional package);
* ``"auto"``: the BatchNorm kinds (``"bn"``, or ``"syncbn"`` when ``torch.distributed`` is initialized with more
  than one process). InPlaceABN only on request: it saves activation memory, but it rejects bfloat16 and its kernels
  are not checked in channels_last, so with it a GPU trains in NCHW (``engine.train_step.use_channels_last``), the
  slow path of cuDNN's tensor-core convolutions and of the attention kernels. Which of BN + channels_last and
  InPlaceABN in NCHW trains faster is measured by ``benchmarks/gpu_check.sh`` (docs/benchmarks.md); until a GPU
  has measured it, auto is BatchNorm.

All kinds have the same parameters and state-dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and compute the same function, so a checkpoint trained with one loads into any other.
Like InPlaceABN (the original's and today's), the affine scale is ``|weight| + eps``, not ``weight``: training can
make weights negative, and a plain ``nn.BatchNorm2d`` would read such a checkpoint wrong.
"""
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _sync_batch_norm

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


def _process_group_size(group=None) -> int:
    """Processes in ``group`` (default: all) of ``torch.distributed``; 1 when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"norm activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(x, LEAKY_RELU_SLOPE, inplace=True)
    return x


def _scale(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """InPlaceABN's (and the original's) affine scale ``|weight| + eps``: never zero, so the op is invertible."""
    return norm.weight.abs() + norm.eps


def _local_batch_norm(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm with statistics of this process only (training) or the running ones (eval)."""
    if norm.training:
        norm.num_batches_tracked.add_(1)
    return F.batch_norm(
        x, norm.running_mean, norm.running_var, _scale(norm), norm.bias, norm.training, norm.momentum, norm.eps
    )


class _Activated:
    """Mixin for the BatchNorm stand-ins: the ``activation`` argument (``"identity"`` or ``"leaky_relu"``)."""

    def __init__(self, num_features: int, activation: str = "identity"):
        _check_activation(activation)
        super().__init__(num_features)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class BatchNormAct(_Activated, nn.BatchNorm2d):
    """Batch norm with InPlaceABN's scale ``|weight| + eps``, then an activation (``"identity"`` or
    ``"leaky_relu"`` with slope 0.01): the stand-in for ``InPlaceABN``, same parameters, buffers and outputs.

    It keeps the normalized tensor for the activation's backward pass (InPlaceABN recomputes it from its output),
    so it needs more activation memory.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return _activate(_local_batch_norm(self, x), self.activation)


class SyncBatchNormAct(_Activated, nn.SyncBatchNorm):
    """:class:`BatchNormAct` with the batch statistics of all processes (training under ``torch.distributed``,
    CUDA tensors); in eval mode or in a single process it computes exactly what :class:`BatchNormAct` does.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_size = _process_group_size(self.process_group) if self.training else 1
        if world_size == 1:
            return _activate(_local_batch_norm(self, x), self.activation)
        if x.device.type != "cuda":
            raise ValueError(f"norm='syncbn' synchronizes CUDA tensors only, got a {x.device.type} input; "
                             "use norm='bn' for several CPU processes")
        group = self.process_group or dist.group.WORLD
        self.num_batches_tracked.add_(1)
        # The autograd function nn.SyncBatchNorm itself runs (it also updates the running statistics).
        x = _sync_batch_norm.apply(
            x, _scale(self), self.bias, self.running_mean, self.running_var, self.eps, self.momentum, group, world_size
        )
        return _activate(x, self.activation)


def resolve_norm_kind(kind: str) -> str:
    """The concrete kind ``"auto"`` stands for now (the others are returned unchanged, after validation)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "syncbn" if _process_group_size() > 1 else "bn"


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
