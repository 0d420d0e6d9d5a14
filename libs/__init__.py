"""Normalization layers: InPlaceABN when the optional ``inplace_abn`` package is installed, BatchNorm otherwise."""
from .norm import NORM_KINDS, inplace_abn_available, make_norm, resolve_norm_kind

__all__ = ["NORM_KINDS", "inplace_abn_available", "make_norm", "resolve_norm_kind"]
