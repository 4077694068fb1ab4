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
import logging
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcconv.capture import capture, lower_exported_program
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.layers import layer_norm_over_channels, linear_as_conv, pointwise_conv

__all__ = [
    "Conversion", "HeadGeometry", "RewrittenLayer", "analyze", "convert", "lower_exported_program", "rewrite",
    "truncate",
]  # fmt: skip


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


# --- what may appear in a head ------------------------------------------------------------------

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Threshold,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.alpha_dropout, torch.dropout,
    torch.nn.functional.threshold, torch.exp, torch.abs, torch.neg, torch.clamp, torch.clip,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp", "clip",
    "clamp_", "contiguous", "float", "to", "type_as",
}  # fmt: skip
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_CHANNEL_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_CHANNEL_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN_FUNCTIONS = {torch.mean, torch.amax}
_MEAN_METHODS = {"mean", "amax"}
_ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ADAPTIVE_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d: "avg", F.adaptive_avg_pool2d: "avg", F.adaptive_avg_pool3d: "avg",
    F.adaptive_max_pool1d: "max", F.adaptive_max_pool2d: "max", F.adaptive_max_pool3d: "max",
}  # fmt: skip
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORMALIZATIONS = (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.RMSNorm)
_PERMUTING = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_SQUASHING_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)
_SQUASHING_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.sigmoid, F.sigmoid}
_SQUASHING_METHODS = {"softmax", "log_softmax", "sigmoid"}


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


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', str(node.target))})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return node.name


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten, view or reshape, as a module, function or method."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    return (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _FLATTEN_METHODS
    )


def _is_collapse(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> str | None:
    """'flatten' or 'global-avg'/'global-max' when ``node`` collapses a (N, C, *S) map to (N, F)."""
    out = _shape(node)
    source = node.args[0] if node.args else None
    src = _shape(source)
    if out is None or src is None or len(out) != 2 or len(src) != rank + 2:
        return None
    if _is_reshape(node, modules) and out[0] == src[0] and out[1] == math.prod(src[1:]):
        return "flatten"
    if (node.op == "call_function" and node.target in _MEAN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MEAN_METHODS
    ):
        return "global-avg" if getattr(node.target, "__name__", node.target) == "mean" else "global-max"
    return "other"


def _adaptive_pool(node: Any, modules: dict[str, nn.Module]) -> str | None:
    """'avg' or 'max' when ``node`` is an adaptive pooling."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and isinstance(modules[node.target], _ADAPTIVE_POOL_MODULES):
        mod = modules[node.target]
        if getattr(mod, "return_indices", False):
            return None
        return "max" if "Max" in type(mod).__name__ else "avg"
    if node.op == "call_function" and node.target in _ADAPTIVE_POOL_FUNCTIONS:
        return _ADAPTIVE_POOL_FUNCTIONS[node.target]
    return None


def _reachable(node: fx.Node, step: Callable[[fx.Node], Any]) -> set[fx.Node]:
    """``node`` and every node reached from it by repeatedly following ``step``."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


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
    gm, modules, rank, gates = located.gm, located.modules, located.rank, located.gates
    graph = gm.graph
    in_gates = {n for gate in gates for n in gate.nodes}
    collapse = (located.collapse, located.kind)
    collapse_node, collapse_kind = collapse
    collapsed = collapse_node.args[0]
    assert isinstance(collapsed, fx.Node)

    # Where the head starts: an adaptive pooling that feeds the flatten belongs to it, and so does a
    # global pooling followed by layers that act on each position of the pooled map (ConvNeXt's
    # LayerNorm2d, which permutes to channels-last, normalizes the channels and permutes back).
    pooled_chain = _pooled_chain(collapsed, modules, rank) if collapse_kind == "flatten" else None
    channel_axis = 1
    permuted: _PermutedFlatten | None = None
    if pooled_chain is not None:
        pool_node, pool_kind, _, channel_axis = pooled_chain
        entry = pool_node.args[0]
    else:
        permuted = _permuted_flatten(collapsed, collapse_node, modules, rank) if collapse_kind == "flatten" else None
        unpermuted = permuted.source if permuted is not None else collapsed
        pool_kind = _adaptive_pool(unpermuted, modules) if collapse_kind == "flatten" else None
        if pool_kind is not None and len(unpermuted.users) == 1:
            pool_node = unpermuted
            entry = unpermuted.args[0]
        else:
            pool_node = None
            entry = unpermuted
    assert isinstance(entry, fx.Node)
    entry_shape = _shape(entry)
    if entry_shape is None or len(entry_shape) != rank + 2:
        raise NotConvertibleError(f"the head's input {entry.name} is not a feature map of rank {rank + 2}")
    channels, feature_size = entry_shape[1], entry_shape[2:]
    feature_shape = (channels, *feature_size)

    edits: list[Callable[[fx.GraphModule], None]] = []
    removed: list[str] = []
    notes: dict[str, str] = {}
    fold: Callable[[torch.Tensor], torch.Tensor] | None = None
    folded_pool = False

    if collapse_kind in ("global-avg", "global-max"):
        dims = _arg(collapse_node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        spatial_dims = {d % (rank + 2) for d in dims}
        keepdim = _arg(collapse_node, 2, "keepdim", False)
        if spatial_dims != set(range(2, rank + 2)) or keepdim:
            raise NotConvertibleError(f"{_describe(collapse_node, modules)} does not reduce exactly the spatial axes")
        if dense:
            edits.append(_replace_with_input(collapse_node.name))
            removed.append(f"{collapse_node.name} (global {collapse_kind[7:]} pooling: dense map)")
            window: tuple[int, ...] | None = (1,) * rank
        else:
            edits.append(_set_kwarg(collapse_node.name, "keepdim", True, positional_index=2))
            window = None
        kernel = (1,) * rank
        stride = (1,) * rank
    else:
        if pool_node is not None:
            pooled = _shape(pool_node)[2:]
            pool_name = pool_node.target if pool_node.op == "call_module" else _describe(pool_node, modules)
            if all(p == 1 for p in pooled) and dense:
                edits.append(_replace_with_input(pool_node.name))
                removed.append(f"{pool_name} (global {pool_kind} pooling: dense map)")
                window, kernel, stride = (1,) * rank, (1,) * rank, (1,) * rank
            elif all(p == 1 for p in pooled):
                window, kernel, stride = None, (1,) * rank, (1,) * rank
            elif pooled == feature_size:
                edits.append(_replace_with_input(pool_node.name))
                removed.append(f"{pool_name} (identity at the native size)")
                window, kernel, stride = feature_size, feature_size, (1,) * rank
            elif all(f % p == 0 for f, p in zip(feature_size, pooled)):
                factor = tuple(f // p for f, p in zip(feature_size, pooled))
                pool_cls = (_AVG_POOL if pool_kind == "avg" else _MAX_POOL)[rank]
                edits.append(_replace_with_module(pool_node, pool_cls(kernel_size=factor, stride=factor)))
                notes["pool"] = f"{pool_name} → {pool_cls.__name__}({'×'.join(map(str, factor))})"
                window, kernel, stride = feature_size, pooled, factor
            elif pool_kind == "avg":
                fold = _adaptive_avg_fold(channels, feature_size, pooled)
                folded_pool = True
                edits.append(_replace_with_input(pool_node.name))
                removed.append(f"{pool_name} (folded into the first kernel)")
                window, kernel, stride = feature_size, feature_size, (1,) * rank
            else:
                raise NotConvertibleError(
                    f"{pool_name} max-pools a {'×'.join(map(str, feature_size))} map to "
                    f"{'×'.join(map(str, pooled))}, which does not divide evenly and is not linear"
                )
        else:
            window, kernel, stride = feature_size, feature_size, (1,) * rank
        if permuted is not None:
            for step in permuted.nodes:
                edits.append(_replace_with_input(step.name))
                removed.append(f"{_describe(step, modules)} (undone in the first Linear's kernel)")
            if permuted.permutation is not None:
                reorder = _unpermute_weight(permuted.permutation, _shape(collapsed)[1:])
                fold = reorder if fold is None else _compose(reorder, fold)
                shown = ", ".join(map(str, permuted.permutation))
                notes["permutation"] = f"weight re-ordered (a copy) to undo the flatten's permute({shown})"
        if channel_axis != 1:
            # the pooled map reached the flatten channels-last: (N, 1, 1, C) read as (N, C, 1, 1)
            edits.append(_replace_with_function(collapse_node.name, torch.movedim, channel_axis, 1))
            removed.append(f"{_describe(collapse_node, modules)} (a permutation back to channels-first instead)")
        else:
            edits.append(_replace_with_input(collapse_node.name))
            removed.append(_describe(collapse_node, modules))

    # Walk the head: everything downstream of the collapse.
    downstream = _descendants(collapse_node)
    head_nodes = [n for n in graph.nodes if n in downstream and n is not collapse_node]
    trunk = _ancestors(entry)
    windowed = math.prod(kernel) > 1  # before the first Linear each position holds a whole window
    stage: dict[fx.Node, str] = {collapse_node: "window" if windowed else "features"}
    layers: list[RewrittenLayer] = []
    carried: list[str] = []
    for node in head_nodes:
        if node.op == "output" or _shape(node) is None:
            continue  # sizes and other non-tensor values are not rewritten; unused ones are dropped
        tensor_inputs = [a for a in node.all_input_nodes if a in stage]
        others = [a for a in node.all_input_nodes if a not in stage and a.op != "get_attr"]
        others = [a for a in others if _shape(a) is not None]
        if others:
            raise NotConvertibleError(
                f"{_describe(node, modules)} combines the flattened features with {others[0].name}, "
                "which fcconv cannot read per position"
            )
        in_stage = {stage[a] for a in tensor_inputs}
        if not in_stage:
            raise NotConvertibleError(f"{_describe(node, modules)} builds a tensor from the flattened features' shape")
        if len(in_stage) > 1:
            raise NotConvertibleError(
                f"{_describe(node, modules)} mixes the flattened window with per-position features"
            )
        current = in_stage.pop()
        where = f"{_describe(node, modules)} after {collapse_node.name}"
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Linear):
                in_map = (channels, *kernel) if current == "window" else (mod.in_features, *(1,) * rank)
                k = tuple(in_map[1:])
                layer_fold = fold if current == "window" else None
                edits.append(_replace_linear(node.target, in_map[0], k, layer_fold))
                params = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
                conv_name = f"Conv{rank}d" if rank > 1 else "Conv1d"
                note = notes.pop("pool", "")
                if layer_fold is not None and folded_pool:
                    note = "adaptive pooling folded into the kernel"
                    params = mod.out_features * channels * math.prod(feature_size) + (
                        mod.out_features if mod.bias is not None else 0
                    )
                if layer_fold is not None and "permutation" in notes:
                    note = "; ".join(filter(None, [note, notes.pop("permutation")]))
                layers.append(
                    RewrittenLayer(
                        name=node.target,
                        before=f"Linear({mod.in_features} → {mod.out_features})",
                        after=f"{conv_name}({in_map[0]} → {mod.out_features})",
                        in_map=in_map,
                        kernel=k,
                        parameters=params,
                        note=note,
                    )
                )
                stage[node] = "features"
                continue
            kind = type(mod).__name__
            if isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
                if isinstance(mod, nn.PReLU):
                    carried.append(f"{node.target} (PReLU, 1 slope) → element-wise")
                elif isinstance(mod, (nn.Sigmoid, nn.LogSigmoid)):
                    carried.append(f"{node.target} ({kind}) → element-wise")
                stage[node] = current
                continue
            if current == "window":
                if isinstance(mod, nn.PReLU):
                    reason = (
                        f"has one slope per element of the flattened window ({mod.num_parameters} slopes), "
                        "not one per channel"
                    )
                elif isinstance(mod, _NORMALIZATIONS):
                    reason = "normalizes over the flattened window"
                else:
                    reason = "acts on the flattened window as a whole"
                raise NotConvertibleError(
                    f"{where} {reason}, not per position; "
                    "only element-wise layers may stand between the flatten and the first Linear"
                )
            if isinstance(mod, nn.PReLU):
                carried.append(f"{node.target} (PReLU, {mod.num_parameters} slopes) → per channel")
                stage[node] = current
                continue
            if isinstance(mod, nn.BatchNorm1d):
                edits.append(_replace_batchnorm(node.target, rank))
                carried.append(f"{node.target} (BatchNorm1d) → BatchNorm{rank}d, per channel")
                stage[node] = current
                continue
            if _is_feature_layer_norm(mod, node):
                # over the features of one position: the LayerNorm of each position's channel vector
                edits.append(_replace_submodule(node.target, layer_norm_over_channels))
                carried.append(f"{node.target} (LayerNorm over {mod.normalized_shape[0]}) → over the channels")
                stage[node] = current
                continue
            if isinstance(mod, (nn.Softmax, nn.LogSoftmax)) and mod.dim in (1, -1):
                edits.append(_replace_with_module(node, type(mod)(dim=1)))
                carried.append(f"{node.target} ({kind} over the features) → over the channels")
                stage[node] = current
                continue
            raise NotConvertibleError(f"{where} has no exact per-position equivalent")
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            if node.target in (torch.sigmoid, F.sigmoid, F.logsigmoid):
                carried.append(f"{node.name} ({node.target.__name__}) → element-wise")
            stage[node] = current
            continue
        if _is_reshape(node, modules) and _shape(node) == _shape(node.args[0]):
            # a reshape that changes nothing at the native size, e.g. a trailing view(N, -1):
            # on the map it would flatten the positions, so it goes
            edits.append(_replace_with_input(node.name))
            removed.append(f"{_describe(node, modules)} (no-op reshape)")
            stage[node] = current
            continue
        if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            if node.target in ("sigmoid", "sigmoid_"):
                carried.append(f"{node.name} (.{node.target}()) → element-wise")
            stage[node] = current
            continue
        if node.op == "call_function" and node.target in _ARITHMETIC:
            scalars_ok = all(isinstance(a, (int, float)) or a in stage for a in node.args)
            if scalars_ok:
                stage[node] = current
                continue
        if current == "features" and (
            (node.op == "call_function" and node.target in _CHANNEL_SOFTMAX_FUNCTIONS)
            or (node.op == "call_method" and node.target in _CHANNEL_SOFTMAX_METHODS)
        ):
            dim = _arg(node, 1, "dim", None)
            if dim in (1, -1):
                edits.append(_set_kwarg(node.name, "dim", 1, positional_index=1))
                carried.append(
                    f"{node.name} ({getattr(node.target, '__name__', node.target)} over the features) → over the channels"
                )
                stage[node] = current
                continue
        raise NotConvertibleError(f"{where} has no exact per-position equivalent")

    output = next(n for n in graph.nodes if n.op == "output")
    for value in output.all_input_nodes:
        if value in trunk or value not in stage:
            raise NotConvertibleError(f"the model also returns {value.name}, which is not computed by the head")
        if stage[value] == "window":
            raise NotConvertibleError(
                f"the flatten at {collapse_node.name} is not followed by a Linear layer; "
                "a flattened window has no per-position reading"
            )
    if not layers and window is not None and math.prod(window) > 1:
        raise NotConvertibleError(f"the flatten at {collapse_node.name} is not followed by a Linear layer")
    if pool is not None:
        if len(output.all_input_nodes) != 1:
            raise NotConvertibleError("--pool: the model returns several tensors; a pooled output needs one")
        edits.append(_append_global_pool(pool, rank))

    geometry = HeadGeometry(
        input_shape=input_shape,
        feature_shape=feature_shape,
        window=tuple(window) if window is not None else None,
        stride=tuple(stride),
        dense=dense,
        pool=pool,
        logits=logits,
        until=until,
    )
    branches = [(name, _layers_on_path(value, head_nodes, modules)) for name, value in _output_items(output.args[0])]
    cut_points = _cut_points(head_nodes, modules)
    features, head = _split(gm, entry, trunk, collapse_node if collapse_kind == "flatten" else None)

    # The trunk is kept, so it must take larger inputs: run it at twice the native size (shapes only).
    larger = _probe_larger_input(features, input_shape, modules)
    if entry.name in larger and larger[entry.name][1] != entry_shape[1]:
        raise NotConvertibleError(
            f"{_describe(collapse_node, modules)} flattens a permuted map: axis 1 of {entry.name} is "
            f"{entry_shape[1]} at the native size and {larger[entry.name][1]} at twice it, so it is not the "
            "channel axis of an (N, C, H, W) map and the flatten has no sliding-window reading"
        )
    trunk_layers: list[RewrittenLayer] = []
    notes: list[str] = []
    for gate in gates:
        edits.extend(gate.edits)
        trunk_layers.extend(gate.layers)
    found, pointwise_edits = _pointwise_linears(gm, modules, rank, trunk - in_gates, larger, rewrite=pointwise)
    trunk_layers.extend(found)
    edits.extend(pointwise_edits)
    replacements = _size_generic_replacements()
    replaced: dict[Callable[..., Any], int] = {}
    for node in graph.nodes:
        if node in trunk and node.op == "call_function" and node.target in replacements:
            edits.append(_set_target(node.name, replacements[node.target]))
            replaced[node.target] = replaced.get(node.target, 0) + 1
    for function, count in replaced.items():
        new = replacements[function]
        notes.append(
            f"{count} call{'s' if count > 1 else ''} of {function.__module__}.{function.__name__} computed by "
            f"{new.__module__}.{new.__name__}: the same values, with its size-dependent choices kept in the export"
        )
    return _Plan(
        gm, features, head, geometry, layers, removed, edits, trunk_layers, notes,
        flatten_permutation=permuted.permutation if permuted is not None else None,
        carried=carried, branches=branches, cut_points=cut_points,
    )  # fmt: skip


# --- permuted flattens, outputs, and where a head may be ended ---------------------------------


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


def _unpermute_weight(
    permutation: tuple[int, ...], permuted: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a Linear's weight over a permuted, flattened map to the weight over the map in (C, *S) order.

    The weight, viewed as (O, *permuted axes), is permuted back to (O, C, *S): the
    same products, each weight now beside the element it multiplies in channel order.
    """
    inverse = [permutation.index(axis) for axis in range(len(permutation))]

    def reorder(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().reshape(weight.shape[0], *permuted).permute(inverse)
        return w.reshape(weight.shape[0], -1).clone(memory_format=torch.contiguous_format)

    return reorder


def _compose(first: Callable[[torch.Tensor], torch.Tensor], then: Callable[[torch.Tensor], torch.Tensor]):
    """``then(first(weight))``."""
    return lambda weight: then(first(weight))


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


# --- layers that act on each position, gates, and trunks that must take larger inputs -------------


def _is_elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An element-wise layer of one tensor (activations, dropout, arithmetic with numbers)."""
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1)
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return len([a for a in node.all_input_nodes if _shape(a) is not None]) == 1
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return len([a for a in node.all_input_nodes if _shape(a) is not None]) == 1
    if node.op == "call_function" and node.target in _ARITHMETIC:
        return len(node.all_input_nodes) == 1 and all(
            isinstance(a, (int, float)) or a is node.all_input_nodes[0] for a in node.args
        )
    return False


def _is_feature_layer_norm(mod: nn.Module, node: fx.Node) -> bool:
    """A LayerNorm over the last axis, which holds the C features (channels) of each position."""
    shape = _shape(node)
    return (
        isinstance(mod, nn.LayerNorm)
        and len(mod.normalized_shape) == 1
        and shape is not None
        and shape[-1] == mod.normalized_shape[0]
    )


def _is_layer_norm_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A LayerNorm over the last axis only, as a module or as ``F.layer_norm``."""
    if node.op == "call_module":
        return _is_feature_layer_norm(modules[node.target], node) and len(node.all_input_nodes) == 1
    if node.op == "call_function" and node.target in (F.layer_norm, torch.layer_norm):
        normalized = _arg(node, 1, "normalized_shape", None)
        return isinstance(normalized, (list, tuple)) and len(normalized) == 1
    return False


def _permute_dims(node: Any) -> list[int] | None:
    """The permutation of a ``permute`` call (function or method), or None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if getattr(node.target, "__name__", node.target) != "permute":
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if not dims and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def _global_pool_kind(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> str | None:
    """'avg' or 'max' when ``node`` pools a (N, C, *S) map to (N, C, 1, ...): an adaptive pooling or a kept-dim mean."""
    shape = _shape(node)
    if shape is None or len(shape) != rank + 2 or any(s != 1 for s in shape[2:]):
        return None
    kind = _adaptive_pool(node, modules)
    if kind is not None:
        return kind
    if (node.op == "call_function" and node.target in _MEAN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MEAN_METHODS
    ):
        dims = _arg(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if {d % (rank + 2) for d in dims} == set(range(2, rank + 2)) and _arg(node, 2, "keepdim", False):
            return "avg" if getattr(node.target, "__name__", node.target) == "mean" else "max"
    return None


def _pooled_chain(
    collapsed: fx.Node, modules: dict[str, nn.Module], rank: int
) -> tuple[fx.Node, str, list[fx.Node], int] | None:
    """A global pooling followed, before the flatten, only by layers that act on each position of the map.

    Returns (pooling, 'avg' or 'max', the layers in order, the channel axis at the
    flatten) or None. The layers may permute the axes, normalize over the channels
    once they are the last axis (a LayerNorm), or act element-wise; on the pooled
    1×1 map each acts on the one position, and on a whole map (``dense``) on each.
    """
    chain: list[fx.Node] = []
    node = collapsed
    while True:
        if len(node.users) != 1:
            return None
        kind = _global_pool_kind(node, modules, rank)
        if kind is not None:
            break
        if _permute_dims(node) is not None or _is_layer_norm_call(node, modules) or _is_elementwise(node, modules):
            chain.append(node)
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return None
            continue
        return None
    chain.reverse()
    axis = 1
    for step in chain:
        dims = _permute_dims(step)
        if dims is not None:
            if len(dims) != rank + 2 or sorted(d % (rank + 2) for d in dims) != list(range(rank + 2)):
                return None
            dims = [d % (rank + 2) for d in dims]
            if dims[0] != 0:
                return None
            axis = dims.index(axis)
        elif _is_layer_norm_call(step, modules) and axis != rank + 1:
            return None
    return node, kind, chain, axis


@dataclass
class _Gate:
    """A squeeze-and-excitation gate written with Linear layers: pool, flatten, Linears, reshape to (N, C, 1, ...)."""

    nodes: set[fx.Node]
    edits: list[Callable[[fx.GraphModule], None]]
    layers: list[RewrittenLayer]


def _is_unflatten(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> bool:
    """A reshape or unsqueeze of (N, F) or (N, F, 1, ...) to (N, F, 1, ...)."""
    shape, src = _shape(node), _shape(node.args[0] if node.args else None)
    if shape is None or src is None or len(shape) > rank + 2 or len(shape) <= len(src):
        return False
    reshape = _is_reshape(node, modules) or (
        node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) == "unsqueeze"
    )
    return reshape and shape[:2] == src[:2] and all(s == 1 for s in shape[2:])


def _find_gates(graph: fx.Graph, modules: dict[str, nn.Module], rank: int, live: set[fx.Node]) -> list[_Gate]:
    """Squeeze-and-excitation gates written with Linear layers (SENet), each rewritten as 1×1 convolutions.

    The pooled map is flattened, passed through Linear and element-wise layers and
    reshaped back to (N, C, 1, ...) to scale the map. On the pooled (N, C, 1, ...)
    map the Linear layers are 1×1 convolutions and the reshapes do nothing: the
    same function, for any input size, since the pooling is global.
    """
    gates = []
    for node in graph.nodes:
        if node not in live:
            continue
        kind = _is_collapse(node, modules, rank)
        if kind not in ("flatten", "global-avg", "global-max"):
            continue
        if kind == "flatten" and any(s != 1 for s in _shape(node.args[0])[2:]):
            continue
        if kind != "flatten":
            dims = _arg(node, 1, "dim", None)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if {d % (rank + 2) for d in dims} != set(range(2, rank + 2)):
                continue
        linears: list[fx.Node] = []
        unflatten: list[fx.Node] = []
        current = node
        while len(current.users) == 1:
            step = next(iter(current.users))
            if step.args[:1] != (current,) and step.all_input_nodes != [current]:
                break
            if step.op == "call_module" and isinstance(modules[step.target], nn.Linear) and not unflatten:
                linears.append(step)
            elif _is_unflatten(step, modules, rank):
                unflatten.append(step)
                if len(_shape(step)) == rank + 2:
                    break
            elif _is_elementwise(step, modules) and not unflatten:
                pass
            else:
                break
            current = step
        if not linears or not unflatten or len(_shape(unflatten[-1])) != rank + 2:
            continue
        calls = [n for n in graph.nodes if n.op == "call_module"]
        if any(sum(c.target == lin.target for c in calls) != 1 for lin in linears):
            continue  # a Linear called elsewhere too keeps its form
        edits: list[Callable[[fx.GraphModule], None]] = [
            _replace_with_input(node.name)
            if kind == "flatten"
            else _set_kwarg(node.name, "keepdim", True, positional_index=2)
        ]
        layers = []
        for lin in linears:
            mod = modules[lin.target]
            edits.append(_replace_linear(lin.target, mod.in_features, (1,) * rank, None))
            layers.append(
                RewrittenLayer(
                    name=lin.target,
                    before=f"Linear({mod.in_features} → {mod.out_features})",
                    after=f"Conv{rank}d({mod.in_features} → {mod.out_features})",
                    in_map=(mod.in_features, *(1,) * rank),
                    kernel=(1,) * rank,
                    parameters=mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0),
                    note="squeeze-and-excitation gate",
                )
            )
        edits.extend(_replace_with_input(u.name) for u in unflatten)
        nodes = _descendants(node) & _ancestors(unflatten[-1])
        gates.append(_Gate(nodes, edits, layers))
    return gates


def _refuse_token_sequence(
    gm: fx.GraphModule, modules: dict[str, nn.Module], rank: int, live: set[fx.Node], input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming it, a model that adds a fixed-length position embedding to a token sequence (ViT)."""
    for node in gm.graph.nodes:
        if node not in live or node.op != "call_function" or node.target not in (operator.add, torch.add):
            continue
        for tokens, table in (node.args[:2], node.args[1::-1]):
            if not isinstance(table, fx.Node) or table.op != "get_attr" or tokens not in live:
                continue
            seq, emb = _shape(tokens), _shape(table)
            if seq is None or emb is None or len(seq) != 3 or len(emb) != 3 or emb[0] != 1 or emb[1:] != seq[1:]:
                continue
            class_tokens = [
                n.target
                for n in gm.graph.nodes
                if n.op == "get_attr" and (_shape(n) or ())[:2] == (1, 1) and len(_shape(n)) == 3
            ]
            cls = f" (with the class token {class_tokens[0]}, which the classifier reads)" if class_tokens else ""
            native = "×".join(map(str, input_shape[1:]))
            raise NotConvertibleError(
                f"{table.target} is a position embedding of fixed length {emb[1]}{cls}, added to the token sequence "
                f"of the native {native} input at {node.name}; a larger input gives more tokens than it has "
                "positions, so the model has no fully convolutional form"
            )


def _refuse_class_token(
    gm: fx.GraphModule, modules: dict[str, nn.Module], live: set[fx.Node], input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming it, a model whose classifier reads one token of a token sequence (MViT's class token).

    The reason given is the first one the model has: where its layers cannot take a
    larger input (MViT's fixed-length position embedding, or its attention's fixed
    token grid), that layer; otherwise that one token has no per-position reading.
    """
    for node in gm.graph.nodes:
        if node not in live or node.op != "call_function" or node.target is not operator.getitem:
            continue
        sequence, out, index = _shape(node.args[0]), _shape(node), node.args[1]
        if sequence is None or out is None or len(sequence) != 3 or len(out) != 2:
            continue
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int)):
            continue
        reads = (
            f"{_describe(node, modules)} reads token {index[1] % sequence[1]} of a sequence of {sequence[1]} tokens "
            "(a class token), not a pooled or flattened feature map"
        )
        try:
            _probe_larger_input(gm, input_shape, modules)
        except NotConvertibleError as exc:
            raise NotConvertibleError(f"{reads}; {exc}") from exc
        raise NotConvertibleError(
            f"{reads}: one token has no per-position reading, so the model has no fully convolutional form"
        )


def _refuse_size_dependent_trunk(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Refuse a model whose trunk calls a function that chooses what to compute from the map's size in Python,
    where fcconv has no size-generic form of it (an export would keep the choice made at one size)."""
    try:
        from fcconv.trunk import size_dependent_functions
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    refused = size_dependent_functions()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in refused:
            stack = node.meta.get("nn_module_stack") or {}
            where = node.name
            if stack:
                path, cls = list(stack.values())[-1]
                where = f"{path} ({getattr(cls, '__name__', cls)})"
            function = f"{node.target.__module__}.{node.target.__name__}"
            raise NotConvertibleError(f"{where} calls {function}, {refused[node.target]}")


class _NodeShapes(fx.Interpreter):
    """Runs a graph on fake tensors, recording each node's output shape and the node it failed at.

    The module's own parameters enter the fake computation as they are used, so no
    fake copy of the module is made (and its graph's recorded shapes are left alone).
    """

    def __init__(self, module: fx.GraphModule, fake_mode: Any) -> None:
        super().__init__(module)
        self.fake_mode = fake_mode
        self.current: fx.Node | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        with self.fake_mode:
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(int(s) for s in result.shape)
        return result


@contextlib.contextmanager
def _fake_tensor_errors_unlogged() -> Iterator[None]:
    """Keep torch's fake tensors from logging a traceback for an operator that refuses its shapes.

    The refusal is reported in one line by the caller; the log would put a traceback on stderr.
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _probe_larger_input(
    features: fx.GraphModule, input_shape: tuple[int, ...], modules: dict[str, nn.Module]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the trunk's nodes at twice the native size; refuse the model when its trunk cannot take it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    large = (input_shape[0], *(2 * s for s in input_shape[1:]))
    params = [p for p in features.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        sample = torch.empty((2, *large), dtype=dtype, device=device)
    prop = _NodeShapes(features, fake_mode)
    try:
        with _fake_tensor_errors_unlogged():
            prop.run(sample)
    except Exception as exc:  # noqa: BLE001 - the trunk refused the larger input: say where and why
        node = prop.current
        where = ""
        if node is not None:
            where = _describe(node, modules) if node.op != "call_module" or node.target in modules else node.name
            stack = node.meta.get("nn_module_stack") or {}
            if stack and node.op != "call_module":
                path, cls = list(stack.values())[-1]
                where += f" in {path} ({getattr(cls, '__name__', cls)})"
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split()).split(" While executing")[0][:200]
        native, bigger = "×".join(map(str, input_shape[1:])), "×".join(map(str, large[1:]))
        raise NotConvertibleError(
            f"{where or 'the trunk'} cannot take a {bigger} input ({text}): the layers before the head are fixed "
            f"to the native {native} size, so the model cannot be made fully convolutional"
        ) from exc
    return prop.shapes


def _pointwise_linears(
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    rank: int,
    trunk: set[fx.Node],
    larger: dict[str, tuple[int, ...]],
    *,
    rewrite: bool,
) -> tuple[list[RewrittenLayer], list[Callable[[fx.GraphModule], None]]]:
    """Linear layers of the trunk that act on each position of a channels-last map, and (``rewrite``) their edits.

    A Linear's input is channels-last when its spatial axes, found as the axes whose
    size follows the input's (native versus twice the native size), are 1..rank and
    its last axis is not. Each becomes a 1×1 convolution. Where such Linear layers
    sit, with LayerNorms over the channels and element-wise layers, between a
    permutation to channels-last and one back (ConvNeXt's block), both permutations
    are removed and the LayerNorms become LayerNorms over axis 1; elsewhere (Swin)
    each convolution reads the channels-last map through a permutation pair.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def spatial(node: Any) -> set[int] | None:
        native, large = _shape(node), larger.get(node.name) if isinstance(node, fx.Node) else None
        if native is None or large is None or len(native) != len(large):
            return None
        return {axis for axis, (a, b) in enumerate(zip(native, large)) if a != b}

    channels_last_axes = set(range(1, rank + 1))
    found: dict[fx.Node, bool] = {}  # Linear node -> still channels-last after the rewrite
    for node in gm.graph.nodes:
        if node in trunk and node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            source = node.args[0]
            shape = _shape(source)
            if shape is not None and len(shape) == rank + 2 and spatial(source) == channels_last_axes:
                if calls.get(node.target) == 1:
                    found[node] = True
    if not found:
        return [], []

    edits: list[Callable[[fx.GraphModule], None]] = []
    to_channels_last = [0, *range(2, rank + 2), 1]
    to_channels_first = [0, rank + 1, *range(1, rank + 1)]
    for start in gm.graph.nodes:
        if start not in trunk or _permute_dims(start) != to_channels_last or len(start.users) != 1:
            continue
        if spatial(start.args[0]) != set(range(2, rank + 2)):
            continue
        inside: list[fx.Node] = []
        step = next(iter(start.users))
        while step in trunk and _permute_dims(step) != to_channels_first:
            ok = step in found or _is_elementwise(step, modules)
            ok = ok or (_is_layer_norm_call(step, modules) and step.op == "call_module" and calls[step.target] == 1)
            if not ok or len(step.users) != 1 or step.all_input_nodes != [inside[-1] if inside else start]:
                break
            inside.append(step)
            step = next(iter(step.users))
        else:
            if step not in trunk or not any(n in found for n in inside):
                continue
            if rewrite:
                edits += [_replace_with_input(start.name), _replace_with_input(step.name)]
                edits += [
                    _replace_submodule(n.target, layer_norm_over_channels)
                    for n in inside
                    if n not in found and _is_layer_norm_call(n, modules)
                ]
            for n in inside:
                if n in found:
                    found[n] = False

    layers = []
    for node, channels_last in found.items():
        mod = modules[node.target]
        native = _shape(node.args[0])
        layers.append(
            RewrittenLayer(
                name=node.target,
                before=f"Linear({mod.in_features} → {mod.out_features})",
                after=f"Conv{rank}d({mod.in_features} → {mod.out_features})" if rewrite else "kept (per position)",
                in_map=(native[-1], *native[1:-1]),
                kernel=(1,) * rank,
                parameters=mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0),
                note=("" if not rewrite else "channels-last, transposed" if channels_last else "permutes removed"),
            )
        )
        if rewrite:
            edits.append(_replace_submodule(node.target, _pointwise_builder(channels_last, rank)))
    return layers, edits


def _pointwise_builder(channels_last: bool, rank: int) -> Callable[[nn.Module], nn.Module]:
    return lambda linear: pointwise_conv(linear, channels_last=channels_last, rank=rank)


def _size_generic_replacements() -> dict[Callable[..., Any], Callable[..., Any]]:
    try:
        from fcconv.trunk import size_generic_replacements
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return size_generic_replacements()


def _adaptive_avg_fold(
    channels: int, feature_size: tuple[int, ...], pooled: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a Linear's (O, C·∏pooled) weight to the (O, C·∏feature_size) weight that includes the pooling.

    Adaptive average pooling is linear and separable per axis, so pooling then
    applying the Linear equals one Linear over the unpooled window.
    """

    def pooling_matrix(size: int, out: int) -> torch.Tensor:
        eye = torch.eye(size, dtype=torch.float64).unsqueeze(0)  # row i of the batch is basis vector i
        return F.adaptive_avg_pool1d(eye, out)[0]  # (size, out): input cell -> its weight in each output cell

    mats = [pooling_matrix(s, p) for s, p in zip(feature_size, pooled)]

    def fold(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().double().reshape(weight.shape[0], channels, *pooled)
        for axis, mat in enumerate(mats):
            # contract the pooled axis with the pooling weights, giving the unpooled axis
            w = torch.movedim(torch.tensordot(w, mat, dims=([2 + axis], [1])), -1, 2 + axis)
        return w.reshape(weight.shape[0], -1).to(weight.dtype)

    return fold


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


def _find(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _replace_with_input(name: str) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)

    return edit


def _set_kwarg(name: str, key: str, value: Any, *, positional_index: int) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        if len(node.args) > positional_index:
            args = list(node.args)
            args[positional_index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, key: value}

    return edit


def _replace_with_module(node: fx.Node, module: nn.Module) -> Callable[[fx.GraphModule], None]:
    name = node.name
    target = node.target if node.op == "call_module" else f"fcconv_{node.name}"

    def edit(gm: fx.GraphModule) -> None:
        n = _find(gm, name)
        gm.add_submodule(target, module)
        if n.op == "call_module":
            return
        with gm.graph.inserting_after(n):
            new = gm.graph.call_module(target, (n.args[0],))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)

    return edit


def _replace_submodule(target: str, build: Callable[[nn.Module], nn.Module]) -> Callable[[fx.GraphModule], None]:
    """Replace the module at ``target`` with ``build(module)``."""

    def edit(gm: fx.GraphModule) -> None:
        gm.add_submodule(target, build(gm.get_submodule(target)))

    return edit


def _replace_with_function(name: str, function: Callable[..., Any], *extra: Any) -> Callable[[fx.GraphModule], None]:
    """Replace the node ``name`` with ``function(its first argument, *extra)``."""

    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(function, (node.args[0], *extra))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    return edit


def _set_target(name: str, function: Callable[..., Any]) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        _find(gm, name).target = function

    return edit


def _append_global_pool(kind: str, rank: int) -> Callable[[fx.GraphModule], None]:
    """Pool the score map the model returns over its spatial axes: (N, K, *map) -> (N, K)."""

    def edit(gm: fx.GraphModule) -> None:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (value,) = output.all_input_nodes
        with gm.graph.inserting_before(output):
            pooled = gm.graph.call_function(
                torch.mean if kind == "avg" else torch.amax, (value, tuple(range(2, rank + 2)))
            )
        output.replace_input_with(value, pooled)

    return edit


def _replace_linear(
    target: str, in_channels: int, kernel: tuple[int, ...], fold: Callable[[torch.Tensor], torch.Tensor] | None
) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        linear = gm.get_submodule(target)
        if fold is not None:
            # the folded weight is new data: the one copy this rewrite makes
            folded = nn.Linear(
                in_channels * math.prod(kernel), linear.out_features, bias=linear.bias is not None, device="meta"
            )
            folded.weight = nn.Parameter(fold(linear.weight), requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                folded.bias = linear.bias
            linear = folded
        gm.add_submodule(target, linear_as_conv(linear, in_channels, kernel))

    return edit


def _replace_batchnorm(target: str, rank: int) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        bn1d = gm.get_submodule(target)
        bn = _BATCH_NORM[rank](
            bn1d.num_features, eps=bn1d.eps, momentum=bn1d.momentum, affine=bn1d.affine,
            track_running_stats=bn1d.track_running_stats, device="meta",
        )  # fmt: skip
        for name, value in list(bn1d.named_parameters(recurse=False)):
            setattr(bn, name, value)
        for name, value in list(bn1d.named_buffers(recurse=False)):
            bn.register_buffer(name, value)
        bn.eval()
        gm.add_submodule(target, bn)

    return edit


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
