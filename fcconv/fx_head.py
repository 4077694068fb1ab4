"""The torch.fx front end of the head: each node after the collapse as a head operation, and the interpreter's
decisions as edits of the traced graph.

:func:`head_op` is the one mapping from fx nodes to :mod:`fcconv.head.vocabulary`; :func:`walk_head` runs
:func:`fcconv.head.interpret.interpret` over the head and turns each decision into an edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv.conversion import RewrittenLayer
from fcconv.errors import NotConvertibleError
from fcconv.fx_edits import (
    _replace_batchnorm,
    _replace_linear,
    _replace_submodule,
    _replace_with_input,
    _replace_with_module,
    _reshape_per_channel,
    _set_kwarg,
)
from fcconv.fx_nodes import (
    _ARITHMETIC,
    _CHANNEL_SOFTMAX_FUNCTIONS,
    _CHANNEL_SOFTMAX_METHODS,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _NORMALIZATIONS,
    _PERMUTING,
    _arg,
    _descendants,
    _describe,
    _is_feature_layer_norm,
    _is_reshape,
    _permute_dims,
    _shape,
)
from fcconv.head.interpret import Action, Decision, State, Window, check_outputs, identity_features, interpret
from fcconv.head.order import weight_columns
from fcconv.head.vocabulary import Family, HeadOp, Kind
from fcconv.layers import layer_norm_over_channels

Edit = Callable[[fx.GraphModule], None]


@dataclass(frozen=True)
class FirstKernel:
    """What the first Linear over the window reads: the map's channels, the kernel, and how its weight is folded."""

    channels: int
    kernel: tuple[int, ...]
    window: tuple[int, ...]
    """The (C, *S) shape of the flattened window as the original Linear reads it (S is the pooled size when an
    adaptive pooling is folded into the kernel)."""
    order: np.ndarray
    """For each flattened feature, the element of that window it reads (a permuted flatten reads them out of order)."""
    feature_size: tuple[int, ...]
    fold: Callable[[torch.Tensor], torch.Tensor] | None
    folded_pool: bool
    notes: dict[str, str]


@dataclass
class HeadWalk:
    """The head's nodes in graph order and what the walk made of them."""

    nodes: list[fx.Node]
    edits: list[Edit] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    layers: list[RewrittenLayer] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)


def head_op(node: fx.Node, modules: dict[str, nn.Module], known: set[str], where: str) -> HeadOp:
    """``node`` in the head vocabulary; ``known`` names the head tensors computed so far."""
    base = {"label": where, "reads": tuple(a.name for a in node.all_input_nodes if a.name in known)}
    base["writes"] = (node.name,)
    others = [a for a in node.all_input_nodes if a.name not in known and a.op != "get_attr" and _shape(a) is not None]
    if others:
        return HeadOp(kind=Kind.OTHER, reason="other-input", detail=(("name", others[0].name),), **base)
    if node.op == "call_module":
        return _module_op(modules[node.target], node, base)
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return HeadOp(kind=Kind.ELEMENTWISE, **base)
    if _is_reshape(node, modules) and _shape(node) == _shape(node.args[0]):
        return HeadOp(kind=Kind.NOOP_RESHAPE, **base)
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return HeadOp(kind=Kind.ELEMENTWISE, **base)
    if node.op == "call_function" and node.target in _ARITHMETIC:
        return _arithmetic_op(node, known, base)
    if (node.op == "call_function" and node.target in _CHANNEL_SOFTMAX_FUNCTIONS) or (
        node.op == "call_method" and node.target in _CHANNEL_SOFTMAX_METHODS
    ):
        return HeadOp(kind=Kind.CHANNEL_SOFTMAX, over_features=_arg(node, 1, "dim", None) in (1, -1), **base)
    return HeadOp(kind=Kind.OTHER, **base)


def _module_op(mod: nn.Module, node: fx.Node, base: dict) -> HeadOp:
    if isinstance(mod, nn.Linear):
        return HeadOp(kind=Kind.LINEAR, in_features=mod.in_features, out_features=mod.out_features, **base)
    if isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
        return HeadOp(kind=Kind.ELEMENTWISE, **base)
    if isinstance(mod, nn.PReLU):
        return HeadOp(kind=Kind.PER_FEATURE, family=Family.SLOPES, constants=((mod.num_parameters,),), **base)
    if isinstance(mod, nn.BatchNorm1d):
        return HeadOp(kind=Kind.PER_FEATURE, family=Family.NORMALIZATION, constants=((mod.num_features,),), **base)
    if _is_feature_layer_norm(mod, node):
        shape = tuple(mod.normalized_shape)
        return HeadOp(kind=Kind.PER_FEATURE, family=Family.NORMALIZATION, constants=(shape,), **base)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return HeadOp(kind=Kind.CHANNEL_SOFTMAX, over_features=mod.dim in (1, -1), **base)
    family = Family.NORMALIZATION if isinstance(mod, _NORMALIZATIONS) else Family.NONE
    return HeadOp(kind=Kind.OTHER, family=family, **base)


def _arithmetic_op(node: fx.Node, known: set[str], base: dict) -> HeadOp:
    """Arithmetic of head tensors with numbers, with each other, or with a constant held by the module."""
    heads = [a for a in node.args if isinstance(a, fx.Node) and a.name in known]
    constants = [a for a in node.args if isinstance(a, fx.Node) and a.name not in known]
    if any(not isinstance(a, (int, float, fx.Node)) for a in node.args) or any(a.op != "get_attr" for a in constants):
        return HeadOp(kind=Kind.OTHER, **base)
    shapes = tuple(_shape(a) for a in constants)
    if None in shapes:
        return HeadOp(kind=Kind.OTHER, **base)
    if constants:
        return HeadOp(kind=Kind.BINARY_CONSTANT, constants=shapes, **base)
    return HeadOp(kind=Kind.BINARY if len(heads) > 1 else Kind.ELEMENTWISE, **base)


def walk_head(
    gm: fx.GraphModule, modules: dict[str, nn.Module], collapse: fx.Node, rank: int, first: FirstKernel
) -> HeadWalk:
    """Interpret every node after ``collapse`` and record its edit; refuse the head when a node or an output has no
    exact per-position form."""
    graph = gm.graph
    downstream = _descendants(collapse)
    walk = HeadWalk([n for n in graph.nodes if n in downstream and n is not collapse])
    windowed = math.prod(first.kernel) > 1  # before the first Linear each position holds a whole window
    start: State = Window(first.window, first.order) if windowed else identity_features(first.channels)
    known = {collapse.name}
    ops: list[tuple[HeadOp, fx.Node]] = []
    for node in walk.nodes:
        if node.op == "output" or _shape(node) is None:
            continue  # sizes and other non-tensor values are not rewritten; unused ones are dropped
        ops.append((head_op(node, modules, known, f"{_describe(node, modules)} after {collapse.name}"), node))
        known.add(node.name)
    result = interpret((op for op, _ in ops), {collapse.name: start})
    for decision, (_, node) in zip(result.decisions, ops):
        _emit(walk, decision, node, modules, rank, first)
    output = next(n for n in graph.nodes if n.op == "output")
    check_outputs([value.name for value in output.all_input_nodes], result.states, collapse.name)
    return walk


def _emit(
    walk: HeadWalk, decision: Decision, node: fx.Node, modules: dict[str, nn.Module], rank: int, first: FirstKernel
) -> None:
    """Turn one decision into the edit of ``node`` and the lines that report it."""
    action = decision.action
    mod = modules.get(node.target) if node.op == "call_module" else None
    name = str(node.target) if mod is not None else node.name
    if action in (Action.KXK_CONV, Action.POINTWISE_CONV):
        walk.layers.append(_emit_linear(walk, decision, node, mod, rank, first))
    elif action is Action.DROP:
        walk.edits.append(_replace_with_input(node.name))
        walk.removed.append(f"{_describe(node, modules)} (no-op reshape)")
    elif action is Action.CARRY:
        if isinstance(mod, nn.PReLU):
            walk.carried.append(f"{name} (PReLU, 1 slope) → element-wise")
        elif isinstance(mod, (nn.Sigmoid, nn.LogSigmoid)):
            walk.carried.append(f"{name} ({type(mod).__name__}) → element-wise")
        elif node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid, F.logsigmoid):
            walk.carried.append(f"{name} ({node.target.__name__}) → element-wise")
        elif node.op == "call_method" and node.target in ("sigmoid", "sigmoid_"):
            walk.carried.append(f"{name} (.{node.target}()) → element-wise")
    else:
        _emit_per_channel(walk, decision, node, mod, rank)


def _emit_per_channel(walk: HeadWalk, decision: Decision, node: fx.Node, mod: nn.Module | None, rank: int) -> None:
    """A per-feature layer, a softmax over the features or arithmetic with a per-feature constant, on the channels."""
    if mod is None:
        if decision.op.kind is Kind.CHANNEL_SOFTMAX:
            walk.edits.append(_set_kwarg(node.name, "dim", 1, positional_index=1))
            kind = getattr(node.target, "__name__", node.target)
            walk.carried.append(f"{node.name} ({kind} over the features) → over the channels")
        else:
            walk.edits.append(_reshape_per_channel(node.name, decision.order, rank))
            walk.carried.append(f"{node.name} (a constant per feature) → per channel")
    elif isinstance(mod, nn.PReLU):
        walk.carried.append(f"{node.target} (PReLU, {mod.num_parameters} slopes) → per channel")
    elif isinstance(mod, nn.BatchNorm1d):
        walk.edits.append(_replace_batchnorm(node.target, rank))
        walk.carried.append(f"{node.target} (BatchNorm1d) → BatchNorm{rank}d, per channel")
    elif isinstance(mod, nn.LayerNorm):
        # over the features of one position: the LayerNorm of each position's channel vector
        walk.edits.append(_replace_submodule(node.target, layer_norm_over_channels))
        walk.carried.append(f"{node.target} (LayerNorm over {mod.normalized_shape[0]}) → over the channels")
    else:
        walk.edits.append(_replace_with_module(node, type(mod)(dim=1)))
        walk.carried.append(f"{node.target} ({type(mod).__name__} over the features) → over the channels")


def _emit_linear(
    walk: HeadWalk, decision: Decision, node: fx.Node, mod: nn.Module, rank: int, first: FirstKernel
) -> RewrittenLayer:
    """The Linear as a convolution: k×k over the window (its weight folded as the collapse needs), else 1×1."""
    over_window = decision.action is Action.KXK_CONV
    in_map = (first.channels, *first.kernel) if over_window else (mod.in_features, *(1,) * rank)
    kernel = tuple(in_map[1:])
    fold = first.fold if over_window else None
    if over_window and not np.array_equal(decision.order, np.arange(decision.order.size)):
        fold = _compose(_columns_taken(weight_columns(decision.order)), fold)
    walk.edits.append(_replace_linear(node.target, in_map[0], kernel, fold))
    params = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
    note = first.notes.pop("pool", "")
    if fold is not None and first.folded_pool:
        note = "adaptive pooling folded into the kernel"
        bias = mod.out_features if mod.bias is not None else 0
        params = mod.out_features * first.channels * math.prod(first.feature_size) + bias
    if fold is not None and "permutation" in first.notes:
        note = "; ".join(filter(None, [note, first.notes.pop("permutation")]))
    return RewrittenLayer(
        name=node.target,
        before=f"Linear({mod.in_features} → {mod.out_features})",
        after=f"Conv{rank}d({in_map[0]} → {mod.out_features})",
        in_map=in_map,
        kernel=kernel,
        parameters=params,
        note=note,
    )


# --- a flatten that reads its map through a permutation ------------------------------------------


@dataclass
class _PermutedFlatten:
    """The permutes, transposes and ``.contiguous()`` calls between the map and its flatten."""

    source: fx.Node
    """The un-permuted (N, C, *S) map."""
    nodes: list[fx.Node]
    """The calls, the flatten's input first."""
    permutation: tuple[int, ...] | None
    """The flattened tensor is ``source.permute(permutation)``; None when the calls add up to no permutation."""


def _axis_permutation(node: fx.Node, ndim: int) -> list[int] | None:
    """The permutation a permute, transpose/swapaxes or movedim call applies to an ``ndim``-axis tensor, or None."""
    name = getattr(node.target, "__name__", node.target)
    if name == "permute":
        dims = _permute_dims(node)
        if dims is None or len(dims) != ndim:
            return None
        dims = [d % ndim for d in dims]
        return dims if sorted(dims) == list(range(ndim)) else None
    moves = name in ("movedim", "moveaxis")
    first = _arg(node, 1, "source" if moves else "dim0", None)
    second = _arg(node, 2, "destination" if moves else "dim1", None)
    if not isinstance(first, int) or not isinstance(second, int):
        return None
    first, second = first % ndim, second % ndim
    order = list(range(ndim))
    if moves:
        order.remove(first)
        order.insert(second, first)
    else:
        order[first], order[second] = second, first
    return order


def _permuted_flatten(
    collapsed: fx.Node, flatten: fx.Node, modules: dict[str, nn.Module], rank: int
) -> _PermutedFlatten | None:
    """The permutation the flatten reads its map through, or None when it reads the map as it is.

    A call is part of the permutation only when the flatten's path is its one tensor
    use (a ``x.size(0)`` beside it is not a use), so that removing it changes nothing else.
    Refuses a permutation that moves the batch axis, or one whose axes are not constants.
    """
    ndim = rank + 2
    permutation = list(range(ndim))  # axis j of the flattened tensor is axis permutation[j] of the source
    nodes: list[fx.Node] = []
    node, user = collapsed, flatten
    while node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", node.target)
        if not (name in _PERMUTING or (node.op == "call_method" and name == "contiguous")):
            break
        if [u for u in node.users if _shape(u) is not None] != [user] or not isinstance(node.args[0], fx.Node):
            break
        if name in _PERMUTING:
            step = _axis_permutation(node, ndim)
            if step is None:
                raise NotConvertibleError(
                    f"{_describe(flatten, modules)} flattens a map permuted by {_describe(node, modules)}, "
                    f"whose axes fcconv cannot read as a permutation of the {ndim} axes of an (N, C, *S) map"
                )
            permutation = [step[p] for p in permutation]
        nodes.append(node)
        node, user = node.args[0], node
    if not nodes:
        return None
    if permutation[0] != 0:
        permuting = next(n for n in nodes if n.op != "call_method" or n.target != "contiguous")
        raise NotConvertibleError(
            f"{_describe(flatten, modules)} flattens a map whose batch axis {_describe(permuting, modules)} "
            f"moved (to axis {permutation.index(0)}): each sample's features are mixed with other samples', "
            "so the flatten has no per-window reading"
        )
    identity = permutation == list(range(ndim))
    return _PermutedFlatten(node, nodes, None if identity else tuple(permutation))


def _columns_taken(columns: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Linear's weight with its columns taken in ``columns`` order: the weight over a permuted, flattened map
    becomes the weight over the map in (C, *S) order, each weight beside the element it multiplies (a copy)."""
    index = torch.as_tensor(columns)

    def reorder(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()[:, index.to(weight.device)].clone(memory_format=torch.contiguous_format)

    return reorder


def _compose(
    first: Callable[[torch.Tensor], torch.Tensor], then: Callable[[torch.Tensor], torch.Tensor] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``then(first(weight))`` (``first`` alone when ``then`` is None)."""
    return first if then is None else lambda weight: then(first(weight))
