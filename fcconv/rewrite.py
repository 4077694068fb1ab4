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
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcconv.atrous import rewrite_atrous
from fcconv.capture import CAPTURED_BY, FIXED_BATCH, FX, captures, lower_exported_program, state_kept
from fcconv.conversion import Conversion, HeadGeometry, RewrittenLayer, _conversion, _Plan
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.fx_cut import _cut_points, _layers_on_path, _output_items, _split, end_early
from fcconv.fx_edits import (
    _append_global_pool,
    _apply,
    _replace_with_function,
    _replace_with_input,
    _replace_with_module,
    _set_kwarg,
    _set_target,
    _squeeze_outputs,
)
from fcconv.fx_head import FirstKernel, _permuted_flatten, _PermutedFlatten, walk_head
from fcconv.fx_nodes import (
    _AVG_POOL,
    _MAX_POOL,
    _adaptive_pool,
    _ancestors,
    _arg,
    _descendants,
    _describe,
    _is_collapse,
    _shape,
)
from fcconv.fx_refusals import _refuse_unverifiable_fixed_axes, _refuse_vector_input, _refuse_zero_width
from fcconv.fx_tokens import _refuse_class_token, _refuse_token_mixing, _refuse_token_sequence
from fcconv.fx_trunk import (
    _adaptive_avg_fold,
    _find_gates,
    _Gate,
    _pointwise_linears,
    _pool_channels_first,
    _pooled_chain,
    _probe_larger_input,
    _refuse_size_dependent_trunk,
    _size_generic_replacements,
)
from fcconv.head.interpret import refusal
from fcconv.head.order import feature_order

__all__ = [
    "Conversion", "HeadGeometry", "RewrittenLayer", "analyze", "convert", "lower_exported_program", "rewrite",
    "truncate",
]  # fmt: skip


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
    stride: int | tuple[int, ...] | None = None,
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
    at a layer of its head. With ``stride`` (a divisor of the model's total stride,
    one for all axes or one per axis) the trunk is rewritten à trous
    (:mod:`fcconv.atrous`): the map holds one score vector every ``stride`` pixels.

    The result shares its weights with ``model`` (reshaped views, no copies).
    Raises :class:`~fcconv.errors.NotConvertibleError` when the head holds
    something that cannot be rewritten exactly, naming the node.

    Example::

        >>> import torchvision, fcconv
        >>> fcn = fcconv.convert(torchvision.models.vgg16(), (3, 224, 224))
        >>> fcn(torch.randn(1, 3, 448, 448)).shape
        torch.Size([1, 1000, 8, 8])
    """
    options = dict(dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until, stride=stride)
    return rewrite(model, input_shape, **options).module


def rewrite(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
    stride: int | tuple[int, ...] | None = None,
) -> Conversion:
    """Like :func:`convert`, returning the :class:`Conversion` with what was rewritten."""
    source = truncate(model, input_shape, logits=logits, until=until) if logits or until else model
    plan = _plan(source, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until)
    module = _apply(plan)
    module.fcconv_geometry = plan.geometry
    conversion = _conversion(plan, module, model, source)
    if stride is not None:
        conversion.atrous = rewrite_atrous(conversion, stride)
    return conversion


def analyze(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
    stride: int | tuple[int, ...] | None = None,
) -> Conversion:
    """Plan the rewrite without building the converted module (``module`` is the traced original).

    With ``stride`` the converted module is built after all: the à-trous plan is made on its graph.
    """
    if stride is not None:
        return rewrite(model, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until,
                       stride=stride)  # fmt: skip
    source = truncate(model, input_shape, logits=logits, until=until) if logits or until else model
    plan = _plan(source, input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until)
    return _conversion(plan, plan.traced, model, source)


_T = TypeVar("_T")

# --- planning -------------------------------------------------------------------------------------


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
        fixed = gm.meta.get(FIXED_BATCH)
        if fixed is not None and _takes_batch(gm, input_shape, fixed, dtype, device):
            raise BadInputError(
                f"the program was exported with its batch fixed at {fixed} and computes with that size ({text[:200]}), "
                "so no converted model could take another batch; export it with a free batch "
                "(dynamic_shapes={0: torch.export.Dim('batch')}) and convert that"
            ) from exc
        raise BadInputError(f"the model cannot take an input of shape {shape}: {text[:300]}") from exc


def _takes_batch(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int, dtype: Any, device: Any) -> bool:
    """Whether ``gm``'s shapes propagate at ``batch`` (the batch a program was exported with), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        sample = torch.empty((batch, *input_shape), dtype=dtype, device=device)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm, fake_mode=fake_mode).propagate(sample)
    except Exception:  # noqa: BLE001 - it does not take that batch either
        return False
    return True


@dataclass
class _Located:
    """The traced model with its shapes at the native size, and the node that collapses its map to a vector."""

    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    rank: int
    gates: list[_Gate]
    collapse: fx.Node
    kind: str


def _from_first_capture(model: nn.Module, input_shape: tuple[int, ...], planned: Callable[[fx.GraphModule], _T]) -> _T:
    """``planned(graph)`` for the first of :func:`fcconv.capture.captures` it does not refuse.

    torch.export's graph comes first; where its plan is refused (or fails), the next
    capture's is tried. When every plan is refused, torch.fx's refusal is raised where fx
    could trace the model (its graph keeps each layer as the model wrote it), otherwise
    the export's.
    """
    if len(input_shape) not in (1, 2, 3, 4) or any(s <= 0 for s in input_shape):
        raise BadInputError(
            f"input shape {input_shape} is not (L,), (C, L), (C, H, W) or (C, D, H, W) with positive sizes"
        )
    refusals: dict[str | None, Exception] = {}
    with state_kept(model):
        for gm in captures(model, input_shape):
            try:
                return planned(gm)
            except Exception as refused:  # noqa: BLE001 - the next capture may be planned; raised below if none is
                refusals.setdefault(gm.meta.get(CAPTURED_BY), refused)
    raise refusals.get(FX) or next(iter(refusals.values()))


def _trunk_with_its_checks(gm: fx.GraphModule, entry: fx.Node) -> set[fx.Node]:
    """The nodes that compute the map at ``entry``, with the model's own checks on them (``torch._assert`` that
    the input's size suits the model, as timm's HaloNet asserts that its attention blocks tile the map).

    A check computes nothing the map needs, so it is no ancestor of ``entry``; without it the trunk would
    run at sizes the model refuses, and compute there what the model never does.
    """
    trunk = _ancestors(entry)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    head = (_descendants(entry) - {entry}) & _ancestors(output)
    for node in gm.graph.nodes:
        if node.op == "call_function" and not node.users and node.is_impure():
            checked = _ancestors(node)
            if not checked & head:
                trunk |= checked
    return trunk


def _locate_head(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> _Located:
    """Propagate the captured model's shapes and find where the head starts; refuse a model that has none.

    The head's map has the input's rank, except for a channel-free input (L,): the model adds its axes itself, and
    the map's rank is that of the first map (of rank 1, 2 or 3) collapsed to a vector.
    """
    modules = dict(gm.named_modules())
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        names = ", ".join(str(n.target) for n in placeholders)
        raise NotConvertibleError(
            f"forward() takes {len(placeholders)} inputs ({names}); fcconv converts models with one input"
        )
    _refuse_size_dependent_trunk(gm, modules)
    _propagate_shapes(gm, input_shape)
    if len(input_shape) > 1 and _pool_channels_first(gm, input_shape):
        _propagate_shapes(gm, input_shape)

    # Only what is computed from the input can collapse the map (not, say, a table of position biases).
    live = _descendants(placeholders[0])
    order = {node: index for index, node in enumerate(graph.nodes)}
    ranks = (len(input_shape) - 1,) if len(input_shape) > 1 else (1, 2, 3)
    found = [_first_collapse(graph, modules, r, live) for r in ranks]
    rank, gates, collapse = min(found, key=lambda f: order[f[2][0]] if f[2] is not None else len(order))
    if collapse is not None:
        node, kind = collapse
        if kind == "other":
            src = _shape(node.args[0])
            raise NotConvertibleError(
                f"{_describe(node, modules)} turns the {'×'.join(map(str, src[1:]))} feature map into a vector "
                "in a way fcconv cannot read as sliding windows"
            )
    if collapse is None:
        _refuse_token_sequence(gm, modules, rank, live, input_shape)
        _refuse_class_token(gm, modules, live, input_shape)
        if len(input_shape) == 1:
            _refuse_vector_input(gm, modules, placeholders[0], input_shape)
        _refuse_token_mixing(gm, modules, live, input_shape)
        out_shapes = [_shape(n) for n in graph.nodes if n.op == "output"]
        maps = "(N, C, L)" if rank == 1 else "(N, C, H, W)" if rank == 2 else "(N, C, D, H, W)"
        raise NotConvertibleError(
            "no flatten, view, reshape, mean or global pooling of a "
            f"{'(N, C, *S)' if len(input_shape) == 1 else maps} feature map "
            f"was found before the output{f' {out_shapes[0]}' if out_shapes and out_shapes[0] else ''}; "
            "either the model is already fully convolutional or its input has another rank than --input-shape"
        )
    return _Located(gm, modules, rank, gates, *collapse)


def _first_collapse(
    graph: fx.Graph, modules: dict[str, nn.Module], rank: int, live: set[fx.Node]
) -> tuple[int, list[_Gate], tuple[fx.Node, str] | None]:
    """(rank, the gates, the first node outside them that collapses a map of that rank to a vector and its kind)."""
    gates = _find_gates(graph, modules, rank, live)
    in_gates = {n for gate in gates for n in gate.nodes}
    for node in graph.nodes:
        if node in live and node not in in_gates:
            kind = _is_collapse(node, modules, rank)
            if kind is not None:
                return rank, gates, (node, kind)
    return rank, gates, None


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
    options = dict(dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until)
    return _from_first_capture(model, input_shape, lambda gm: _plan_graph(gm, input_shape, **options))


def _plan_graph(
    gm: fx.GraphModule,
    input_shape: tuple[int, ...],
    *,
    dense: bool,
    pool: str | None,
    pointwise: bool,
    logits: bool,
    until: str | None,
) -> _Plan:
    located = _locate_head(gm, input_shape)
    modules, rank = located.modules, located.rank
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
    _refuse_unverifiable_fixed_axes(gm, geometry)
    branches = [(name, _layers_on_path(value, walk.nodes, modules)) for name, value in _output_items(output.args[0])]
    trunk = _trunk_with_its_checks(gm, entry)
    features, head = _split(gm, entry, trunk, collapse_node if located.kind == "flatten" else None)
    trunk_edits, trunk_layers, notes, larger = _plan_trunk(located, start, features, input_shape, trunk, pointwise)
    if len(input_shape) == 1:
        geometry = replace(geometry, added_axes=_added_axes(located, start, input_shape, larger))
        if geometry.added_axes and pool is None:
            start.edits.append(_squeeze_outputs(geometry.added_axes))
    return _Plan(
        gm, features, head, geometry, walk.layers, start.removed, [*start.edits, *trunk_edits], trunk_layers, notes,
        flatten_permutation=start.permuted.permutation if start.permuted is not None else None,
        carried=walk.carried, branches=branches, cut_points=_cut_points(walk.nodes, modules),
        captured_by=gm.meta.get(CAPTURED_BY),
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


def _added_axes(
    located: _Located, start: _HeadStart, input_shape: tuple[int, ...], larger: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """The axes of the head's map that a channel-free input (L,) does not have: all but the one that follows the
    length (the first, where none does). Refuses a map with several axes that follow the length, and one whose
    output would hold more than one position along an added axis."""
    entry, modules = start.entry, located.modules
    native, twice = _shape(entry)[2:], larger.get(entry.name, ())[2:]
    if len(twice) != len(native):
        return ()
    growing = [axis for axis, (n, t) in enumerate(zip(native, twice)) if t != n]
    shown = "×".join(map(str, _shape(entry)[1:]))
    if len(growing) > 1:
        raise NotConvertibleError(
            f"the head reads the {shown} map {_describe(entry, modules)}, whose axes "
            f"{' and '.join(str(2 + a) for a in growing)} each follow the input's length (at twice the native "
            f"{input_shape[0]} samples it is {'×'.join(map(str, larger[entry.name][1:]))}): the score map of a "
            "channel-free input runs along one axis, so the model has no fully convolutional form fcconv can give"
        )
    kept = growing[0] if growing else 0
    added = tuple(axis for axis in range(len(native)) if axis != kept)
    for axis in added:
        positions = 1 if start.window is None else (native[axis] - start.window[axis]) // start.stride[axis] + 1
        if positions != 1:
            raise NotConvertibleError(
                f"axis {2 + axis} of the head's {shown} map {_describe(entry, modules)} is {native[axis]} at every "
                f"input length, an axis the channel-free input does not have, and the score map would hold {positions} "
                "positions along it where it runs along the length alone; keep the global pooling (no --dense) or "
                "pool that axis in forward()"
            )
    return added


def _plan_trunk(
    located: _Located,
    start: _HeadStart,
    features: fx.GraphModule,
    input_shape: tuple[int, ...],
    trunk: set[fx.Node],
    pointwise: bool,
) -> tuple[list[Callable[[fx.GraphModule], None]], list[RewrittenLayer], list[str], dict[str, tuple[int, ...]]]:
    """The trunk's edits: gates, per-position Linear layers, size-generic replacements; refuses a trunk whose map
    does not keep its channels at a larger input. Also the trunk's shapes at twice the native size."""
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
    return edits, trunk_layers, notes, larger


# --- ending a model earlier --------------------------------------------------------------------


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
    shape = tuple(int(s) for s in input_shape)
    located = _from_first_capture(model, shape, lambda gm: _locate_head(gm, shape))
    return end_early(located, type(model).__name__, logits=logits, until=until)
