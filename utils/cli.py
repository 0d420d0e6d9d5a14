"""Command-line argument types shared by the scripts."""
import argparse
import re
from typing import Tuple


def parse_size(text: str) -> Tuple[int, int]:
    """``"H,W"`` (or ``"HxW"``, or ``"S"`` for a square) -> ``(H, W)``, both positive; argparse error otherwise."""
    parts = re.split(r"[,x]", text.lower())
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size H,W (e.g. 769,769), HxW or S, got {text!r}")
    return values[0], values[1]
