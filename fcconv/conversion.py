"""What a conversion reports about its head, whichever front end made it: shared by torch.fx and ONNX."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewrittenLayer:
    """One layer of the head as it was and as it became."""

    name: str
    before: str
    after: str
    in_map: tuple[int, ...]
    """Shape (C, *S) of the feature map the layer reads, per sample, at the native size."""
    kernel: tuple[int, ...]
    parameters: int
    note: str = ""


@dataclass(frozen=True)
class HeadGeometry:
    """Which part of the original's feature map one output position of the converted model reads.

    ``window`` is the spatial extent of that part in feature-map cells, ``stride``
    the step between neighbouring positions; ``window`` is None when the head keeps
    a global pooling and reads the whole map, whatever its size.
    """

    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    window: tuple[int, ...] | None
    stride: tuple[int, ...]
    dense: bool
    pool: str | None = None
    """'avg' or 'max' when a global pooling was appended to the score map (output (N, K))."""
    logits: bool = False
    """True when a trailing softmax, log-softmax or sigmoid was dropped from each output (raw scores)."""
    until: str | None = None
    """The head layer the model was ended at (its output is that layer's dense feature map), or None."""

    @property
    def mode(self) -> str:
        """``map`` when the output is the per-position score map, ``pooled`` when it is pooled over all positions."""
        return "pooled" if self.window is None or self.pool is not None else "map"
