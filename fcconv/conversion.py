"""What a conversion reports about its head, whichever front end made it: shared by torch.fx and ONNX; and the
torch.fx front end's plan and result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the ONNX front end uses this module without torch
    from torch import fx, nn

    from fcconv.atrous import AtrousPlan


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
class FactoredLayer:
    """A fully connected layer of the head made two convolutions by ``--rank`` (:mod:`fcconv.low_rank`)."""

    name: str
    rank: int
    full_rank: int
    """The layer's smaller dimension: the largest rank it has."""
    energy: float
    """The share of the sum of its squared singular values that the kept ones hold."""
    parameters: int
    factored_parameters: int
    macs: int
    factored_macs: int
    """Multiply-adds per output position, before and after."""


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
    added_axes: tuple[int, ...] = ()
    """Spatial axes of the feature map (0 is its first) that a channel-free input (L,) does not have: the model added
    them (``x.unsqueeze(1).unsqueeze(-1)`` before a Conv2d), they keep their size at every input length, and the
    output holds one position along each, squeezed from it: the score map is (N, K, positions along L)."""

    @property
    def mode(self) -> str:
        """``map`` when the output is the per-position score map, ``pooled`` when it is pooled over all positions."""
        return "pooled" if self.window is None or self.pool is not None else "map"


class RewrittenHead:
    """What both front ends' results say of their ``layers``: the fully connected layers rewritten."""

    layers: list[RewrittenLayer]

    @property
    def fully_convolutional(self) -> bool:
        """True when the head holds no fully connected layer: the model was fully convolutional already
        (SqueezeNet)."""
        return not self.layers

    @property
    def head_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)


@dataclass
class Conversion(RewrittenHead):
    """The result of :func:`fcconv.rewrite.rewrite`: the converted model and how it relates to the original.

    ``features`` and ``head`` are the original model cut at the head's input: the
    verifier runs ``features`` on a large input and slides ``head`` over it.
    """

    module: fx.GraphModule
    features: fx.GraphModule
    head: fx.GraphModule
    geometry: HeadGeometry
    layers: list[RewrittenLayer] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    total_parameters: int = 0
    trunk_layers: list[RewrittenLayer] = field(default_factory=list)
    """Linear layers of the trunk that act per position: squeeze-and-excitation layers (always rewritten) and
    Linear layers over a channels-last map (rewritten with ``pointwise=True``, otherwise listed and kept)."""
    notes: list[str] = field(default_factory=list)
    """Other changes to the trunk, each the same function computed in a form an export keeps at every size."""
    flatten_permutation: tuple[int, ...] | None = None
    """The permutation of the (N, C, *S) map the flatten read (``(0, 2, 3, 1)`` for channels-last), undone by
    re-ordering the first Linear's weight; None when the flatten read the map as it is."""
    carried: list[str] = field(default_factory=list)
    """The head's per-feature layers and how each carries over to every position of the map."""
    branches: list[tuple[str, list[str]]] = field(default_factory=list)
    """Each output (named as :func:`fcconv.outputs.output_names` names them) and the head layers on its path."""
    cut_points: list[str] = field(default_factory=list)
    """The head layers a model may be ended at (``until``): the first Linear and every layer after it."""
    source: nn.Module | None = None
    """The model the conversion computes: the given model, or, with ``logits`` or ``until``, its
    :func:`fcconv.rewrite.truncate` form (verification compares with this one)."""
    factored: list[FactoredLayer] = field(default_factory=list)
    """The head's fully connected layers made rank-R pairs by ``--rank``: the model is then an approximation of the
    original, verified against the original with those layers' weights truncated (:mod:`fcconv.low_rank`)."""
    captured_by: str | None = None
    """The capture the plan was made from: ``"torch.export"`` or ``"torch.fx"`` (None for a graph module given as
    it is). Verification compares an exported model with its eager original at the larger sizes too."""
    atrous: AtrousPlan | None = None
    """With ``stride``: the layers rewritten à trous and the output stride (:mod:`fcconv.atrous`); verification
    reads the original's own layers à trous (:class:`fcconv.atrous.AtrousReading`)."""


@dataclass
class _Plan:
    """What the torch.fx front end decided for one model: the edits to apply and what the conversion reports."""

    traced: fx.GraphModule
    features: fx.GraphModule
    head: fx.GraphModule
    geometry: HeadGeometry
    layers: list[RewrittenLayer]
    removed: list[str]
    edits: list[Callable[[fx.GraphModule], None]]
    trunk_layers: list[RewrittenLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flatten_permutation: tuple[int, ...] | None = None
    carried: list[str] = field(default_factory=list)
    branches: list[tuple[str, list[str]]] = field(default_factory=list)
    cut_points: list[str] = field(default_factory=list)
    captured_by: str | None = None


def _conversion(plan: _Plan, module: fx.GraphModule, model: nn.Module, source: nn.Module) -> Conversion:
    removed = [*getattr(source, "fcconv_truncated", []), *plan.removed]
    return Conversion(
        module=module,
        features=plan.features,
        head=plan.head,
        geometry=plan.geometry,
        layers=plan.layers,
        removed=removed,
        total_parameters=sum(p.numel() for p in model.parameters()),
        trunk_layers=plan.trunk_layers,
        notes=plan.notes,
        flatten_permutation=plan.flatten_permutation,
        carried=plan.carried,
        branches=plan.branches,
        cut_points=plan.cut_points,
        source=source,
        captured_by=plan.captured_by,
    )
