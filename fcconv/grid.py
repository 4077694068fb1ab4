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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fcconv.grid_fit import fit_output_grid
from fcconv.metadata import OutputGrid
from fcconv.outputs import SINGLE_OUTPUT_NAME, named_outputs
from fcconv.outputs import output_names as names_of

__all__ = ["OutputGrid", "output_names", "probe_output_grid"]


def probe_output_grid(
    module: nn.Module | Callable[[tuple[int, ...]], tuple[int, ...] | None], input_shape: Sequence[int]
) -> OutputGrid | None:
    """Total stride and receptive field of ``module``'s (N, K, *map) output, found by probing sizes on shapes alone
    (:func:`fcconv.grid_fit.fit_output_grid`; a module's output shapes come from meta or fake tensors).

    ``input_shape`` is the native (C, *spatial) shape, which the module must take; None where the sizes do not fit
    ``floor((X - rf) / stride) + 1`` (see ``fit_output_grid`` for the probes).
    """
    return fit_output_grid(_OutputShapes(module) if isinstance(module, nn.Module) else module, input_shape)


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
