"""Where a fully convolutional model's output positions lie in its input: total stride and receptive field.

A chain of convolutions and poolings maps an input extent X to a feature extent
``floor((X + c) / S)`` for integers S and c, because nested floor divisions by
integers compose into one. The converted head then reads windows of that map, so
along each spatial axis the output has

    out(X) = floor((X - receptive_field) / total_stride) + 1    for X >= receptive_field

positions: ``total_stride`` input pixels lie between neighbouring positions, and
``receptive_field`` is the smallest input extent that gives one position (with
padding in the trunk it can be smaller than the region a position actually sees).

:func:`probe_output_grid` finds both numbers by running the model on shapes alone
(meta or fake tensors: no arithmetic and no copy of the weights) at a few sizes,
and returns None rather than a guess when the sizes it sees do not follow the formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from torch import nn

from fcconv.metadata import OutputGrid
from fcconv.outputs import SINGLE_OUTPUT_NAME, named_outputs
from fcconv.outputs import output_names as names_of
from fcconv.sizes import batched_shape, spatial_size

__all__ = ["OutputGrid", "output_names", "probe_output_grid"]

# The period probe adds this many pixels to the native size: 8! is a multiple of every stride up to 10
# and of every power of two up to 128, so it holds a whole number of periods of the usual total strides.
_PERIOD_PROBE = math.factorial(8)


def probe_output_grid(
    module: nn.Module | Callable[[tuple[int, ...]], tuple[int, ...] | None], input_shape: Sequence[int]
) -> OutputGrid | None:
    """Total stride and receptive field of ``module``'s (N, K, *map) output, found by probing sizes on shapes alone.

    ``input_shape`` is the native (C, *spatial) shape, which the module must take.
    About ten probes: the native size, the native size plus 8!, a binary search for
    where the first position is added, and a few odd sizes that must agree with the
    fitted formula. Returns None when the output is not a map of the input's rank,
    a probe fails, or the sizes do not fit ``floor((X - rf) / stride) + 1`` with
    ``rf >= 1``.
    """
    input_shape = tuple(int(s) for s in input_shape)
    native = spatial_size(input_shape)
    output_shape = _OutputShapes(module) if isinstance(module, nn.Module) else module
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


class _OutputShapes:
    """The shape of a module's output for a batch-1 input of a given shape, computed without arithmetic.

    First on the meta device, with meta stand-ins for the module's weights (fast); if
    the module mixes in real tensors of its own there, on fake tensors instead, where
    its weights enter the computation as they are used. Neither copies a weight.
    """

    def __init__(self, module: nn.Module) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.module = module
        params = [p for p in module.parameters() if p.is_floating_point()]
        self.dtype = params[0].dtype if params else torch.float32
        self.device = params[0].device if params else torch.device("cpu")
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.use_meta = True

    def __call__(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return self._shape(self.output(shape))

    def output(self, shape: tuple[int, ...]) -> Any:
        """The module's output (meta or fake tensors) for a batch-1 input of ``shape``, or None if it fails."""
        from fcconv.capture import state_kept

        with state_kept(self.module):
            return self._output(shape)

    def _output(self, shape: tuple[int, ...]) -> Any:
        if self.use_meta:
            try:
                return self._meta_forward(shape)
            except Exception:  # noqa: BLE001 - not runnable on meta tensors: fall back to fake ones
                self.use_meta = False
        try:
            with self.fake_mode, torch.no_grad():
                return self.module(torch.empty((1, *shape), dtype=self.dtype, device=self.device))
        except Exception:  # noqa: BLE001 - a size the model refuses means the grid is unknown, not an error
            return None

    def _meta_forward(self, shape: tuple[int, ...]) -> Any:
        from torch.func import functional_call

        state = {k: torch.empty_like(v, device="meta") for k, v in self.module.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            return functional_call(self.module, state, (torch.empty((1, *shape), dtype=self.dtype, device="meta"),))

    @staticmethod
    def _shape(out: Any) -> tuple[int, ...] | None:
        """The output's shape; for several outputs the first one's, when all lie on the same grid."""
        try:
            shapes = [tuple(int(s) for s in tensor.shape) for _, tensor in named_outputs(out)]
        except TypeError:
            return None
        if any(len(shape) != len(shapes[0]) or shape[2:] != shapes[0][2:] for shape in shapes):
            return None
        return shapes[0]


def output_names(module: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The names of ``module``'s outputs (:mod:`fcconv.outputs`), found on shapes alone at ``input_shape``."""
    out = _OutputShapes(module).output(tuple(int(s) for s in input_shape))
    return names_of(out) if out is not None else [SINGLE_OUTPUT_NAME]
