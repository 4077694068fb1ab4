"""The feature order of a collapse: which element of the (C, *S) map each flattened feature reads.

An array of element indices is passed through the layout steps between the map and the flatten, at the native
shapes, so the answer is exact for any sequence of transposes and reshapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Step = tuple[str, Sequence[int]]
"""``("transpose", axes)`` or ``("reshape", shape)``, of one sample's tensor (no batch axis)."""


def feature_order(map_shape: Sequence[int], steps: Iterable[Step]) -> np.ndarray:
    """For each feature of the flattened result of ``steps`` applied to a (C, *S) map, the map element it reads."""
    index = np.arange(int(np.prod(map_shape, dtype=np.int64))).reshape(tuple(map_shape))
    for kind, value in steps:
        if kind == "transpose":
            index = np.transpose(index, tuple(value))
        elif kind == "reshape":
            index = index.reshape(tuple(value))
        else:
            raise ValueError(f"unknown layout step {kind!r}")
    return index.reshape(-1)


def weight_columns(order: np.ndarray) -> np.ndarray:
    """The columns to take from a weight over the features in ``order`` to have it over the map in (C, *S) order:
    column j of the result multiplies map element j."""
    columns = np.empty_like(order)
    columns[order] = np.arange(order.size)
    return columns
