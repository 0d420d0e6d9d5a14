"""Criss-cross attention over any list of axes, in pure PyTorch: the reference of the 3-D (video) op.

A position of an ``(N, C, *S)`` feature map (``S`` = ``(H, W)`` for images, ``(T, H, W)`` for clips) attends to the
positions that differ from it along ONE axis of ``axes``: its row (the last axis, ``W``), its column (``H``) and,
for clips, its time line (``T``), with ONE softmax over all of them. The position itself is a key once: of the first
axis of ``axes`` (the row, as in the 2-D op); on every other axis its own entry is masked (attention zero).

The attention is kept in blocks, one per axis, each a batch of dense matrices that the products read and write:
the block of axis ``a`` (length ``L``) is laid out as ``(N, <the other axes of S in order>, L, L')``:
``block[n, ..., i, j]`` is the weight of key ``j`` on axis ``a`` for the position at ``i``. For clips: rows
``(N, T, H, W, W)``, columns ``(N, T, W, H, H)``, time ``(N, H, W, T, T)``; for images rows ``(N, H, W, W)`` and
columns ``(N, W, H, H)``, the 2-D kernels' blocks (docs/op.md).

Three products make every pass (forward and backward), written once here for any axis:

* ``affinity(a, b)``: ``block = <a at the position, b at the key>`` (energies; the gradient of the attention);
* ``gather(block, v)``: ``out[position] = sum_keys block * v[key]`` (the output; the gradient of the query);
* ``scatter(block, g)``: ``out[key] = sum_positions block * g[position]`` (the gradients of the value and key).
"""
from typing import List, Sequence, Tuple

import torch

KEY = "k"  # the einsum letter of a key's index along the block's axis
SPATIAL = "thw"  # the einsum letters of the spatial axes, the last len(S) of them


def _letters(spatial_dims: int) -> str:
    if not 1 <= spatial_dims <= len(SPATIAL):
        raise ValueError(f"features must have 1 to {len(SPATIAL)} spatial axes, got {spatial_dims}")
    return SPATIAL[len(SPATIAL) - spatial_dims:]


class AxisBlock:
    """The einsum subscripts of one axis's attention block for features with ``spatial_dims`` spatial axes.

    ``axis``: the spatial axis, counted in ``S`` (0 = the first spatial axis; negative from the end).
    """

    def __init__(self, axis: int, spatial_dims: int):
        letters = _letters(spatial_dims)
        letter = letters[axis]
        self.features = "nc" + letters  # a feature tensor (N, C, *S)
        self.keys = "nc" + letters.replace(letter, KEY)  # the same tensor indexed by the key along the axis
        self.block = "n" + letters.replace(letter, "") + letter + KEY  # (N, <other axes>, L, L')
        positions = "n" + letters + KEY  # the block with the position's axes in the order of S
        self.to_positions = tuple(self.block.index(c) for c in positions)
        self.from_positions = tuple(positions.index(c) for c in self.block)

    def affinity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(f"{self.features},{self.keys}->{self.block}", a, b)

    def gather(self, block: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum(f"{self.block},{self.keys}->{self.features}", block, v)

    def scatter(self, block: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.einsum(f"{self.block},{self.features}->{self.keys}", block, g)


def axis_blocks(features: torch.Tensor, axes: Sequence[int]) -> List[AxisBlock]:
    """One :class:`AxisBlock` per axis of ``axes`` for ``features`` ``(N, C, *S)``."""
    return [AxisBlock(axis, features.dim() - 2) for axis in axes]


def _self_mask(length: int, device) -> torch.Tensor:
    """``(L, L)`` bool, True on the diagonal (a position as its own key); built without ``torch.diag``."""
    index = torch.arange(length, device=device)
    return index.unsqueeze(1) == index.unsqueeze(0)


def attention_blocks(query: torch.Tensor, key: torch.Tensor, axes: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """The softmax-normalized attention, one block per axis of ``axes`` (layouts: the module docstring).

    Args:
        query, key: ``(N, C', *S)``.
        axes: spatial axes (0-based in ``S``, negative from the end); the first keeps the position as a key, the
            others mask it.
    Returns:
        the blocks, contiguous, in the dtype of ``query``; each position's weights over all blocks sum to 1. For
        16-bit inputs the energies and the softmax are float32 (from float32 copies of the query and the key), as
        in the 2-D op: an energy beyond 65504 would be inf in float16.
    """
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key = query.float(), key.float()
    blocks = axis_blocks(query, axes)
    energies = []
    for index, block in enumerate(blocks):
        energy = block.affinity(query, key)
        if index > 0:
            energy = energy.masked_fill(_self_mask(energy.shape[-1], energy.device), float("-inf"))
        energies.append(energy.permute(block.to_positions))  # (N, *S, L'), a view
    joint = torch.softmax(torch.cat(energies, dim=-1), dim=-1)  # one softmax per position over every key
    parts = torch.split(joint, [energy.shape[-1] for energy in energies], dim=-1)
    return tuple(part.permute(block.from_positions).to(dtype, memory_format=torch.contiguous_format, copy=True)
                 for part, block in zip(parts, blocks))  # copies: blocks that share no memory


def aggregate(blocks: Sequence[torch.Tensor], value: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """``out[position] = sum over axes and keys of block * value[key]``: ``(N, C, *S)``."""
    out = None
    for attention, block in zip(blocks, axis_blocks(value, axes)):
        part = block.gather(attention, value)
        out = part if out is None else out + part
    return out


def criss_cross_attention_over_axes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    axes: Sequence[int]) -> torch.Tensor:
    """``(N, C', *S)`` x ``(N, C', *S)`` x ``(N, C, *S)`` -> ``(N, C, *S)``: every position attends to the positions
    on its lines along ``axes`` (itself once), differentiable by autograd. ``axes=(-1, -2)`` on images is the 2-D
    op; ``(-1, -2, -3)`` on clips the 3-D op."""
    return aggregate(attention_blocks(query, key, axes), value, axes)


def criss_cross_attention_backward_over_axes(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                             value: torch.Tensor, blocks: Sequence[torch.Tensor],
                                             axes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(query, key, value)`` of :func:`criss_cross_attention_over_axes` from its saved attention
    ``blocks`` (:func:`attention_blocks`), without recomputing the softmax: the analytic backward that the kernels
    implement. The joint softmax's backward is ``attention * (grad - sum over every block of attention * grad)``
    per position; the masked entries have attention zero, so their gradient is zero."""
    layouts = axis_blocks(value, axes)
    grad_value = None
    grad_blocks, weighted_sum = [], None
    for attention, block in zip(blocks, layouts):
        part = block.scatter(attention, grad_out)
        grad_value = part if grad_value is None else grad_value + part
        grad_attention = block.affinity(grad_out, value)
        grad_blocks.append(grad_attention)
        position_sum = (attention * grad_attention).sum(-1, keepdim=True).permute(block.to_positions)  # (N, *S, 1)
        weighted_sum = position_sum if weighted_sum is None else weighted_sum + position_sum
    grad_query = grad_key = None
    for attention, grad_attention, block in zip(blocks, grad_blocks, layouts):
        grad_energy = attention * (grad_attention - weighted_sum.permute(block.from_positions))
        part_query, part_key = block.gather(grad_energy, key), block.scatter(grad_energy, query)
        grad_query = part_query if grad_query is None else grad_query + part_query
        grad_key = part_key if grad_key is None else grad_key + part_key
    return grad_query, grad_key, grad_value
