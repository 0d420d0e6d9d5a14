"""Pure-PyTorch criss-cross attention: the reference every kernel is tested against.

Runs on any device and dtype, uses no ``.cuda()`` call and no ``torch.diag`` (the self-exclusion of the column
part is a ``gather`` / ``scatter`` with a constant index, which exports to ONNX).

Layout of the attention tensor ``(N, H+W-1, H, W)``, for the pixel ``(y, x)``:

* channels ``[0, W)``: the keys on the same row, ``x' = 0 .. W-1`` (the pixel itself included);
* channels ``[W, W+H-1)``: the keys on the same column with ``y' != y``, in increasing ``y'``.
"""
import torch


def column_key_index(height: int, device=None) -> torch.Tensor:
    """Row ``y'`` of the ``j``-th column key of a pixel on row ``y``: ``index[j, y] = j + (j >= y)``.

    Returns a ``(H-1, H)`` int64 tensor: for each query row ``y`` the ``H-1`` other rows in increasing order.
    """
    j = torch.arange(height - 1, device=device).unsqueeze(1)
    y = torch.arange(height, device=device).unsqueeze(0)
    return j + (j >= y).long()


def _expanded_index(n: int, height: int, width: int, device) -> torch.Tensor:
    """``column_key_index`` broadcast to ``(N, H-1, H, W)`` for ``gather`` / ``scatter`` along dim 1."""
    return column_key_index(height, device).view(1, height - 1, height, 1).expand(n, height - 1, height, width)


def ca_weight_reference(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Criss-cross affinities.

    Args:
        query: ``(N, C', H, W)``.
        key: ``(N, C', H, W)``.
    Returns:
        energy ``(N, H+W-1, H, W)``: ``energy[n, x', y, x] = <query[n, :, y, x], key[n, :, y, x']>`` for the row
        part, ``energy[n, W+j, y, x] = <query[n, :, y, x], key[n, :, y'_j, x]>`` for the column part.
    """
    n, _, height, width = query.shape
    row = torch.einsum("ncyx,ncyz->nzyx", query, key)  # (N, W, H, W)
    if height == 1:
        return row
    column_all = torch.einsum("ncyx,nczx->nzyx", query, key)  # (N, H, H, W), includes y' == y
    column = torch.gather(column_all, 1, _expanded_index(n, height, width, query.device))
    return torch.cat([row, column], dim=1)


def ca_map_reference(attention: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Aggregate the values along each pixel's row and column.

    Args:
        attention: ``(N, H+W-1, H, W)`` in the layout of :func:`ca_weight_reference`.
        value: ``(N, C, H, W)``.
    Returns:
        ``(N, C, H, W)``: ``out[n, c, y, x] = sum_k attention[n, k, y, x] * value[n, c, key_k(y, x)]``.
    """
    n, _, height, width = value.shape
    row_attention = attention[:, :width]
    out = torch.einsum("nzyx,ncyz->ncyx", row_attention, value)
    if height == 1:
        return out
    column_attention = attention[:, width:]
    column_full = torch.zeros(
        n, height, height, width, dtype=attention.dtype, device=attention.device
    ).scatter(1, _expanded_index(n, height, width, attention.device), column_attention)
    return out + torch.einsum("nzyx,nczx->ncyx", column_full, value)


def criss_cross_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``ca_map_reference(softmax(ca_weight_reference(query, key), dim=1), value)``: ``(N, C', H, W)``,
    ``(N, C', H, W)``, ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    For 16-bit inputs the energies and the softmax are computed in float32 (from float32 copies of the query and the
    key, C' channels), as the kernels do: in float16 an energy |q.k| > 65504 would be inf and the softmax NaN.
    """
    if query.dtype in (torch.float16, torch.bfloat16):
        attention = torch.softmax(ca_weight_reference(query.float(), key.float()), dim=1).to(value.dtype)
    else:
        attention = torch.softmax(ca_weight_reference(query, key), dim=1)
    return ca_map_reference(attention, value)
