"""Criss-cross attention (CCNet, Huang et al. 2019) as an op: Python functions, kernels and a reference."""
from .functions import ca_map, ca_weight, criss_cross_attention
from .module import CrissCrossAttention

__all__ = ["CrissCrossAttention", "ca_map", "ca_weight", "criss_cross_attention"]
