"""Rewrite a classifier's fully connected head as convolutions, with torch.fx.

The model is traced, its shapes are propagated at the native input size, and the
place where the spatial axes are collapsed (a flatten, view or reshape, a mean
over the spatial axes, or a global pooling followed by a flatten) is located.
Everything before it is the *trunk* and is kept as it is. Everything after it is
the *head*: a graph of Linear layers and per-element or per-feature layers,
which is rewritten so that it acts on every position of a feature map:

* the first Linear after a flatten of a (C, *S) map becomes a convolution whose
  kernel is S; every later Linear a pointwise convolution of the same rank;
* BatchNorm1d becomes the BatchNorm of the map's rank (same parameters),
  softmax over the features becomes softmax over channels, element-wise layers
  stay as they are;
* an adaptive pooling that feeds the flatten is removed where it is the
  identity at the native size, replaced by the fixed pooling of the same effect
  where the map divides evenly, and otherwise folded into the first kernel.

The converted module's weights are reshaped views of the original's, not copies,
and its layers keep the original names (``classifier.0`` stays ``classifier.0``).
Anything that cannot be rewritten exactly raises :class:`NotConvertibleError`
naming the node and the reason.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcconv.capture import capture, lower_exported_program
from fcconv.conversion import HeadGeometry, RewrittenLayer
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.fx_edits import (
    _append_global_pool,
    _find,
    _replace_with_function,
    _replace_with_input,
    _replace_with_module,
    _set_kwarg,
    _set_target,
)
from fcconv.fx_head import FirstKernel, _permuted_flatten, _PermutedFlatten, walk_head
from fcconv.fx_nodes import (
    _AVG_POOL,
    _MAX_POOL,
    _SQUASHING_FUNCTIONS,
    _SQUASHING_METHODS,
    _SQUASHING_MODULES,
    _adaptive_pool,
    _ancestors,
    _arg,
    _descendants,
    _describe,
    _is_collapse,
    _is_reshape,
    _shape,
)
from fcconv.fx_trunk import (
    _adaptive_avg_fold,
    _find_gates,
    _Gate,
    _pointwise_linears,
    _pooled_chain,
    _probe_larger_input,
    _refuse_class_token,
    _refuse_size_dependent_trunk,
    _refuse_token_sequence,
    _size_generic_replacements,
)
from fcconv.head.interpret import refusal
from fcconv.head.order import feature_order

__all__ = [
    "Conversion", "HeadGeometry", "RewrittenLayer", "analyze", "convert", "lower_exported_program", "rewrite",
    "truncate",
]  # fmt: skip


@dataclass
class Conversion:
    """The result of :func:`rewrite`: the converted model and how it relates to the original.

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
    """The model the conversion computes: the given model, or, with ``logits`` or ``until``, its :func:`truncate` form
    (verification compares with this one)."""

    @property
    def fully_convolutional(self) -> bool:
        """True when the head holds no Linear layer: the model was fully convolutional already (SqueezeNet)."""
        return not self.layers

    @property
    def head_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)


# --- public entry points --------------------------------------------------------------------------


def convert(
    model: nn.Module,
    input_shape: tuple[int, ...] = (3, 224, 224),
    *,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
) -> nn.Module:
    """Return ``model`` as a fully convolutional module.

    ``input_shape`` is the native per-sample input (C, H, W), (C, L) or (C, D, H, W).
    At that size the output, flattened, equals the original (N, K) output; at any
    larger size it is (N, K, *map), one score vector per window of the original
    input. With ``dense=True`` a global pooling before the head is dropped and the
    output is the per-position score map instead of (N, K, 1, 1). With
    ``pool="avg"`` or ``"max"`` a global pooling is appended to the score map, so
    the output is (N, K) at any size (test-time pooling). With ``pointwise=True``
    the Linear layers of the trunk that act on each position of a channels-last
    map (ConvNeXt's and Swin's MLPs) become 1×1 convolutions too, with the
    permutations around them removed where that is exact. ``logits`` and ``until``
    convert the model as :func:`truncate` ends it: without its trailing softmax, or
    at a layer of its head.

    The result shares its weights with ``model`` (reshaped views, no copies).
    Raises :class:`~fcconv.errors.NotConvertibleError` when the head holds
    something that cannot be rewritten exactly, naming the node.

    Example::

        >>> import torchvision, fcconv
        >>> fcn = fcconv.convert(torchvision.models.vgg16(), (3, 224, 224))
        >>> fcn(torch.randn(1, 3, 448, 448)).shape
        torch.Size([1, 1000, 8, 8])
    """
    return rewrite(model, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until).module


def rewrite(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
) -> Conversion:
    """Like :func:`convert`, returning the :class:`Conversion` with what was rewritten."""
    source = truncate(model, input_shape, logits=logits, until=until) if logits or until else model
    plan = _plan(source, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until)
    module = _apply(plan)
    module.fcconv_geometry = plan.geometry
    return _conversion(plan, module, model, source)


def analyze(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
) -> Conversion:
    """Plan the rewrite without building the converted module (``module`` is the traced original)."""
    source = truncate(model, input_shape, logits=logits, until=until) if logits or until else model
    plan = _plan(source, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until)
    return _conversion(plan, plan.traced, model, source)


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
    )


# --- planning -------------------------------------------------------------------------------------


@dataclass
class _Plan:
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


def _propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    params = [p for p in gm.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        sample = torch.empty((2, *input_shape), dtype=dtype, device=device)
    try:
        # ShapeProp prints the traceback of a failing node itself; the error below says it in one line
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm, fake_mode=fake_mode).propagate(sample)
    except Exception as exc:  # noqa: BLE001 - the model refused this input; say so in one line
        shape = "×".join(map(str, input_shape))
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split())
        raise BadInputError(f"the model cannot take an input of shape {shape}: {text[:300]}") from exc


@dataclass
class _Located:
    """The traced model with its shapes at the native size, and the node that collapses its map to a vector."""

    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    rank: int
    gates: list[_Gate]
    collapse: fx.Node
    kind: str


def _locate_head(model: nn.Module, input_shape: tuple[int, ...]) -> _Located:
    """Capture ``model``, propagate its shapes and find where the head starts; refuse a model that has none."""
    rank = len(input_shape) - 1
    if rank not in (1, 2, 3) or any(s <= 0 for s in input_shape):
        raise BadInputError(f"input shape {input_shape} is not (C, L), (C, H, W) or (C, D, H, W) with positive sizes")
    gm = capture(model, input_shape)
    modules = dict(gm.named_modules())
    _refuse_size_dependent_trunk(gm, modules)
    _propagate_shapes(gm, input_shape)
    graph = gm.graph

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotConvertibleError(f"forward() takes {len(placeholders)} inputs; fcconv converts models with one input")

    # Only what is computed from the input can collapse the map (not, say, a table of position biases).
    live = _descendants(placeholders[0])
    gates = _find_gates(graph, modules, rank, live)
    in_gates = {n for gate in gates for n in gate.nodes}

    collapse = None
    for node in graph.nodes:
        if node not in live or node in in_gates:
            continue
        kind = _is_collapse(node, modules, rank)
        if kind is None:
            continue
        if kind == "other":
            src = _shape(node.args[0])
            raise NotConvertibleError(
                f"{_describe(node, modules)} turns the {'×'.join(map(str, src[1:]))} feature map into a vector "
                "in a way fcconv cannot read as sliding windows"
            )
        collapse = (node, kind)
        break
    if collapse is None:
        _refuse_token_sequence(gm, modules, rank, live, input_shape)
        _refuse_class_token(gm, modules, live, input_shape)
        out_shapes = [_shape(n) for n in graph.nodes if n.op == "output"]
        raise NotConvertibleError(
            "no flatten, view, reshape, mean or global pooling of a "
            f"{'(N, C, L)' if rank == 1 else '(N, C, H, W)' if rank == 2 else '(N, C, D, H, W)'} feature map "
            f"was found before the output{f' {out_shapes[0]}' if out_shapes and out_shapes[0] else ''}; "
            "either the model is already fully convolutional or its input has another rank than --input-shape"
        )
    return _Located(gm, modules, rank, gates, *collapse)


def _refuse_zero_width(model: nn.Module) -> None:
    """Refuse a Linear with no input or output features: a convolution needs at least one channel each way."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and 0 in (module.in_features, module.out_features):
            side = "output" if module.out_features == 0 else "input"
            raise NotConvertibleError(
                f"{name} is Linear({module.in_features} → {module.out_features}), with no {side} features: a "
                "convolution needs at least one channel in and out, so the model cannot be made fully convolutional"
            )


def _plan(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dense: bool,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
) -> _Plan:
    input_shape = tuple(int(s) for s in input_shape)
    if pool not in (None, "avg", "max"):
        raise BadInputError(f"pool {pool!r} is not avg or max")
    _refuse_zero_width(model)
    located = _locate_head(model, input_shape)
    gm, modules, rank = located.gm, located.modules, located.rank
    start = _head_start(located)
    if located.kind in ("global-avg", "global-max"):
        _plan_global_reduction(start, located, dense)
    else:
        _plan_flatten(start, located, dense)
    entry, collapse_node = start.entry, located.collapse
    walk = walk_head(gm, modules, collapse_node, rank, start.first_kernel())
    start.edits.extend(walk.edits)
    start.removed.extend(walk.removed)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not walk.layers and start.window is not None and math.prod(start.window) > 1:
        raise refusal("no-linear", collapse=collapse_node.name)
    if pool is not None:
        if len(output.all_input_nodes) != 1:
            raise NotConvertibleError("--pool: the model returns several tensors; a pooled output needs one")
        start.edits.append(_append_global_pool(pool, rank))

    geometry = HeadGeometry(
        input_shape=input_shape,
        feature_shape=(start.channels, *start.feature_size),
        window=tuple(start.window) if start.window is not None else None,
        stride=tuple(start.stride),
        dense=dense,
        pool=pool,
        logits=logits,
        until=until,
    )
    branches = [(name, _layers_on_path(value, walk.nodes, modules)) for name, value in _output_items(output.args[0])]
    trunk = _ancestors(entry)
    features, head = _split(gm, entry, trunk, collapse_node if located.kind == "flatten" else None)
    trunk_edits, trunk_layers, notes = _plan_trunk(located, start, features, input_shape, trunk, pointwise)
    return _Plan(
        gm, features, head, geometry, walk.layers, start.removed, [*start.edits, *trunk_edits], trunk_layers, notes,
        flatten_permutation=start.permuted.permutation if start.permuted is not None else None,
        carried=walk.carried, branches=branches, cut_points=_cut_points(walk.nodes, modules),
    )  # fmt: skip


@dataclass
class _HeadStart:
    """Where the head starts and how its collapse is rewritten: the map it reads, and the window one output
    position of the first Linear covers."""

    entry: fx.Node
    """The (N, C, *S) map the head reads."""
    channels: int
    feature_size: tuple[int, ...]
    pool_node: fx.Node | None = None
    pool_kind: str | None = None
    channel_axis: int = 1
    permuted: _PermutedFlatten | None = None
    edits: list[Callable[[fx.GraphModule], None]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    fold: Callable[[torch.Tensor], torch.Tensor] | None = None
    folded_pool: bool = False
    order: np.ndarray | None = None
    """For each flattened feature, the element of the (C, *S) window it reads; None for the map's own order."""
    window: tuple[int, ...] | None = None
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()

    def first_kernel(self) -> FirstKernel:
        read = _shape(self.pool_node)[2:] if self.folded_pool else self.kernel
        window = (self.channels, *read)
        order = np.arange(math.prod(window)) if self.order is None else self.order
        return FirstKernel(
            self.channels, tuple(self.kernel), window, order, tuple(self.feature_size), self.fold, self.folded_pool,
            self.notes,
        )  # fmt: skip


def _head_start(located: _Located) -> _HeadStart:
    """The map the head reads. An adaptive pooling that feeds the flatten belongs to the head, and so does a global
    pooling followed by layers that act on each position of the pooled map (ConvNeXt's LayerNorm2d, which permutes
    to channels-last, normalizes the channels and permutes back); a permutation before the flatten is undone."""
    modules, rank, collapse_node = located.modules, located.rank, located.collapse
    collapsed = collapse_node.args[0]
    assert isinstance(collapsed, fx.Node)
    flatten = located.kind == "flatten"
    pooled_chain = _pooled_chain(collapsed, modules, rank) if flatten else None
    permuted = None
    channel_axis = 1
    if pooled_chain is not None:
        pool_node, pool_kind, _, channel_axis = pooled_chain
        entry = pool_node.args[0]
    else:
        permuted = _permuted_flatten(collapsed, collapse_node, modules, rank) if flatten else None
        unpermuted = permuted.source if permuted is not None else collapsed
        pool_kind = _adaptive_pool(unpermuted, modules) if flatten else None
        if pool_kind is not None and len(unpermuted.users) == 1:
            pool_node, entry = unpermuted, unpermuted.args[0]
        else:
            pool_node, entry = None, unpermuted
    assert isinstance(entry, fx.Node)
    entry_shape = _shape(entry)
    if entry_shape is None or len(entry_shape) != rank + 2:
        raise NotConvertibleError(f"the head's input {entry.name} is not a feature map of rank {rank + 2}")
    return _HeadStart(
        entry, entry_shape[1], tuple(entry_shape[2:]), pool_node, pool_kind, channel_axis, permuted
    )  # fmt: skip


def _plan_global_reduction(start: _HeadStart, located: _Located, dense: bool) -> None:
    """A mean or amax over the spatial axes: kept with its dimensions (or, ``dense``, removed)."""
    collapse_node, rank = located.collapse, located.rank
    dims = _arg(collapse_node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    spatial_dims = {d % (rank + 2) for d in dims}
    keepdim = _arg(collapse_node, 2, "keepdim", False)
    if spatial_dims != set(range(2, rank + 2)) or keepdim:
        raise NotConvertibleError(
            f"{_describe(collapse_node, located.modules)} does not reduce exactly the spatial axes"
        )
    if dense:
        start.edits.append(_replace_with_input(collapse_node.name))
        start.removed.append(f"{collapse_node.name} (global {located.kind[7:]} pooling: dense map)")
        start.window = (1,) * rank
    else:
        start.edits.append(_set_kwarg(collapse_node.name, "keepdim", True, positional_index=2))
        start.window = None
    start.kernel = start.stride = (1,) * rank


def _plan_flatten(start: _HeadStart, located: _Located, dense: bool) -> None:
    """A flatten: the pooling before it, the permutation it reads the map through, and the flatten itself go."""
    modules, rank, collapse_node = located.modules, located.rank, located.collapse
    if start.pool_node is not None:
        _plan_adaptive_pool(start, located, dense)
    else:
        start.window, start.kernel, start.stride = start.feature_size, start.feature_size, (1,) * rank
    permuted = start.permuted
    if permuted is not None:
        for step in permuted.nodes:
            start.edits.append(_replace_with_input(step.name))
            start.removed.append(f"{_describe(step, modules)} (undone in the first Linear's kernel)")
        if permuted.permutation is not None:
            axes = [axis - 1 for axis in permuted.permutation[1:]]
            start.order = feature_order(_shape(permuted.source)[1:], [("transpose", axes)])
            shown = ", ".join(map(str, permuted.permutation))
            start.notes["permutation"] = f"weight re-ordered (a copy) to undo the flatten's permute({shown})"
    if start.channel_axis != 1:
        # the pooled map reached the flatten channels-last: (N, 1, 1, C) read as (N, C, 1, 1)
        start.edits.append(_replace_with_function(collapse_node.name, torch.movedim, start.channel_axis, 1))
        start.removed.append(f"{_describe(collapse_node, modules)} (a permutation back to channels-first instead)")
    else:
        start.edits.append(_replace_with_input(collapse_node.name))
        start.removed.append(_describe(collapse_node, modules))


def _plan_adaptive_pool(start: _HeadStart, located: _Located, dense: bool) -> None:
    """An adaptive pooling before the flatten: removed where it is the identity (or, ``dense``, a global pooling),
    a fixed pooling where the map divides evenly, else (average) folded into the first kernel."""
    rank, pool_node, pool_kind, feature_size = located.rank, start.pool_node, start.pool_kind, start.feature_size
    ones = (1,) * rank
    pooled = _shape(pool_node)[2:]
    pool_name = pool_node.target if pool_node.op == "call_module" else _describe(pool_node, located.modules)
    if all(p == 1 for p in pooled) and dense:
        start.edits.append(_replace_with_input(pool_node.name))
        start.removed.append(f"{pool_name} (global {pool_kind} pooling: dense map)")
        start.window, start.kernel, start.stride = ones, ones, ones
    elif all(p == 1 for p in pooled):
        start.window, start.kernel, start.stride = None, ones, ones
    elif pooled == feature_size:
        start.edits.append(_replace_with_input(pool_node.name))
        start.removed.append(f"{pool_name} (identity at the native size)")
        start.window, start.kernel, start.stride = feature_size, feature_size, ones
    elif all(f % p == 0 for f, p in zip(feature_size, pooled)):
        factor = tuple(f // p for f, p in zip(feature_size, pooled))
        pool_cls = (_AVG_POOL if pool_kind == "avg" else _MAX_POOL)[rank]
        start.edits.append(_replace_with_module(pool_node, pool_cls(kernel_size=factor, stride=factor)))
        start.notes["pool"] = f"{pool_name} → {pool_cls.__name__}({'×'.join(map(str, factor))})"
        start.window, start.kernel, start.stride = feature_size, pooled, factor
    elif pool_kind == "avg":
        start.fold = _adaptive_avg_fold(start.channels, feature_size, pooled)
        start.folded_pool = True
        start.edits.append(_replace_with_input(pool_node.name))
        start.removed.append(f"{pool_name} (folded into the first kernel)")
        start.window, start.kernel, start.stride = feature_size, feature_size, ones
    else:
        raise NotConvertibleError(
            f"{pool_name} max-pools a {'×'.join(map(str, feature_size))} map to "
            f"{'×'.join(map(str, pooled))}, which does not divide evenly and is not linear"
        )


def _plan_trunk(
    located: _Located,
    start: _HeadStart,
    features: fx.GraphModule,
    input_shape: tuple[int, ...],
    trunk: set[fx.Node],
    pointwise: bool,
) -> tuple[list[Callable[[fx.GraphModule], None]], list[RewrittenLayer], list[str]]:
    """The trunk's edits: gates, per-position Linear layers, size-generic replacements; refuses a trunk whose map
    does not keep its channels at a larger input."""
    gm, modules, rank, entry = located.gm, located.modules, located.rank, start.entry
    # The trunk is kept, so it must take larger inputs: run it at twice the native size (shapes only).
    larger = _probe_larger_input(features, input_shape, modules)
    if entry.name in larger and larger[entry.name][1] != start.channels:
        raise NotConvertibleError(
            f"{_describe(located.collapse, modules)} flattens a permuted map: axis 1 of {entry.name} is "
            f"{start.channels} at the native size and {larger[entry.name][1]} at twice it, so it is not the "
            "channel axis of an (N, C, H, W) map and the flatten has no sliding-window reading"
        )
    edits: list[Callable[[fx.GraphModule], None]] = []
    trunk_layers: list[RewrittenLayer] = []
    notes: list[str] = []
    for gate in located.gates:
        edits.extend(gate.edits)
        trunk_layers.extend(gate.layers)
    in_gates = {n for gate in located.gates for n in gate.nodes}
    found, pointwise_edits = _pointwise_linears(gm, modules, rank, trunk - in_gates, larger, rewrite=pointwise)
    trunk_layers.extend(found)
    edits.extend(pointwise_edits)
    replacements = _size_generic_replacements()
    replaced: dict[Callable[..., Any], int] = {}
    for node in gm.graph.nodes:
        if node in trunk and node.op == "call_function" and node.target in replacements:
            edits.append(_set_target(node.name, replacements[node.target]))
            replaced[node.target] = replaced.get(node.target, 0) + 1
    for function, count in replaced.items():
        new = replacements[function]
        notes.append(
            f"{count} call{'s' if count > 1 else ''} of {function.__module__}.{function.__name__} computed by "
            f"{new.__module__}.{new.__name__}: the same values, with its size-dependent choices kept in the export"
        )
    return edits, trunk_layers, notes


# --- permuted flattens, outputs, and where a head may be ended ---------------------------------


def _output_items(value: Any) -> list[tuple[str, fx.Node]]:
    """The nodes the graph's output returns, named as :func:`fcconv.outputs.named_outputs` names a model's outputs."""
    from fcconv.outputs import named_items

    return [(name, item) for name, item in named_items(value, fx.Node) or [] if isinstance(item, fx.Node)]


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node a person would call a layer of the head: a module other than dropout and identity, or a softmax."""
    if node.op == "call_module":
        return not isinstance(modules[node.target], (nn.Dropout, nn.AlphaDropout, nn.Identity))
    return _is_squashing(node, modules)


def _layer_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _layers_on_path(value: fx.Node, head_nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[str]:
    """The head layers ``value`` is computed through, in graph order."""
    ancestors = _ancestors(value)
    return [_layer_name(n) for n in head_nodes if n in ancestors and _is_layer(n, modules)]


def _cut_points(head_nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[str]:
    """The head's module layers from its first Linear on: where :func:`truncate` may end the model."""
    linears = {n for n in head_nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)}
    names: list[str] = []
    for node in head_nodes:
        if node.op == "call_module" and (node in linears or _ancestors(node) & linears):
            if node.target not in names:
                names.append(str(node.target))
    return names


def _is_squashing(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A softmax, log-softmax or sigmoid: what turns raw scores into probabilities."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _SQUASHING_MODULES)
    if node.op == "call_function":
        return node.target in _SQUASHING_FUNCTIONS
    return node.op == "call_method" and node.target in _SQUASHING_METHODS


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node that hands its input on unchanged in value: dropout in eval, identity, a no-op reshape or copy."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Dropout, nn.AlphaDropout, nn.Identity))
    if node.op == "call_method" and node.target in ("contiguous", "float"):
        return True
    return _is_reshape(node, modules) and _shape(node) == _shape(node.args[0])


def truncate(
    model: nn.Module, input_shape: tuple[int, ...], *, logits: bool = False, until: str | None = None
) -> fx.GraphModule:
    """``model`` ended earlier: at the head layer ``until``, and (``logits``) before a trailing softmax.

    ``until`` names a layer of the head from its first Linear on (``classifier.4``,
    VGG16's fc7 ReLU): the model's one output becomes that layer's output.
    ``logits`` drops the softmax, log-softmax or sigmoid each output ends in, so the
    outputs hold the raw scores. The result is a graph module sharing ``model``'s
    weights; converting it (and verifying against it) gives the dense map of that
    cut point. Raises :class:`~fcconv.errors.BadInputError` for an ``until`` that is
    not a layer of the head, listing those that are, and for ``logits`` on a model
    none of whose outputs ends in a softmax, log-softmax or sigmoid.
    """
    located = _locate_head(model, tuple(int(s) for s in input_shape))
    gm, modules = located.gm, located.modules
    head_nodes = [n for n in gm.graph.nodes if n in _descendants(located.collapse) and n is not located.collapse]
    cut = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=f"Truncated{type(model).__name__}")
    output = next(n for n in cut.graph.nodes if n.op == "output")
    dropped: list[str] = []
    if until is not None:
        accepted = _cut_points(head_nodes, modules)
        if until not in accepted:
            raise BadInputError(
                f"--until {until!r} is not a layer of the head; it accepts {', '.join(accepted) or 'none'}"
            )
        end = next(n for n in head_nodes if n.op == "call_module" and n.target == until)
        output.args = (_find(cut, end.name),)
        dropped.append(f"everything after {until} (--until {until})")
    if logits:
        items = _output_items(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        if until is not None:
            items = [(name, _find(gm, node.name)) for name, node in _output_items(output.args[0])]
        found, ends = [], []
        for name, value in items:
            node = value
            while _is_passthrough(node, modules) and isinstance(node.args[0], fx.Node):
                node = node.args[0]
            if _is_squashing(node, modules):
                found.append(node)
            else:
                ends.append(f"{name} ends in {_describe(node, modules)}")
        if not found:
            raise BadInputError(
                f"--logits: no output ends in a softmax, log-softmax or sigmoid to drop ({'; '.join(ends)})"
            )
        for node in dict.fromkeys(found):
            _replace_with_input(node.name)(cut)
            dropped.append(f"{_describe(node, modules)} (--logits: the raw scores instead)")
    cut.graph.eliminate_dead_code()
    cut.delete_all_unused_submodules()
    cut.recompile()
    cut.fcconv_truncated = dropped
    return cut.eval()


def _split(
    gm: fx.GraphModule, entry: fx.Node, trunk: set[fx.Node], flatten: fx.Node | None
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut the traced original at ``entry``: (features: input -> entry, head: entry -> output).

    The head's flatten is written as ``torch.flatten(x, 1)``: at the native size it is
    that (the plan checked it), and the original may have spelt it with the input's
    batch size (``x.view(x.shape[0], -1)``), which the head, fed a batch of windows,
    must not use.
    """
    features_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in trunk:
            env[node] = features_graph.node_copy(node, lambda n: env[n])
    features_graph.output(env[entry])

    head_graph = fx.Graph()
    henv: dict[fx.Node, fx.Node] = {entry: head_graph.placeholder("features")}
    downstream = _descendants(entry)
    for node in gm.graph.nodes:
        if node is entry or not (node in downstream or node.op == "get_attr"):
            continue
        if node is flatten:
            henv[node] = head_graph.call_function(torch.flatten, (henv[node.args[0]], 1))
            continue
        henv[node] = head_graph.node_copy(node, lambda n: henv[n])
    features = fx.GraphModule(gm, features_graph, class_name="Features")
    head = fx.GraphModule(gm, head_graph, class_name="Head")
    head.graph.eliminate_dead_code()
    head.recompile()
    return features, head


# --- applying the plan ----------------------------------------------------------------------------


def _apply(plan: _Plan) -> fx.GraphModule:
    gm = fx.GraphModule(plan.traced, plan.traced.graph.__deepcopy__(), class_name="FullyConvolutional")
    # node names survive the deep copy, which is what the edits look up
    for edit in plan.edits:
        edit(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    bind_submodules(gm)
    return gm


def bind_submodules(gm: fx.GraphModule) -> None:
    """Make each submodule lookup in ``gm``'s generated forward a plain attribute read.

    That forward reaches every layer as ``getattr(self.features, "0")``, and each
    step goes through ``nn.Module.__getattr__``, a Python call: for VGG16's 38
    layers about 50 µs per forward on a fast host, 3 % of its batch-1 latency on
    a GPU, where the host sets the pace. Binding the children of ``gm`` and of the
    containers torch.fx built for it as instance attributes skips that call. The
    original model's own modules are left alone; ``nn.Module.__setattr__`` drops
    a binding when its child is replaced, so the bindings cannot go stale that way.
    """
    pending: list[nn.Module] = [gm]
    while pending:
        parent = pending.pop()
        for name, child in parent.named_children():
            parent.__dict__[name] = child
            if type(child) is nn.Module:  # a container torch.fx made for a dotted target
                pending.append(child)
