"""Criss-cross attention (CCNet, Huang et al. 2019) as an op: Python functions, kernels and a reference; the 3-D
(video) op and block over clips."""
from .functions import ca_map, ca_weight, criss_cross_attention
from .functions_3d import criss_cross_attention_3d
from .module import CrissCrossAttention
from .module_3d import CrissCrossAttention3D

__all__ = ["CrissCrossAttention", "CrissCrossAttention3D", "ca_map", "ca_weight", "criss_cross_attention",
           "criss_cross_attention_3d"]
