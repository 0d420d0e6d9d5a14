"""The op's public functions. Backends and dispatch live here (initially: the reference only)."""
import torch

from .reference import ca_map_reference, ca_weight_reference


def ca_weight(query: torch.Tensor, key: torch.Tensor, backend=None) -> torch.Tensor:
    """``(N, C', H, W) x (N, C', H, W) -> (N, H+W-1, H, W)`` criss-cross energies (see ``reference``)."""
    return ca_weight_reference(query, key)


def ca_map(attention: torch.Tensor, value: torch.Tensor, backend=None) -> torch.Tensor:
    """``(N, H+W-1, H, W) x (N, C, H, W) -> (N, C, H, W)`` aggregation along rows and columns."""
    return ca_map_reference(attention, value)


def criss_cross_attention(query, key, value, backend=None) -> torch.Tensor:
    """``ca_map(softmax(ca_weight(query, key), dim=1), value)``: ``(N, C, H, W)``."""
    return ca_map(torch.softmax(ca_weight(query, key, backend), dim=1), value, backend)
