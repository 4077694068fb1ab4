"""The head vocabulary: what a node after the collapse does, as the rules that rewrite it need to know.

Each front end (torch.fx in :mod:`fcconv.fx_head`, ONNX in :mod:`fcconv.onnx_head`) maps its nodes to
:class:`HeadOp` values; :mod:`fcconv.head.interpret` decides each of them. Nothing here knows either graph format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    """What one head operation does to the features it reads."""

    ELEMENTWISE = "element-wise"
    """The same function of each feature alone (activations, dropout, arithmetic with one number)."""
    PER_FEATURE = "per-feature"
    """A function of each feature with its own parameters, or a normalization over the features (BatchNorm1d,
    PReLU with one slope per feature, LayerNorm over the features)."""
    CHANNEL_SOFTMAX = "channel softmax"
    """A softmax or log-softmax, which needs all of one position's features."""
    SQUASHING = "squashing"
    """An element-wise function that turns scores into probabilities (sigmoid): carried as element-wise."""
    LINEAR = "linear"
    """A matrix product with the features: the layers that become convolutions."""
    NOOP_RESHAPE = "no-op reshape"
    """A reshape that changes nothing at the native size; on the map it would flatten the positions, so it goes."""
    BINARY_CONSTANT = "binary with a constant"
    """Arithmetic of a head tensor with a constant: one value, or one per feature."""
    BINARY = "binary"
    """Arithmetic of two head tensors."""
    COLLAPSE = "collapse"
    """A flatten of a map to a vector."""
    GLOBAL_POOL = "global pool"
    """A pooling over all positions."""
    LAYOUT = "layout"
    """A transpose or a reshape that moves features."""
    OTHER = "other"
    """Anything else; ``reason`` (a key of :data:`fcconv.head.interpret.REASONS`) says why it is refused."""


class Family(enum.Enum):
    """What a per-feature operation holds, for the reason it is refused on a flattened window."""

    NONE = ""
    SLOPES = "slopes"
    NORMALIZATION = "normalization"
    CONSTANT = "constant"


@dataclass(frozen=True)
class HeadOp:
    """One operation of the head, as the interpreter reads it.

    ``label`` names it in messages (the node and where it stands); ``reads`` and ``writes`` are the head tensors it
    reads and computes, by any names unique to the front end. Only the facts a rule needs are filled in.
    """

    label: str
    kind: Kind
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    in_features: int | None = None
    """LINEAR: the features it reads."""
    out_features: int | None = None
    """LINEAR: the features it computes."""
    constants: tuple[tuple[int, ...], ...] = ()
    """PER_FEATURE and BINARY_CONSTANT: the shapes of its constants (one value, or one per feature)."""
    over_features: bool = True
    """CHANNEL_SOFTMAX and PER_FEATURE normalizations: whether it is taken over the feature axis."""
    family: Family = Family.NONE
    """PER_FEATURE (and OTHER): what it holds, for the reason it is refused on a flattened window."""
    reason: str = "no-equivalent"
    """OTHER: why it is refused, a key of :data:`fcconv.head.interpret.REASONS`."""
    detail: tuple[tuple[str, object], ...] = ()
    """OTHER: the values its reason's text names (``(("name", "w"),)``)."""
