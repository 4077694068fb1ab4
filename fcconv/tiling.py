"""Exact tiling of a dense map: which part of the input each tile reads, and which part of the map it gives.

A fully convolutional model's output position m (along one axis) is computed from the input pixels
``[T·m − before, T·m − before + extent)``, T the total stride, clipped to the input: its *extent*, padding
included. Where the trunk pads its layers, this is wider than the unpadded receptive field on both sides,
and it is what a tile must hold around the positions it keeps. A tile that starts at a multiple of T
puts every layer's grid where the whole input puts it, so each position whose extent lies inside the tile
(or reaches past it only where the input itself ends) is computed from the same pixels by the same sums as
in one pass over the whole input. Tiles are cut along the output grid: every position is computed by
exactly one tile, none twice, none skipped.

The extent is measured on the model itself (:func:`measure_extent`), by changing half of a probe input and
seeing which output positions change, so that it holds for any padding, pooling or dilation.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fcconv.errors import BadInputError, NotConvertibleError

__all__ = [
    "AxisExtent", "Tile", "balanced_tile", "default_tile", "measure_extent", "output_size", "plan_tiles", "reread_share",
    "threads_per_tile", "tile_per_axis",
]  # fmt: skip


@dataclass(frozen=True)
class AxisExtent:
    """Along one spatial axis: the total stride, the receptive field (the smallest input that gives one position),
    and the input interval position m reads, ``[stride·m − before, stride·m − before + span)``."""

    stride: int
    receptive_field: int
    before: int
    span: int


@dataclass(frozen=True)
class Tile:
    """One piece of work: the input it reads (per axis, [start, stop)), the map positions it writes, and where
    those lie in its own map."""

    input: tuple[tuple[int, int], ...]
    output: tuple[tuple[int, int], ...]
    offset: tuple[int, ...]
    """The index, in the tile's own map, of its first written position, per axis."""

    @property
    def input_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.input)

    @property
    def output_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.output)

    @property
    def own_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + b - a) for o, (a, b) in zip(self.offset, self.output))

    @property
    def positions(self) -> int:
        return math.prod(b - a for a, b in self.output)


def output_size(size: int, axis: AxisExtent) -> int:
    """The map positions along an axis of ``size`` input pixels (at least the receptive field)."""
    return (size - axis.receptive_field) // axis.stride + 1


def measure_extent(
    run: Callable[[np.ndarray], np.ndarray],
    native: Sequence[int],
    channels: int,
    strides: Sequence[int],
    receptive_fields: Sequence[int],
    *,
    seed: int = 0,
) -> list[AxisExtent]:
    """Per spatial axis, the input interval each output position reads, measured on ``run`` (N, C, *S) → (N, K, *s).

    Along each axis in turn, on an input two receptive fields long (the other axes at the native size), the
    position in the middle of the map is watched while everything from some pixel on (then everything before
    it) is replaced by other random values: by bisection, the last pixel whose change reaches it and the first.
    Where that interval touches the probe's border the probe is doubled, up to 64 receptive fields. (VGG16's
    404-pixel extent fits in its 448-pixel probe: its whole map was planned in 12.7 s, 21.6 s from four fields.)
    """
    rng = np.random.default_rng(seed)
    extents = []
    for axis, (stride, field) in enumerate(zip(strides, receptive_fields)):
        length = 2 * max(field, stride)
        while True:
            shape = [channels, *native]
            shape[1 + axis] = length
            base = rng.standard_normal((1, *shape)).astype(np.float32)
            other = (rng.standard_normal(base.shape) * 10).astype(np.float32)
            reference = run(base)
            positions = reference.shape[2 + axis]
            middle = positions // 2

            changes = functools.partial(_reaches, run, base, other, reference, axis, middle)

            # the first pixel from which a changed suffix no longer reaches the position: the interval's end
            low, high = 0, length  # changes(low, length) holds; changes(high, length) does not
            if not changes(0, length):
                raise NotConvertibleError("the model's output does not depend on its input: no extent to tile by")
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if changes(mid, length) else (low, mid)
            end = high
            low, high = 0, length  # changes(0, high) holds; changes(0, low) does not
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if changes(0, mid) else (mid, high)
            start = low
            if (start > 0 and end < length) or length >= 64 * max(field, stride):
                break
            length *= 2
        extents.append(AxisExtent(stride, field, stride * middle - start, end - start))
    return extents


def _reaches(
    run: Callable[[np.ndarray], np.ndarray],
    base: np.ndarray,
    other: np.ndarray,
    reference: np.ndarray,
    axis: int,
    position: int,
    start: int,
    stop: int,
) -> bool:
    """Whether replacing ``base``'s pixels [start, stop) along ``axis`` by ``other``'s changes the map at
    ``position`` along that axis."""
    rank = base.ndim - 2
    index = (slice(None), slice(None), *(slice(start, stop) if a == axis else slice(None) for a in range(rank)))
    watched = (slice(None), slice(None), *(position if a == axis else slice(None) for a in range(rank)))
    probe = base.copy()
    probe[index] = other[index]
    return not np.array_equal(run(probe)[watched], reference[watched])


def plan_tiles(size: Sequence[int], extents: Sequence[AxisExtent], tile: Sequence[int]) -> list[Tile]:
    """Tiles of at most ``tile`` input pixels per axis, overlap included, that cover the map once.

    Raises :class:`BadInputError` when a tile is smaller than the extent of one position, or the input smaller
    than the receptive field.
    """
    per_axis = []
    for n, axis, t in zip(size, extents, tile):
        if n < axis.receptive_field:
            raise BadInputError(f"the input is {n} long where the model reads at least {axis.receptive_field}")
        least = _smallest_tile(axis)
        if t < min(least, n):  # a tile that holds the whole axis holds every position, however short
            raise BadInputError(
                f"--tile {t} is smaller than what one map position reads, from a tile start on the map's grid: "
                f"at least {least} input pixels along that axis"
            )
        per_axis.append(_axis_tiles(n, axis, t))
    tiles = []
    for parts in itertools.product(*per_axis):
        tiles.append(Tile(tuple(p[0] for p in parts), tuple(p[1] for p in parts), tuple(p[2] for p in parts)))
    return tiles


OVERLAP_SHARE = 0.025
"""The share of a default tile's length, per axis, that it reads again from its neighbour."""


def default_tile(
    size: Sequence[int], extents: Sequence[AxisExtent], activations: Callable[[tuple[int, ...]], int | None],
    budget: int, least: int,
) -> tuple[int, ...] | None:  # fmt: skip
    """A tile whose overlap with its neighbours is at most ``OVERLAP_SHARE`` of its length per axis (and at least
    ``least`` pixels long), or, where that would not fit ``budget`` bytes of activations as ``activations(tile)``
    estimates them, the largest that does; clipped to the input, with the same number of map positions per axis.
    None where the activations cannot be estimated.

    The overlap is what one position reads, whatever the tile's size, so a larger tile recomputes a smaller share
    of the input; past that share, a larger tile only holds more memory (and, on a CPU, runs out of its caches).
    """

    def tile(count: int) -> tuple[int, ...]:
        return tuple(min(n, _smallest_tile(e) + (count - 1) * e.stride) for n, e in zip(size, extents))

    def fits(count: int) -> bool:
        needed = activations(tile(count))
        return needed is not None and needed <= budget

    wanted = max(
        math.ceil((max(least, (_smallest_tile(e) - e.stride) / OVERLAP_SHARE) - _smallest_tile(e)) / e.stride) + 1
        for e in extents
    )
    most = max(1, min(wanted, max(output_size(n, e) for n, e in zip(size, extents))))
    least_needed = activations(tile(1))
    if least_needed is None:
        return None
    if least_needed > budget:
        return tile(1)  # one position per tile is the least a tile can hold
    low, high = 1, min(2, most)  # fits(low); find a high that does not
    while fits(high):
        if high == most:
            return tile(most)
        low, high = high, min(2 * high, most)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return tile(low)


SHARED_THREADS_EFFICIENCY = 0.85
"""A tile's speed on n threads, against n one-thread tiles side by side. In the bench (``bench/bench_map.py``,
two cores) the digits sample's 2048×2048 input was mapped at 0.95–0.99× one pass's speed in two strips on a
thread each, and at 0.82–0.89× as one tile on both threads (earlier, with the columns' map written through a
memory map: 1.08–1.18× as long as one tile); scripts that ran both in one process found the reverse (one tile
1.11× as fast), cause not found. The bench's figure is taken."""


def threads_per_tile(workers: int, tiles: int) -> int:
    """The onnxruntime threads each tile gets where ``workers`` threads are shared among ``tiles`` tiles run side by
    side: all of them for one tile, one each where there are at least as many tiles as threads."""
    return max(1, workers // max(1, min(workers, tiles)))


def balanced_tile(
    size: Sequence[int], extents: Sequence[AxisExtent], tile: Sequence[int], workers: int,
    fits: Callable[[tuple[int, ...]], bool] = lambda tile: True,
) -> tuple[int, ...]:  # fmt: skip
    """The tile, holding no more input pixels than ``tile`` and ``fits``, whose tiling of ``size`` ``workers``
    finish soonest: the fewest rounds of tiles side by side times the pixels of the largest, a tile's threads
    shared out where there are fewer tiles than workers (as ``fcconv map`` shares them); of those, the fewest
    tiles, then strips that span every axis but the first (written to the map in one run per class).

    ``tile`` cut evenly can leave one tile running alone at the end (9 tiles on 2 workers: 5 rounds where 2×4
    tiles take 4), or two tiles per axis where one axis could stay whole (2×2 tiles recompute two overlaps per
    axis where 1×2 recompute one); another count of tiles per axis, no larger in volume, avoids both.
    """
    workers = max(1, workers)
    per_axis = []  # per axis: (tiles, input pixels per tile) for each count of tiles that differs
    for n, axis, t in zip(size, extents, tile):
        total, least = output_size(n, axis), _smallest_tile(axis)
        given = math.ceil(total / _positions_held(n, axis, t))
        options = {}
        for count in range(max(1, given // 2), min(total, given + min(workers, 8)) + 1):
            held = math.ceil(total / count)  # positions per tile, as _axis_tiles spreads them
            options.setdefault(math.ceil(total / held), min(n, least + (held - 1) * axis.stride))
        per_axis.append(sorted(options.items()))
    volume = math.prod(tile)

    def finish(choice: tuple[tuple[int, int], ...]) -> tuple[float, int, int]:
        count, pixels = math.prod(c for c, _ in choice), math.prod(length for _, length in choice)
        threads = threads_per_tile(workers, count)
        speed = threads * (SHARED_THREADS_EFFICIENCY if threads > 1 else 1.0)
        return math.ceil(count / workers) * pixels / speed, count, sum(c > 1 for c, _ in choice[1:])

    choices = sorted((c for c in itertools.product(*per_axis) if math.prod(p for _, p in c) <= volume), key=finish)
    for choice in choices:
        shape = tuple(length for _, length in choice)
        if fits(shape):
            return shape
    return tuple(tile)


def reread_share(tiles: Sequence[Tile], size: Sequence[int]) -> float:
    """The share of the input that ``tiles`` read more than once: their input pixels over the input's, less one."""
    return sum(math.prod(stop - start for start, stop in tile.input) for tile in tiles) / math.prod(size) - 1


def tile_per_axis(tile: Sequence[int], rank: int, subject: str = "the input") -> tuple[int, ...]:
    """``--tile``'s values, one for every axis or one per axis, as one per axis; any other count is refused in one
    line, saying that ``subject`` has ``rank`` axes."""
    if len(tile) == 1:
        return tuple(tile) * rank
    if len(tile) != rank:
        words = {1: "one", 2: "two", 3: "three"}
        axes = f"{words.get(rank, rank)} ax{'is' if rank == 1 else 'es'}"
        give = "one value" if rank == 1 else f"one value or {words.get(rank, rank)}"
        raise BadInputError(f"--tile {','.join(map(str, tile))}: {subject} has {axes}; give {give}")
    return tuple(tile)


def _smallest_tile(axis: AxisExtent) -> int:
    """The fewest input pixels a tile that starts on the map's grid needs to hold one position whole."""
    return math.ceil(axis.before / axis.stride) * axis.stride + max(axis.span - axis.before, axis.receptive_field)


def _positions_held(n: int, axis: AxisExtent, tile: int) -> int:
    """The map positions a tile of ``tile`` pixels starting on the grid holds whole along an axis of ``n``: the
    smallest tile (one position) plus (count − 1) steps fits in it; a tile that holds the whole axis holds all."""
    return output_size(n, axis) if n <= tile else max(1, (tile - _smallest_tile(axis)) // axis.stride + 1)


def _axis_tiles(n: int, axis: AxisExtent, tile: int) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
    """Along one axis: (input [start, stop), positions [first, last), first position's index in the tile's map)."""
    stride, before, span, field = axis.stride, axis.before, axis.span, axis.receptive_field
    total = output_size(n, axis)
    reach = max(span - before, field)  # past T·m, a position reads this far (and its map needs this much input)
    count = _positions_held(n, axis, tile)
    count = math.ceil(total / math.ceil(total / count))  # as many tiles as that takes, holding as many positions each
    parts = []
    for first in range(0, total, count):
        last = min(total, first + count)
        start = max(0, (stride * first - before) // stride * stride)
        stop = min(n, stride * (last - 1) + reach)
        parts.append(((start, stop), (first, last), first - start // stride))
    return parts
