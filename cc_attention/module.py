"""The criss-cross attention block, with the original code's parameter names (checkpoints load into it)."""
import torch
from torch import nn

from .functions import criss_cross_attention


class CrissCrossAttention(nn.Module):
    """One criss-cross attention step: every pixel attends to the pixels on its row and column.

    ``forward(x) = gamma * ca_map(softmax(ca_weight(q, k)), v) + x`` with 1x1-conv projections ``q, k``
    (``in_dim -> in_dim // 8``) and ``v`` (``in_dim -> in_dim``); ``gamma`` starts at zero.

    Shapes: ``x`` ``(N, in_dim, H, W)`` -> ``(N, in_dim, H, W)``.
    """

    def __init__(self, in_dim: int, backend=None):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x), self.backend)
        return self.gamma * out + x
