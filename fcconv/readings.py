"""The readings of the original model that a conversion is compared with, beside its own output.

* The *sliding window*: the original's trunk run on the whole input, then its head on every window of that
  map that one output position reads (:class:`~fcconv.rewrite.HeadGeometry`): what the converted model must
  compute at any size, from the original's own layers.
* *À trous*: for a ``--stride`` conversion, the original's layers read à trous
  (:class:`~fcconv.atrous.AtrousReading`), then its head on windows whose cells lie (total / stride) apart.
* The original's own map at the head's input, read from its eager run where a captured trunk holds a value
  fixed at the native size (:func:`eager_map_reader`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fcconv.atrous import AtrousReading
from fcconv.layers import channels_first, gather_windows
from fcconv.outputs import like, named_outputs
from fcconv.rewrite import Conversion

__all__ = ["HEAD_CHUNK", "SlidingWindowHead", "atrous_reading", "atrous_reference", "eager_map_reader",
           "sliding_window_reference"]  # fmt: skip

HEAD_CHUNK = 256  # windows per call of the original head


class SlidingWindowHead(nn.Module):
    """The original model read as sliding windows: its features, then its head on every window.

    Returns (N, K, *map), or one such map per output in the container the head
    returns (a tuple or dict) for a head with several outputs. ``chunk`` bounds how
    many windows the head sees per call. ``features`` reads the map in place of the
    conversion's trunk (:func:`eager_map_reader`).
    """

    def __init__(
        self,
        conversion: Conversion,
        chunk: int | None = None,
        features: Callable[[torch.Tensor], Any] | None = None,
        dilation: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.features = conversion.features if features is None else features
        self.dilation = dilation
        self.head = conversion.head
        self.window = conversion.geometry.window
        self.stride = conversion.geometry.stride
        self.channels = conversion.geometry.feature_shape[0]
        self.pool = conversion.geometry.pool
        self.added = tuple(2 + axis for axis in getattr(conversion.geometry, "added_axes", ()))
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> Any:
        scores = self.score_map(x)
        if self.added:  # axes a channel-free input does not have: one position each, squeezed as the conversion does
            scores = like(scores, [s.squeeze(self.added) for _, s in named_outputs(scores)])
        if self.pool is None:
            return scores
        pooled = []
        for _, score_map in named_outputs(scores):
            spatial = tuple(range(2, score_map.dim()))
            pooled.append(score_map.mean(spatial) if self.pool == "avg" else score_map.amax(spatial))
        return like(scores, pooled)

    def score_map(self, x: torch.Tensor) -> Any:
        """(N, K, *map): the original head on every window of the original features of ``x``, per output."""
        feats = self.features(x)
        n = feats.shape[0]
        rank = feats.dim() - 2
        if self.window is None:
            scores = self.head(feats)
            return like(scores, [s.reshape(n, s.shape[1], *(1,) * rank) for _, s in named_outputs(scores)])
        rows = gather_windows(feats, self.window, self.stride, self.dilation)  # (N, *positions, C·∏window)
        positions = rows.shape[1:-1]
        windows = rows.reshape(-1, self.channels, *self.window)
        parts = [self.head(part) for part in ([windows] if self.chunk is None else windows.split(self.chunk))]
        per_output = zip(*[[s for _, s in named_outputs(part)] for part in parts])
        maps = [torch.cat(pieces) for pieces in per_output]
        return like(parts[0], [channels_first(s.reshape(n, *positions, s.shape[1])) for s in maps])


@torch.inference_mode()
def sliding_window_reference(conversion: Conversion, x: torch.Tensor) -> Any:
    """The original head applied to every window of the original features of ``x``: (N, K, *map).

    For a conversion with a pooled output (``pool``) the map is pooled the same way: (N, K).
    A head with several outputs gives one such tensor per output, in the head's container.
    """
    return SlidingWindowHead(conversion, chunk=HEAD_CHUNK)(x)


@torch.inference_mode()
def atrous_reference(conversion: Conversion, x: torch.Tensor) -> Any:
    """For a conversion made with ``stride``: the original's own layers read à trous on ``x``, then its head on
    every window whose cells lie (total / stride) apart: (N, K, *map), the whole finer map."""
    return atrous_reading(conversion)(x)


class _MapRead(Exception):
    """Ends the original's run once the map the head reads has been computed."""


def eager_map_reader(original: nn.Module, conversion: Conversion) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The original's own map at the head's input, as its eager run computes it; None where no module computes it.

    A trunk captured by torch.export may hold a value fixed at the native size, and a head
    that reads a window cannot take a larger input, so the original's own output is no
    reference there. The map is read instead with a hook on the module whose call gives
    it (its call at the same place among its calls, for a module called more than once), and the run stops there.
    """
    graph = conversion.features.graph
    entry = next(node for node in graph.nodes if node.op == "output").args[0]
    if not isinstance(entry, fx.Node) or entry.op != "call_module":
        return None
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == entry.target]
    try:
        module = original.get_submodule(str(entry.target))
    except AttributeError:
        return None
    index = calls.index(entry)

    def read(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def keep(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            seen.append(output)
            if len(seen) > index:
                raise _MapRead

        handle = module.register_forward_hook(keep)
        try:
            original(x)
        except _MapRead:
            return seen[index]
        finally:
            handle.remove()
        raise RuntimeError(f"the original's run did not call {entry.target} {index + 1} times")

    return read


def atrous_reading(conversion: Conversion) -> SlidingWindowHead:
    """The original's own layers read à trous, and its head on windows whose cells lie (total / stride) apart."""
    plan = conversion.atrous
    features = AtrousReading(conversion.features, plan, len(plan.stride))
    return SlidingWindowHead(conversion, chunk=HEAD_CHUNK, features=features, dilation=plan.dilation)
