"""The 3-D (video) criss-cross attention block: the 2-D block's contract and parameter names, one more axis."""
import torch
import torch.nn.functional as F
from torch import nn

from .functions_3d import criss_cross_attention_3d

MIN_CHANNELS = 8  # query and key have in_channels // 8 channels: at least one


class CrissCrossAttention3D(nn.Module):
    """One 3-D criss-cross attention step: every position of a clip attends to its row, column and time line.

    ``forward(x) = gamma * criss_cross_attention_3d(q, k, v) + x`` with 1x1x1-conv projections ``q, k``
    (``in_channels -> in_channels // 8``) and ``v`` (``in_channels -> in_channels``); ``gamma`` starts at zero. The
    parameters have the names of :class:`cc_attention.CrissCrossAttention` (``query_conv``, ``key_conv``,
    ``value_conv``: ``nn.Conv3d``; ``gamma``); a 2-D block's 1x1 weights ``(O, I, 1, 1)`` are these with the depth
    axis removed. The three projections run as one convolution with the concatenated weights; ``q, k, v`` are
    channel slices of its output, in the memory format of ``x`` (NCDHW or channels-last-3d: a matrix product over the
    channels there, as PyTorch's CPU ``conv3d`` returns NCDHW); the output too.

    Args:
        in_channels: channels of the input, at least 8.
        backend: ``None`` (``$CCNET_CC_BACKEND``, else ``"auto"``), ``"auto"`` or ``"reference"`` (see
            :mod:`cc_attention.functions_3d`; the kernel backends are not built yet).

    Shapes: ``x`` ``(N, in_channels, T, H, W)`` -> ``(N, in_channels, T, H, W)``.
    """

    def __init__(self, in_channels: int, backend=None):
        super().__init__()
        if in_channels < MIN_CHANNELS:
            raise ValueError(f"CrissCrossAttention3D needs in_channels >= {MIN_CHANNELS} (query and key have "
                             f"in_channels // 8 channels), got {in_channels}")
        self.query_conv = nn.Conv3d(in_channels, in_channels // 8, kernel_size=1)
        self.key_conv = nn.Conv3d(in_channels, in_channels // 8, kernel_size=1)
        self.value_conv = nn.Conv3d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend

    def project(self, x: torch.Tensor):
        """Query, key and value of ``x`` ``(N, C, T, H, W)``: ``(N, C//8, T, H, W)`` twice and ``(N, C, T, H, W)``,
        channel slices of one ``(N, 2 * (C//8) + C, T, H, W)`` convolution output."""
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = torch.cat([conv.weight for conv in convs])  # (2 * C//8 + C, C, 1, 1, 1)
        bias = torch.cat([conv.bias for conv in convs])
        if x.stride(1) == 1 and x.shape[1] > 1:  # channels-last-3d: as a product over the channels, which keeps it
            qkv = F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
        else:
            qkv = F.conv3d(x, weight, bias)
        return torch.split(qkv, [conv.out_channels for conv in convs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.value_conv.in_channels:
            raise ValueError(
                f"CrissCrossAttention3D({self.value_conv.in_channels}) expects x of shape (N, "
                f"{self.value_conv.in_channels}, T, H, W); got {tuple(x.shape)}"
            )
        query, key, value = self.project(x)
        return self.gamma * criss_cross_attention_3d(query, key, value, self.backend) + x
