"""The ONNX front end of the head: each node after the collapse as a head operation, and the interpreter's
decisions as ONNX nodes on the map.

:func:`head_op` is the one mapping from ONNX nodes to :mod:`fcconv.head.vocabulary`; :func:`rewrite_head` runs
:func:`fcconv.head.interpret.interpret` over the head and emits each decision through the rewriter of
:mod:`fcconv.onnx_graph.rewrite` (its graph, names, and the nodes and weights made so far).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fcconv.conversion import RewrittenLayer
from fcconv.head.interpret import (
    Action,
    Decision,
    Features,
    State,
    Window,
    check_outputs,
    interpret,
    per_channel,
)
from fcconv.head.vocabulary import Family, HeadOp, Kind

# Ops that compute each element from that element alone (extra inputs, where any, are constants).
ELEMENTWISE = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Clip", "Identity", "Dropout", "Cast", "Shrink",
}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
CHANNEL_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_PER_POSITION = ELEMENTWISE | BINARY | CHANNEL_SOFTMAX | {"BatchNormalization", "PRelu", "LayerNormalization"}


def attribute(node: onnx.NodeProto, name: str, default=None):
    for item in node.attribute:
        if item.name == name:
            return helper.get_attribute_value(item)
    return default


def label(node: onnx.NodeProto) -> str:
    """How a message names a node: its name and op, e.g. ``/fc1/Gemm (Gemm)``."""
    return f"{node.name or node.output[0]} ({node.op_type})"


@dataclass(frozen=True)
class _Linear:
    """A Gemm's or MatMul's (out, in) weight, its bias (None when it has none), and the Add folded in as its bias."""

    matrix: np.ndarray
    bias: np.ndarray | None
    kind: str
    output: str
    folded_add: bool


class _Refused(Exception):
    """A fact that refuses a node, as a key of :data:`fcconv.head.interpret.REASONS` and the values it names."""

    def __init__(self, key: str, **facts: Any) -> None:
        super().__init__(key)
        self.key, self.facts = key, facts


def rewrite_head(rewriter: Any, outputs: Sequence[str]) -> list[str]:
    """Carry every head node over to the map, or refuse the head; return the labels of the nodes carried over."""
    graph, head = rewriter.graph, rewriter.head
    start = head.collapse.output[0]
    initial = rewriter.channels[start]
    state: State = Window(tuple(graph.shape(head.map_name)[1:]), head.feature_order) if initial is None else (
        Features(initial)
    )  # fmt: skip
    known = {start}
    ops: list[tuple[HeadOp, onnx.NodeProto]] = []
    linears: dict[int, _Linear] = {}

    def mapped() -> Iterator[HeadOp]:
        """The head's nodes as operations, each mapped once the one before it is decided (so the first node that
        cannot be rewritten is the one named)."""
        for node in head.nodes:
            if id(node) in rewriter.folded:
                continue
            if node.op_type in ("Shape", "Size") or not any(graph.is_float(n) for n in node.input if n):
                continue  # shape arithmetic: nothing the map needs (what read it is removed or refused)
            op = head_op(rewriter, node, known, linears)
            known.update(op.writes)
            ops.append((op, node))
            yield op

    result = interpret(mapped(), {start: state})
    check_outputs(outputs, result.states, label(head.collapse), before=True)
    carried = []
    for decision, (_, node) in zip(result.decisions, ops):
        _emit(rewriter, decision, node, linears.get(id(node)))
        if decision.action in (Action.CARRY, Action.CARRY_PER_CHANNEL):
            carried.append(label(node))
    return carried


def head_op(rewriter: Any, node: onnx.NodeProto, known: set[str], linears: dict[int, _Linear]) -> HeadOp:
    """``node`` in the head vocabulary; ``known`` names the head tensors computed so far. A Gemm's or MatMul's
    weight is read here (into ``linears``), and a MatMul's following Add is taken as its bias."""
    base = {
        "label": rewriter.where(node),
        "reads": tuple(n for n in node.input if n and n in known),
        "writes": tuple(o for o in node.output if o),
    }
    try:
        return _head_op(rewriter, node, known, linears, base)
    except _Refused as refused:
        return HeadOp(kind=Kind.OTHER, reason=refused.key, detail=tuple(refused.facts.items()), **base)


def _head_op(rewriter: Any, node: onnx.NodeProto, known: set[str], linears: dict[int, _Linear], base: dict) -> HeadOp:
    graph, op = rewriter.graph, node.op_type
    rank = _head_rank(graph, node, known)
    if op in _RESHAPES and _same_features(graph.shapes.get(node.input[0]), graph.shapes.get(node.output[0])):
        return HeadOp(kind=Kind.NOOP_RESHAPE, **base)
    if op in _PER_POSITION and not _keeps_shape(graph, node, known):
        raise _Refused("changes-shape", shape="×".join(map(str, graph.shapes.get(node.output[0]) or ("?",))))
    if op in ("Gemm", "MatMul", "Conv"):
        linear = _read_conv(rewriter, node, known) if op == "Conv" else _read_linear(rewriter, node, known)
        linears[id(node)] = linear
        if linear.folded_add:
            base["writes"] = (*base["writes"], linear.output)
        out_features, in_features = linear.matrix.shape
        return HeadOp(kind=Kind.LINEAR, in_features=in_features, out_features=out_features, **base)
    if op in ELEMENTWISE:
        if any(n and not is_scalar(graph, n) for n in node.input[1:]):
            raise _Refused("not-scalar")
        if op == "Dropout" and len(node.output) > 1 and node.output[1] and graph.consumers.get(node.output[1]):
            raise _Refused("mask-read")
        return HeadOp(kind=Kind.ELEMENTWISE, **base)
    if op in BINARY:
        if len(base["reads"]) == 2:
            return HeadOp(kind=Kind.BINARY, **base)
        return HeadOp(kind=Kind.BINARY_CONSTANT, constants=_constant_shapes(graph, node, known, rank=rank), **base)
    if op in CHANNEL_SOFTMAX:
        axis = attribute(node, "axis", 1 if rewriter.opset < 13 else -1)
        return HeadOp(kind=Kind.CHANNEL_SOFTMAX, over_features=axis % rank == 1, **base)
    if op in ("BatchNormalization", "PRelu", "LayerNormalization"):
        if len([o for o in node.output if o]) != 1:
            raise _Refused("parameters-not-constant")
        # BatchNormalization's parameters are per channel at any rank; the others broadcast from the last axis
        shapes = _constant_shapes(
            graph, node, known, "parameters-not-constant", rank=2 if op == "BatchNormalization" else rank
        )
        if op == "PRelu" and all(np.prod(shape) == 1 for shape in shapes):
            return HeadOp(kind=Kind.ELEMENTWISE, **base)
        family = Family.SLOPES if op == "PRelu" else Family.NORMALIZATION
        over = attribute(node, "axis", -1) % rank == 1 if op == "LayerNormalization" else True
        return HeadOp(kind=Kind.PER_FEATURE, family=family, constants=shapes, over_features=over, **base)
    return HeadOp(kind=Kind.OTHER, **base)


def is_scalar(graph: Any, name: str) -> bool:
    value = graph.constant(name)
    return value is not None and value.size == 1


def _constant_shapes(
    graph: Any, node: onnx.NodeProto, known: set[str], key: str = "not-constant", *, rank: int = 2
) -> tuple:
    """The shapes of the constants ``node`` reads besides the head tensors; refuses an input that is neither.

    On a pooled N×C×1×1 head tensor (``rank`` 4) a constant broadcast along its trailing size-1 axes, say
    (C, 1, 1), is read as the (1, C) it is per feature.
    """
    shapes = []
    for name in node.input:
        if not name or name in known:
            continue
        value = graph.constant(name)
        if value is None:
            raise _Refused(key, name=name)
        shape = tuple(value.shape)
        if rank > 2 and len(shape) <= rank:
            aligned = (1,) * (rank - len(shape)) + shape
            if all(d == 1 for d in aligned[2:]):
                shape = aligned[:2]
        shapes.append(shape)
    return tuple(shapes)


def _head_rank(graph: Any, node: onnx.NodeProto, known: set[str]) -> int:
    """The rank of the head tensor ``node`` reads: 2 for (N, features), 4 for a pooled N×C×1×1 map."""
    shape = next((graph.shapes.get(n) for n in node.input if n and n in known), None)
    return len(shape) if shape else 2


def _same_features(source: tuple | None, target: tuple | None) -> bool:
    """Whether a reshape from ``source`` to ``target`` keeps every sample's features as they are: equal shapes, or
    (N, C) and N×C×1×1 in either direction, which on the map are the same tensor."""
    if not source or not target or None in source or None in target:
        return False
    if source == target:
        return True
    return source[:2] == target[:2] and all(d == 1 for d in (*source[2:], *target[2:]))


def _keeps_shape(graph: Any, node: onnx.NodeProto, known: set[str]) -> bool:
    """Whether ``node`` computes a tensor of the shape of the head tensors it reads (nothing broadcast it
    larger, which a per-position form could not do)."""
    result = graph.shapes.get(node.output[0]) if node.output else None
    reads = [graph.shapes.get(n) for n in node.input if n and n in known]
    if result is None or None in result or any(s is None or None in s for s in reads):
        return True  # not known: the interpreter's own checks decide
    return all(s == result for s in reads)


def _read_conv(rewriter: Any, node: onnx.NodeProto, known: set[str]) -> _Linear:
    """A Conv on a pooled N×C×1×1 map as the (out, in) matrix it is there: a 1×1 kernel, without padding (a
    grouped one as its block-diagonal matrix)."""
    graph = rewriter.graph
    source, result = graph.shapes.get(node.input[0]), graph.shapes.get(node.output[0])
    weight = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if node.input[0] not in known or weight is None or weight.ndim != 4:
        raise _Refused("weight-not-constant")
    if not source or len(source) != 4 or any(d != 1 for d in source[2:]):
        raise _Refused("no-equivalent")
    if any(d != 1 for d in weight.shape[2:]):
        raise _Refused("kernel-not-pointwise", kernel="×".join(map(str, weight.shape[2:])))
    if not result or len(result) != 4 or any(d != 1 for d in result[2:]):
        raise _Refused("changes-shape", shape="×".join(map(str, result or ("?",))))
    groups = attribute(node, "group", 1)
    out_channels, per_group = weight.shape[:2]
    matrix = np.zeros((out_channels, per_group * groups), dtype=weight.dtype)
    rows = out_channels // groups
    for g in range(groups):
        matrix[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = weight[
            g * rows : (g + 1) * rows, :, 0, 0
        ]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = graph.constant(node.input[2])
        if bias is None:
            raise _Refused("bias-not-constant")
        bias = _as_bias(bias, out_channels)
    return _Linear(matrix, bias, "Conv 1×1", node.output[0], False)


def _read_linear(rewriter: Any, node: onnx.NodeProto, known: set[str]) -> _Linear:
    """A Gemm's or MatMul's weight as (out, in) and its bias; a MatMul's one following Add of a constant is its
    bias (that Add is then skipped)."""
    graph = rewriter.graph
    if node.input[0] not in known:
        raise _Refused("from-the-right")
    weight = graph.constant(node.input[1])
    if weight is None or weight.ndim != 2:
        raise _Refused("weight-not-matrix")
    if node.op_type == "MatMul":
        if len(graph.shapes.get(node.input[0]) or ()) != 2:
            raise _Refused("no-equivalent")  # a MatMul of a pooled N×C×1×1 map multiplies its last two axes
        return _folded_add(rewriter, node, weight.T)
    if attribute(node, "transA", 0):
        raise _Refused("transposed-input")
    matrix = weight if attribute(node, "transB", 0) else weight.T
    matrix = matrix * np.asarray(attribute(node, "alpha", 1.0), dtype=matrix.dtype)
    if len(node.input) < 3 or not node.input[2]:
        return _Linear(matrix, None, "Gemm", node.output[0], False)
    bias = graph.constant(node.input[2])
    if bias is None:
        raise _Refused("bias-not-constant")
    bias = _as_bias(bias, matrix.shape[0]) * np.asarray(attribute(node, "beta", 1.0), bias.dtype)
    return _Linear(matrix, bias, "Gemm", node.output[0], False)


def _folded_add(rewriter: Any, node: onnx.NodeProto, matrix: np.ndarray) -> _Linear:
    graph, output = rewriter.graph, node.output[0]
    consumers = graph.consumers.get(output, [])
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = next((n for n in add.input if n != output), None)
        value = graph.constant(other) if other else None
        if value is not None and (value.size == 1 or value.size == matrix.shape[0]):
            bias = _as_bias(value, matrix.shape[0])
            rewriter.folded.add(id(add))
            return _Linear(matrix, bias, "MatMul", add.output[0], True)
    return _Linear(matrix, None, "MatMul", output, False)


def _as_bias(value: np.ndarray, out: int) -> np.ndarray:
    """A constant added to every row: one value, or one per output feature."""
    if value.size == 1:
        return np.full(out, value.reshape(-1)[0], dtype=value.dtype)
    if value.size == out and (value.ndim == 1 or value.shape[0] == 1):
        return value.reshape(out)
    raise _Refused("not-per-output", shape=value.shape)


# --- the decisions as ONNX nodes ---------------------------------------------------------------------


def _emit(rewriter: Any, decision: Decision, node: onnx.NodeProto, linear: _Linear | None) -> None:
    action = decision.action
    if action in (Action.KXK_CONV, Action.POINTWISE_CONV):
        _emit_conv(rewriter, decision, node, linear)
    elif action is Action.DROP:
        rewriter.renamed[node.output[0]] = rewriter.source(node.input[0])
        rewriter.removed.append(f"{label(node)}: a reshape that changes nothing")
    elif action is Action.CARRY:
        rewriter.emit(node)
    elif node.op_type in CHANNEL_SOFTMAX:
        _over_channels(rewriter, node, {"axis": 1})
    else:
        _emit_per_channel(rewriter, node, decision)


def _emit_per_channel(rewriter: Any, node: onnx.NodeProto, decision: Decision) -> None:
    """A node with per-feature constants, each laid out along the map's channel axis."""
    graph = rewriter.graph
    inputs = []
    for name in node.input:
        if not name or name in decision.op.reads:
            inputs.append(rewriter.source(name) if name else name)
            continue
        value = graph.constant(name)
        if value.size == 1:
            inputs.append(name)
            continue
        laid_out = per_channel(value, decision.order)
        if node.op_type not in ("BatchNormalization", "LayerNormalization"):
            laid_out = laid_out.reshape(-1, 1, 1)  # broadcast along the channel axis of an N×C×h×w map
        inputs.append(rewriter.add_constant(f"{name}_per_channel", laid_out))
    if node.op_type == "LayerNormalization":
        _over_channels(rewriter, node, {"axis": -1}, inputs, last_axis=True)
    else:
        rewriter.emit(node, inputs)


def _over_channels(
    rewriter: Any,
    node: onnx.NodeProto,
    attributes: dict,
    inputs: Sequence[str] | None = None,
    *,
    last_axis: bool = False,
) -> None:
    """Emit ``node`` acting on axis 1 of the map.

    Softmax from opset 13 takes one axis; before 13 (and for LayerNormalization,
    which normalizes trailing axes) the map is moved channels-last around it.
    """
    if not last_axis and rewriter.opset >= 13:
        rewriter.emit(node, inputs, **attributes)
        return
    source = rewriter.source(node.input[0]) if inputs is None else inputs[0]
    stem = node.name or node.output[0]
    moved = rewriter.names(f"{stem}/channels_last")
    rewriter.nodes.append(helper.make_node("Transpose", [source], [moved], name=moved, perm=[0, 2, 3, 1]))
    inner = rewriter.names(f"{stem}/over_channels")
    rest = list(inputs[1:]) if inputs is not None else [rewriter.source(n) if n else n for n in node.input[1:]]
    copy = rewriter.emit(node, [moved, *rest], **({"axis": -1} if last_axis else {"axis": 3}))
    del copy.output[:]
    copy.output.append(inner)
    back = node.output[0]
    rewriter.nodes.append(
        helper.make_node("Transpose", [inner], [back], name=rewriter.names(f"{stem}/channels_first"), perm=[0, 3, 1, 2])
    )


def _emit_conv(rewriter: Any, decision: Decision, node: onnx.NodeProto, linear: _Linear) -> None:
    """A Gemm or MatMul as a Conv: k×k over the window (weight columns in the window's order), else 1×1."""
    graph = rewriter.graph
    matrix, bias, output = linear.matrix, linear.bias, linear.output
    out_features, in_features = matrix.shape
    order = decision.order
    if decision.action is Action.KXK_CONV:
        map_channels, height, width = decision.window
        note = "rows re-ordered from the flatten's order"
    else:
        map_channels, height, width = order.size, 1, 1
        note = "columns re-ordered to the map's channels"
    kernel = np.zeros((out_features, map_channels * height * width), dtype=matrix.dtype)
    kernel[:, order] = matrix
    kernel = kernel.reshape(out_features, map_channels, height, width)
    if np.array_equal(order, np.arange(order.size)):
        note = ""
    # the kernel takes the weight's name when it replaces it (an initializer nothing else reads)
    exclusive = node.input[1] in graph.initializers and len(graph.consumers.get(node.input[1], [])) == 1
    weight_name = node.input[1] if exclusive else rewriter.names(f"{node.input[1]}_conv")
    rewriter.initializers[weight_name] = numpy_helper.from_array(np.ascontiguousarray(kernel), weight_name)
    inputs = [rewriter.source(node.input[0]), weight_name]
    if bias is not None:
        inputs.append(rewriter.add_constant(f"{weight_name}_bias", bias.astype(kernel.dtype)))
    name = node.name or output
    conv = helper.make_node(
        "Conv", inputs, [output], name=name, kernel_shape=[height, width], strides=[1, 1], pads=[0, 0, 0, 0],
        dilations=[1, 1], group=1,
    )  # fmt: skip
    rewriter.nodes.append(conv)
    if output != node.output[0]:
        rewriter.renamed[node.output[0]] = output
    rewriter.layers.append(
        RewrittenLayer(
            name=name,
            before=f"{linear.kind}({in_features} → {out_features})" + (" + Add" if linear.folded_add else ""),
            after=f"Conv({map_channels} → {out_features})",
            in_map=(map_channels, height, width),
            kernel=(height, width),
            parameters=kernel.size + (0 if bias is None else bias.size),
            note=note,
        )
    )
