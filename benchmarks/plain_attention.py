"""The plain-PyTorch criss-cross attention that the op is measured against.

This is the formulation of the original code's pure-PyTorch branch (also what mmcv ships after deleting its CUDA
op): the column energies as one batched product per image column with an infinite diagonal subtracted (a pixel is
its own row key, not a column key), the row energies as one per image row, a softmax over their concatenation, and
two batched products back. Every reshape between the (N, C, H, W) features and the per-row / per-column batches is
a copy. It computes the same function as ``cc_attention.criss_cross_attention`` (a test checks it).
"""
import torch


def _per_column(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N * W, C, H)``: the features of each image column."""
    n, channels, height, width = t.shape
    return t.permute(0, 3, 1, 2).contiguous().view(n * width, channels, height)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N * H, C, W)``: the features of each image row."""
    n, channels, height, width = t.shape
    return t.permute(0, 2, 1, 3).contiguous().view(n * height, channels, width)


def plain_criss_cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``(N, C', H, W)``, ``(N, C', H, W)``, ``(N, C, H, W)`` -> ``(N, C, H, W)``, all in plain PyTorch ops."""
    n, _, height, width = query.shape
    self_as_column_key = torch.diag(query.new_full((height,), float("inf")))  # (H, H), masks y' == y
    energy_columns = torch.bmm(_per_column(query).transpose(1, 2), _per_column(key)) - self_as_column_key
    energy_columns = energy_columns.view(n, width, height, height).permute(0, 2, 1, 3)  # (N, H, W, H')
    energy_rows = torch.bmm(_per_row(query).transpose(1, 2), _per_row(key)).view(n, height, width, width)
    attention = torch.softmax(torch.cat([energy_columns, energy_rows], dim=3), dim=3)
    attention_columns = attention[..., :height].permute(0, 2, 1, 3).contiguous().view(n * width, height, height)
    attention_rows = attention[..., height:].contiguous().view(n * height, width, width)
    out_columns = torch.bmm(_per_column(value), attention_columns.transpose(1, 2))
    out_rows = torch.bmm(_per_row(value), attention_rows.transpose(1, 2))
    out_columns = out_columns.view(n, width, -1, height).permute(0, 2, 3, 1)
    out_rows = out_rows.view(n, height, -1, width).permute(0, 2, 1, 3)
    return out_columns + out_rows
