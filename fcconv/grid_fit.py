"""Total stride and receptive field fitted from output sizes alone: the arithmetic of :mod:`fcconv.grid`, without
torch, so that a model known only by its shapes (an ONNX graph, a part of one) is measured the same way.

Along each axis ``out(X) = floor((X - receptive_field) / total_stride) + 1`` (see :mod:`fcconv.grid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

from fcconv.metadata import OutputGrid
from fcconv.sizes import batched_shape, spatial_size

__all__ = ["fit_output_grid"]

# The period probe adds this many pixels to the native size: 8! is a multiple of every stride up to 10
# and of every power of two up to 128, so it holds a whole number of periods of the usual total strides.
_PERIOD_PROBE = math.factorial(8)


def fit_output_grid(
    output_shape: Callable[[tuple[int, ...]], tuple[int, ...] | None], input_shape: Sequence[int]
) -> OutputGrid | None:
    """Total stride and receptive field of a (N, K, *map) output whose shape ``output_shape`` gives for a batch-1
    input of a (C, *spatial) shape, found by probing sizes.

    ``input_shape`` is the native (C, *spatial) shape, which the model must take.
    About ten probes: the native size, the native size plus 8!, a binary search for
    where the first position is added, and a few odd sizes that must agree with the
    fitted formula. Returns None when the output is not a map of the input's rank,
    a probe fails, or the sizes do not fit ``floor((X - rf) / stride) + 1`` with
    ``rf >= 1``.
    """
    input_shape = tuple(int(s) for s in input_shape)
    native = spatial_size(input_shape)
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}

    def run(size: tuple[int, ...]) -> tuple[int, ...] | None:
        if size not in seen:
            shape = output_shape(batched_shape(input_shape, size, 1)[1:])
            if shape is None or len(shape) != len(size) + 2:
                return None
            seen[size] = shape[2:]
        return seen[size]

    searches = [_fit_axis(n) for n in native]
    pending = [next(search) for search in searches]
    fitted: list[tuple[int, int] | None] = [None] * len(native)
    done = [False] * len(native)
    while not all(done):
        size = tuple(n if finished else p for n, p, finished in zip(native, pending, done))
        out = run(size)
        if out is None:
            return None
        for axis, search in enumerate(searches):
            if done[axis]:
                continue
            try:
                pending[axis] = search.send(out[axis])
            except StopIteration as stop:
                fitted[axis], done[axis] = stop.value, True
    if None in fitted:
        return None
    grid = OutputGrid(total_stride=tuple(f[0] for f in fitted), receptive_field=tuple(f[1] for f in fitted))
    # Every size seen, one period past the native size, and two odd sizes that differ between the axes.
    checks = [
        tuple(n + s for n, s in zip(native, grid.total_stride)),
        tuple(2 * n + 1 + 2 * axis for axis, n in enumerate(native)),
        tuple(3 * n + 7 * (axis + 1) for axis, n in enumerate(native)),
    ]
    for size in [*seen, *checks]:
        out = run(size)
        if out is None or out != grid.output_size(size):
            return None
    return grid


def _fit_axis(native: int) -> Generator[int, int, tuple[int, int] | None]:
    """Asks for output sizes at input extents along one axis; returns (total stride, receptive field) or None."""
    first = yield native
    far = yield native + _PERIOD_PROBE
    steps = far - first
    if first < 1 or steps <= 0 or _PERIOD_PROBE % steps:
        return None
    stride = _PERIOD_PROBE // steps
    # The first extent above native that adds a position lies in (native, native + stride].
    low, high = native, native + stride
    while high - low > 1:
        middle = (low + high) // 2
        if (yield middle) > first:
            high = middle
        else:
            low = middle
    # out(high) = (high + c) // stride exactly at a step: high + c = stride * (first + 1)
    offset = stride * (first + 1) - high
    receptive_field = stride - offset
    if receptive_field < 1:  # padding wider than the kernels: any extent gives positions, and no field is smallest
        return None
    return stride, receptive_field
