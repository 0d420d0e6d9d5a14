"""The criss-cross attention block, with the original code's parameter names (checkpoints load into it)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functions import criss_cross_attention


class CrissCrossAttention(nn.Module):
    """One criss-cross attention step: every pixel attends to the pixels on its row and column.

    ``forward(x) = gamma * ca_map(softmax(ca_weight(q, k)), v) + x`` with 1x1-conv projections ``q, k``
    (``in_dim -> query_channels``, by default ``in_dim // 8``) and ``v`` (``in_dim -> in_dim``); ``gamma`` starts at
    zero. ``gamma`` takes the attention's dtype: under autocast the block's output stays in the autocast dtype.

    The three projections run as one convolution with the concatenated weights (one large matrix product); the
    parameters stay the three ``nn.Conv2d`` of the original. ``q, k, v`` are channel slices of its output, in the
    memory format of ``x``: a channels-last model stays channels-last through the attention.

    Args:
        in_dim: channels of the input.
        backend: ``None`` (``$CCNET_CC_BACKEND``, else ``"auto"``), ``"auto"``, ``"cuda"``, ``"cpu"`` or
            ``"reference"``; see :mod:`cc_attention.backends`.
        query_channels: channels of the query and the key, >= 1; by default ``in_dim // 8`` (the original's), which
            needs ``in_dim >= 8``.

    Shapes: ``x`` ``(N, in_dim, H, W)`` -> ``(N, in_dim, H, W)``.
    """

    def __init__(self, in_dim: int, backend=None, query_channels: Optional[int] = None):
        super().__init__()
        if query_channels is None and in_dim < 8:
            raise ValueError(f"CrissCrossAttention({in_dim}): in_dim must be >= 8 for the default query_channels = "
                             f"in_dim // 8, or pass query_channels >= 1")
        query_channels = in_dim // 8 if query_channels is None else query_channels
        if query_channels < 1:
            raise ValueError(f"CrissCrossAttention({in_dim}): query_channels must be >= 1, got {query_channels}")
        self.query_conv = nn.Conv2d(in_dim, query_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, query_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend

    def project(self, x: torch.Tensor):
        """Query, key and value of ``x`` ``(N, C, H, W)``: ``(N, C', H, W)`` twice (C' = query_channels) and
        ``(N, C, H, W)``, channel slices of one ``(N, 2 * C' + C, H, W)`` convolution output."""
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = torch.cat([conv.weight for conv in convs])  # (2 * C//8 + C, C, 1, 1)
        bias = torch.cat([conv.bias for conv in convs])
        qkv = F.conv2d(x, weight, bias)
        return torch.split(qkv, [conv.out_channels for conv in convs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.value_conv.in_channels:
            raise ValueError(
                f"CrissCrossAttention({self.value_conv.in_channels}) expects x of shape (N, "
                f"{self.value_conv.in_channels}, H, W); got {tuple(x.shape)}"
            )
        query, key, value = self.project(x)
        attended = criss_cross_attention(query, key, value, self.backend)
        return self.gamma.to(attended.dtype) * attended + x
