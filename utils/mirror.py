"""Classes that a left-right mirror turns into each other (a left arm becomes a right arm): THE swap of a dataset's
flip pairs (``DatasetSpec.flip_pairs``), used by the training augmentation (``--random-mirror``, on the label ids)
and by the flip averaging of inference (``--flip``, on the class channels of the logits)."""
from typing import Sequence, Tuple

import numpy as np

FlipPairs = Sequence[Tuple[int, int]]


def mirrored_class_ids(num_ids: int, flip_pairs: FlipPairs) -> np.ndarray:
    """``(num_ids,)`` int64: entry ``k`` is the id class ``k`` has in the mirrored image: the two ids of each pair of
    ``flip_pairs`` swapped, every other id (e.g. the void label 255 of a 256-entry table) itself. The map is its own
    inverse, so it serves both as a lookup table (``table[labels]``: the labels of a mirrored image) and as a
    channel order (``logits[:, table]``: the logits of a mirrored image in the original's classes).

    Raises ``ValueError`` (one line) for a pair with an id outside ``0 .. num_ids - 1``, a pair of one id twice, or
    an id in two pairs.
    """
    table = np.arange(num_ids)
    paired = set()
    for pair in flip_pairs:
        first, second = pair
        if not (0 <= first < num_ids and 0 <= second < num_ids):
            raise ValueError(f"flip pair {tuple(pair)}: ids must be in 0..{num_ids - 1}")
        if first == second or first in paired or second in paired:
            raise ValueError(f"flip pair {tuple(pair)}: each class may be in one pair, with another class")
        paired.update(pair)
        table[first], table[second] = second, first
    return table
