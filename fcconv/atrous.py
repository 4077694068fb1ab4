"""``--stride S``: a finer output stride, exactly, by rewriting the trunk à trous.

A converted VGG16 or ResNet scores one window every 32 pixels, the product of the
strides of its poolings and strided convolutions. To score one every S pixels, the
layers that take the stride from S to the total lose their stride, and every later
layer (the converted head's k×k kernel included) is dilated by the stride removed
before it, its padding with it. Each layer so changed computes, on every polyphase
component of its input, what the original layer computes on that component alone
(at stride 1 for a layer that lost its stride), interleaved: the map holds one score
vector every S pixels, and the original map at the total stride is its subgrid of
every (total / S)-th position.

This module plans that rewrite on the converted module's graph (:func:`plan_atrous`),
applies it with copies of the changed modules (:func:`apply_atrous`; the original's
modules and weights are shared, never changed), and reads the original's own layers à
trous for verification (:class:`AtrousReading`). A layer whose output is not a function
of each position's neighbourhood alone (a global pooling, a squeeze-and-excitation
gate, a reshape) cannot be read à trous, and is refused by name.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.layers import AvgPoolAtrous, FullyConnectedConvMixin
from fcconv.sizes import parse_counts

if TYPE_CHECKING:
    from fcconv.conversion import Conversion

__all__ = [
    "AtrousLayer", "AtrousPlan", "AtrousReading", "apply_atrous", "parse_stride", "plan_atrous", "rewrite_atrous",
]  # fmt: skip

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PER_POSITION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Threshold, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)  # fmt: skip
"""Modules that act on each position of an (N, C, *S) map alone (batch norms in eval mode: per channel)."""
_PER_POSITION_OPS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "relu", "relu_", "relu6", "hardtanh",
    "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "silu", "silu_", "gelu", "gelu_", "hardswish", "hardswish_",
    "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "mish_", "softplus", "clamp",
    "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "neg", "abs", "exp", "dropout", "feature_dropout",
    "alpha_dropout", "contiguous", "clone", "to", "type_as", "float", "detach", "alias", "threshold", "_to_copy",
}  # fmt: skip
"""Functions and methods (by name, as torch.fx and torch.export write them) that act on each element alone."""
_CHANNEL_OPS = {"cat", "concat", "concatenate", "softmax", "log_softmax", "_softmax", "_log_softmax"}
"""Functions over the channel axis only: per position when their axis is 1."""


@dataclass(frozen=True)
class AtrousLayer:
    """One layer the rewrite changes: what it was and what it became."""

    name: str
    kind: str
    before: str
    after: str


@dataclass(frozen=True)
class AtrousChange:
    """One call of a module that the rewrite changes: the ``call``-th call (from 0, in graph order) of ``target``."""

    target: str
    call: int
    input_dilation: tuple[int, ...]
    """The dilation of the map it reads, per axis."""
    stride: tuple[int, ...]
    """Its stride after the rewrite."""
    unstrided: bool
    """Whether it loses its stride."""


@dataclass
class AtrousPlan:
    """The rewrite for one output stride: per spatial axis, the stride asked for, the model's, and the dilation
    (total / stride) of the converted head's window; the layers that change, each with its input's dilation."""

    stride: tuple[int, ...]
    total: tuple[int, ...]
    layers: list[AtrousLayer] = field(default_factory=list)
    changes_by_call: dict[tuple[str, int], AtrousChange] = field(default_factory=dict)
    """(module path, call) → what changes there, for every module call the rewrite changes."""

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(t // s for t, s in zip(self.total, self.stride))

    @property
    def changes(self) -> bool:
        return bool(self.layers)


def parse_stride(text: str | int | Sequence[int], rank: int | None = None) -> tuple[int, ...]:
    """``--stride``: one positive integer for every spatial axis, or one per axis (``2,16,16``); with ``rank``
    known, refused unless there is one value or ``rank`` of them."""
    parsed = parse_counts(text, "--stride", "16, or 2,16,16")
    if rank is not None and len(parsed) not in (1, rank):
        raise BadInputError(
            f"--stride {_dims(parsed, ',')}: the model has {rank} spatial axes; give one stride or {rank}"
        )
    return parsed


def rewrite_atrous(conversion: Conversion, stride: str | int | Sequence[int]) -> AtrousPlan:
    """Rewrite a conversion's module à trous for an output ``stride``, in place; returns the plan."""
    geometry = conversion.geometry
    rank = len(geometry.feature_shape) - 1
    parsed = parse_stride(stride, rank)
    if geometry.window is None or geometry.pool is not None:
        raise BadInputError(
            "--stride makes a finer score map, but this conversion pools the whole map into one score vector "
            "(add --dense to drop the global pooling; --pool cannot be combined with --stride)"
        )
    if geometry.added_axes:
        raise BadInputError("--stride is not available for a model that takes a channel-free input")
    if any(s != 1 for s in geometry.stride):
        raise NotConvertibleError("--stride: the head reads its window through a strided pooling")
    plan = plan_atrous(conversion.module, rank, parsed)
    apply_atrous(conversion.module, plan, rank)
    conversion.module.fcconv_stride = plan.stride
    return plan


def _dims(values: Sequence[int], sep: str = "×") -> str:
    return sep.join(map(str, values))


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet if packet is not None else target, "__name__", str(target))


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def _strided_module(module: nn.Module) -> bool:
    return isinstance(module, (*_CONV, *_MAX_POOL, *_AVG_POOL))


def _describe(module: nn.Module, rank: int) -> str:
    parts = [type(module).__name__]
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, rank)
    parts.append(f"stride {'×'.join(map(str, stride))}")
    dilation = _tuple(getattr(module, "dilation", 1), rank)
    if any(d > 1 for d in dilation):
        parts.append(f"dilation {'×'.join(map(str, dilation))}")
    return ", ".join(parts)


def plan_atrous(gm: fx.GraphModule, rank: int, stride: tuple[int, ...]) -> AtrousPlan:
    """Decide, for the converted module ``gm``, which layers lose their stride and which are dilated.

    ``stride`` holds one value per spatial axis, or one for all: then an axis whose total
    stride is smaller keeps its own (a video model's time axis under ``--stride 8``).

    Raises :class:`BadInputError` naming the valid strides where ``stride`` is not one
    (it must be the product of the strides of the layers before some point of the
    trunk), and :class:`NotConvertibleError` naming the layer where a layer that must be
    read à trous cannot be.
    """
    modules = dict(gm.named_modules())
    cumulative: dict[fx.Node, tuple[int, ...]] = {}
    pooled: set[fx.Node] = set()  # values computed from whole-map poolings alone (a gate's layers)
    whole_map: list[tuple[fx.Node, fx.Node]] = []  # (global pooling, the map it pools)
    steps: list[list[tuple[int, int, str]]] = [[] for _ in range(rank)]  # per axis: (stride before, stride, layer)
    decisions: list[tuple[fx.Node, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    unknown: dict[fx.Node, str] = {}
    one = (1,) * rank
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            cumulative[node] = one
            continue
        if node.op in ("get_attr", "output"):
            continue
        inputs = [a for a in node.all_input_nodes if a in cumulative or a in unknown or a in pooled]
        if not inputs:
            continue
        if any(a in unknown for a in inputs):
            unknown[node] = unknown[next(a for a in inputs if a in unknown)]
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        maps = [a for a in inputs if a not in pooled]
        if not maps:
            pooled.add(node)
            continue
        if len(maps) == 1 and _pools_whole_map(node, module, rank):
            pooled.add(node)
            whole_map.append((node, maps[0]))
            continue
        inputs = maps
        if module is not None and _strided_module(module) and len(inputs) == 1:
            (source,) = inputs
            layer_stride = _tuple(module.stride if module.stride is not None else module.kernel_size, rank)
            for axis in range(rank):
                if layer_stride[axis] > 1:
                    steps[axis].append((cumulative[source][axis], layer_stride[axis], _what(node, module)))
            cumulative[node] = tuple(c * s for c, s in zip(cumulative[source], layer_stride))
            decisions.append((node, module, cumulative[source], layer_stride))
            continue
        if _per_position(node, module, rank, inputs, gm, pooled):
            firsts = {cumulative[a] for a in inputs}
            if len(firsts) > 1:
                unknown[node] = f"{node.name} joins maps of different strides"
                continue
            cumulative[node] = firsts.pop()
            continue
        unknown[node] = _what(node, module)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    ends = [a for a in output.all_input_nodes if a in cumulative or a in unknown]
    lost = [a for a in ends if a in unknown]
    if lost or not ends:
        reason = unknown[lost[0]] if lost else "the output is not a map"
        raise NotConvertibleError(f"--stride: the map's stride cannot be followed through {reason}")
    totals = {cumulative[a] for a in ends}
    if len(totals) > 1:
        raise NotConvertibleError("--stride: the model's outputs have different strides")
    total = totals.pop()
    if len(stride) == 1 and rank > 1:
        if all(stride[0] > t for t in total):
            raise BadInputError(f"--stride {stride[0]} is larger than the model's total stride {_dims(total)}")
        stride = tuple(min(stride[0], t) for t in total)
    elif len(stride) == 1:
        stride = (stride[0],)
    _refuse_invalid_stride(stride, total, steps)
    plan = AtrousPlan(stride=stride, total=total)
    if stride == total:
        return plan
    _decide(gm, plan, decisions, rank)
    _refuse_unreadable(gm, plan, rank, cumulative, pooled)
    for node, source in whole_map:
        if any(c > s for c, s in zip(cumulative[source], plan.stride)):
            raise NotConvertibleError(
                f"--stride: {_what(node, modules.get(node.target))} pools the whole map (a global pooling, or a "
                "squeeze-and-excitation gate): read à trous, that map holds every polyphase component, so its "
                "pooling is not the original's"
            )
    return plan


def _pools_whole_map(node: fx.Node, module: nn.Module | None, rank: int) -> bool:
    """A global pooling: an adaptive pooling to one position, or a mean or maximum over every spatial axis."""
    if module is not None:
        if not isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):  # fmt: skip
            return False
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    if node.op not in ("call_function", "call_method"):
        return False
    name = _op_name(node)
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
                "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"):  # fmt: skip
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    if name in ("mean", "amax", "sum"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        return {d % (rank + 2) for d in dims} == set(range(2, rank + 2))
    return False


def _per_position(
    node: fx.Node,
    module: nn.Module | None,
    rank: int,
    inputs: list[fx.Node],
    gm: fx.GraphModule,
    pooled: set[fx.Node] = frozenset(),  # type: ignore[assignment]
) -> bool:
    """Whether ``node`` computes each position of its output from the same position of its inputs alone (other
    operands: numbers, per-channel constants, or ``pooled`` values, the same at every position)."""
    if module is not None:
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return module.dim is not None and module.dim % (rank + 2) == 1
        if isinstance(module, FullyConnectedConvMixin) and math.prod(module.kernel_size) == 1:
            return True
        return isinstance(module, _PER_POSITION_MODULES) or type(module).__name__ == "ChannelLayerNorm"
    if node.op not in ("call_function", "call_method"):
        return False
    name = _op_name(node)
    if name in _CHANNEL_OPS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return isinstance(dim, int) and dim % (rank + 2) == 1
    if name not in _PER_POSITION_OPS:
        return False
    # every other operand a number, or a tensor that is constant over the spatial axes (a per-channel scale)
    for arg in node.all_input_nodes:
        if arg in inputs or arg in pooled:
            continue
        shape = _constant_shape(arg, gm)
        if shape is None or any(s != 1 for s in shape[-rank:]):
            return False
    return True


def _constant_shape(node: fx.Node, gm: fx.GraphModule) -> tuple[int, ...] | None:
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _what(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"{node.target} ({type(module).__name__})"
    return f"{node.name} ({_op_name(node)})"


def _valid_strides(total: int, steps: list[tuple[int, int, str]]) -> list[int]:
    candidates = {1, total} | {before for before, _, _ in steps} | {before * s for before, s, _ in steps}
    return sorted(v for v in candidates if total % v == 0 and not any(b < v < b * s for b, s, _ in steps))


def _refuse_invalid_stride(
    stride: tuple[int, ...], total: tuple[int, ...], steps: list[list[tuple[int, int, str]]]
) -> None:
    axes = ["length"] if len(total) == 1 else (["height", "width"] if len(total) == 2 else ["depth", "height", "width"])
    uniform = len(set(stride)) == 1 and len({tuple(_valid_strides(t, st)) for t, st in zip(total, steps)}) == 1
    for axis, (s, t) in enumerate(zip(stride, total)):
        valid = _valid_strides(t, steps[axis])
        if s not in valid:
            along = "" if uniform else f" along the {axes[axis]}"
            inside = [f"{name} takes it from {b} to {b * ls}" for b, ls, name in steps[axis] if b < s < b * ls]
            between = inside[0] if inside else "no layer's output is at that stride"
            why = f"does not divide the model's total stride {t}" if t % s else f"is no stride of its map ({between})"
            raise BadInputError(f"--stride {s}{along} {why}: the valid strides{along} are {', '.join(map(str, valid))}")


def _decide(
    gm: fx.GraphModule,
    plan: AtrousPlan,
    decisions: list[tuple[fx.Node, nn.Module, tuple[int, ...], tuple[int, ...]]],
    rank: int,
) -> None:
    """Per strided layer: its input's dilation (cumulative stride / asked stride, where above it) and whether it
    loses its stride (its input is already at the asked stride)."""
    calls: dict[str, int] = {}
    for node, module, before, layer_stride in decisions:
        name = str(node.target)
        call = calls[name] = calls.get(name, -1) + 1
        d_in = tuple(max(1, b // s) for b, s in zip(before, plan.stride))
        unstrided = any(b >= s and ls > 1 for b, s, ls in zip(before, plan.stride, layer_stride))
        dilated = any(d > 1 for d in d_in) and any(k > 1 for k in _tuple(module.kernel_size, len(d_in)))
        if not (unstrided or dilated):
            continue
        _refuse_layer(name, module, rank, unstrided)
        new_stride = tuple(1 if b >= s else ls for b, s, ls in zip(before, plan.stride, layer_stride))
        plan.changes_by_call[(name, call)] = AtrousChange(name, call, d_in, new_stride, unstrided)
        kind = "stride removed" if unstrided else "dilated"
        changed = _atrous_module(module, d_in, new_stride, rank)
        shown = name if sum(str(n.target) == name for n, *_ in decisions) == 1 else f"{name} (call {call + 1})"
        plan.layers.append(AtrousLayer(shown, kind, _describe(module, rank), _after(changed, rank)))


def _after(module: nn.Module, rank: int) -> str:
    if isinstance(module, AvgPoolAtrous):
        return f"AvgPool{rank}d, stride {_dims((1,) * rank)}, dilation {_dims(module.dilation)}"
    return _describe(module, rank)


def _refuse_layer(name: str, module: nn.Module, rank: int, unstrided: bool) -> None:
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros":
            raise NotConvertibleError(
                f"--stride: {name} pads with {module.padding_mode!r}, which differs on each polyphase component; "
                "only zero padding is read à trous"
            )
        if isinstance(module.padding, str) and module.padding == "same":
            total = [d * (k - 1) for d, k in zip(_tuple(module.dilation, rank), _tuple(module.kernel_size, rank))]
            if any(t % 2 for t in total):
                raise NotConvertibleError(f"--stride: {name} pads 'same' unevenly (an even kernel)")
    if isinstance(module, _MAX_POOL + _AVG_POOL) and unstrided and module.ceil_mode:
        raise NotConvertibleError(
            f"--stride: {name} pools in ceil mode: its last window at the border is partial, and at stride 1 it "
            "has no such window, so the finer map would not hold the original's"
        )
    if isinstance(module, _MAX_POOL) and module.return_indices:
        raise NotConvertibleError(f"--stride: {name} returns its indices, which are positions of the map")
    if (
        isinstance(module, _AVG_POOL)
        and not module.count_include_pad
        and any(p > 0 for p in _tuple(module.padding, rank))
    ):
        raise NotConvertibleError(
            f"--stride: {name} averages without its padding (count_include_pad=False), a divisor that depends on "
            "the position; only poolings that count their padding are read à trous"
        )


def _padding(module: nn.Module, rank: int) -> tuple[int, ...]:
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * rank
        return tuple(d * (k - 1) // 2 for d, k in zip(_tuple(module.dilation, rank), _tuple(module.kernel_size, rank)))
    return _tuple(padding, rank)


def _atrous_module(module: nn.Module, d_in: tuple[int, ...], stride: tuple[int, ...], rank: int) -> nn.Module:
    """A copy of ``module`` (sharing its parameters) at ``stride``, dilated by ``d_in`` with its padding."""
    padding = tuple(p * d for p, d in zip(_padding(module, rank), d_in))
    dilation = tuple(d0 * d for d0, d in zip(_tuple(getattr(module, "dilation", 1), rank), d_in))
    if isinstance(module, _AVG_POOL) and any(d > 1 for d in dilation):
        if any(s > 1 for s in stride):
            raise NotConvertibleError("--stride: a strided average pooling after a removed stride")
        return AvgPoolAtrous(_tuple(module.kernel_size, rank), dilation, padding, module.divisor_override)
    changed = copy.copy(module)
    changed._parameters = module._parameters  # shared, not copied
    changed.stride = stride
    changed.padding = padding
    if not isinstance(module, _AVG_POOL):
        changed.dilation = dilation
    if isinstance(module, (*_MAX_POOL, *_AVG_POOL)):
        changed.ceil_mode = False
    return changed


def _refuse_unreadable(
    gm: fx.GraphModule,
    plan: AtrousPlan,
    rank: int,
    cumulative: dict[fx.Node, tuple[int, ...]],
    pooled: set[fx.Node],
) -> None:
    """Every node that reads a dilated map must be a layer the plan changes or one that acts per position."""
    modules = dict(gm.named_modules())
    changed = {change.target for change in plan.changes_by_call.values()}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or node not in cumulative:
            continue
        inputs = [a for a in node.all_input_nodes if a in cumulative]
        if not inputs:
            continue
        if not any(any(c > s for c, s in zip(cumulative[a], plan.stride)) for a in inputs):
            continue  # reads a map at or below the asked stride: kept as it is
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and str(node.target) in changed:
            continue
        if module is not None and _strided_module(module):
            continue  # a strided layer on an undilated axis only
        if not _per_position(node, module, rank, inputs, gm, pooled):
            raise NotConvertibleError(
                f"--stride: {_what(node, module)} does not act on each position of the map alone, so it cannot be "
                "read à trous"
            )


def apply_atrous(gm: fx.GraphModule, plan: AtrousPlan, rank: int) -> None:
    """Swap each changed module of ``gm`` for its à-trous copy (the original's modules are left as they are)."""
    for node, change in _changed_calls(gm, plan):
        module = gm.get_submodule(change.target)
        changed = _atrous_module(module, change.input_dilation, change.stride, rank)
        if _call_count(gm, change.target) == 1:
            gm.set_submodule(change.target, changed, strict=False)
        else:  # a module called on maps of different dilations: one copy per call
            name = f"{change.target.replace('.', '_')}_atrous{change.call}"
            gm.add_submodule(name, changed)
            node.target = name
    gm.recompile()


def _call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(node.op == "call_module" and node.target == target for node in gm.graph.nodes)


def _changed_calls(gm: fx.GraphModule, plan: AtrousPlan) -> list[tuple[fx.Node, AtrousChange]]:
    """Each call of ``gm`` that the plan changes, with its change (calls counted per module, in graph order)."""
    calls: dict[str, int] = {}
    found = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        call = calls[node.target] = calls.get(node.target, -1) + 1
        change = plan.changes_by_call.get((str(node.target), call))
        if change is not None:
            found.append((node, change))
    return found


class AtrousReading:
    """The original's own layers read à trous: the reference :mod:`fcconv.verify` compares a ``--stride`` export with.

    ``features`` (the original trunk as a graph module) runs node by node; each layer the
    plan changes runs as the original module (at stride 1 where the plan removes its
    stride) on every polyphase component of its input, and the outputs are interleaved.
    Everything else runs as it is: it acts on each position alone.
    """

    def __init__(self, features: fx.GraphModule, plan: AtrousPlan, rank: int) -> None:
        self.features = features
        self.plan = plan
        self.rank = rank
        self.layers: dict[fx.Node, Callable[[torch.Tensor], torch.Tensor]] = {}
        for node, change in _changed_calls(features, plan):  # the trunk's calls: those of the head are not here
            module = features.get_submodule(change.target)
            if change.unstrided:
                module = copy.copy(module)
                module.stride = change.stride
            self.layers[node] = _polyphase(module, change.input_dilation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers

        class _Reading(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n in layers:
                    (arg,) = self.fetch_args_kwargs_from_env(n)[0]
                    return layers[n](arg)
                return super().run_node(n)

        return _Reading(self.features).run(x)


def _polyphase(module: nn.Module, dilation: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` applied to every polyphase component of its input (component φ: every ``dilation``-th position
    from φ), each result put back at the positions of its component."""

    def read(x: torch.Tensor) -> torch.Tensor:
        parts = {}
        for phase in itertools.product(*(range(d) for d in dilation)):
            index = (Ellipsis, *(slice(p, None, d) for p, d in zip(phase, dilation)))
            parts[phase] = module(x[index])
        first = next(iter(parts.values()))
        size = [max(p[a] + d * (part.shape[2 + a] - 1) + 1 for p, part in parts.items())
                for a, d in enumerate(dilation)]  # fmt: skip
        out = first.new_empty(*first.shape[:2], *size)
        for phase, part in parts.items():
            index = (Ellipsis, *(slice(p, None, d) for p, d in zip(phase, dilation)))
            out[index] = part
        return out

    return read


def dilated_windows(x: torch.Tensor, window: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Every window of ``x`` (N, C, *S) whose cells lie ``dilation`` apart, at stride 1: (N, *positions, C·∏window)."""
    rank = len(window)
    spans = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    windows = x
    for axis, span in enumerate(spans, start=2):
        windows = windows.unfold(axis, span, 1)
    index = (Ellipsis, *(slice(None, None, d) for d in dilation))
    windows = windows[index]  # (N, C, *positions, *window)
    rows = windows.permute(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    return rows.reshape(*rows.shape[: 1 + rank], -1)
