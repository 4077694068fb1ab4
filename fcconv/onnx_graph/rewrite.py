"""The head rewritten as convolutions: the chain's layout read into the first kernel, the head's nodes handed to
the interpreter, and each output finished in the input's layout."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fcconv.conversion import HeadGeometry, RewrittenLayer
from fcconv.errors import BadInputError
from fcconv.head.interpret import refusal
from fcconv.onnx_graph.assemble import _assemble, _original_head
from fcconv.onnx_graph.classifier import _FLOAT_TYPES, MAP_AXES, SCORE_AXES, OnnxClassifier, OnnxConversion, OnnxOutput
from fcconv.onnx_graph.collapse import _analyze, _Head
from fcconv.onnx_graph.graph import _ancestors, _Graph, _NameMaker, _sub_model, _taken_names, _value_info
from fcconv.onnx_graph.truncate import _until_names
from fcconv.onnx_graph.trunk import _check_trunk_grows, _size_free_trunk
from fcconv.onnx_head import ELEMENTWISE as _ELEMENTWISE
from fcconv.onnx_head import label as _label
from fcconv.onnx_head import rewrite_head


@dataclass
class _Rewriter:
    """The state of one head rewrite: the nodes and weights made so far, and what each head tensor holds."""

    graph: _Graph
    head: _Head
    opset: int
    names: _NameMaker
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    layers: list[RewrittenLayer] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    channels: dict[str, np.ndarray | None] = field(default_factory=dict)
    """The collapse's output as the chain leaves it: the map channel each feature sits on (None: a k×k window's
    features, in the chain's order); the head's interpreter takes it from there."""
    folded: set[int] = field(default_factory=set)

    def source(self, name: str) -> str:
        return self.renamed.get(name, name)

    def where(self, node: onnx.NodeProto) -> str:
        return f"{_label(node)} after {_label(self.head.collapse)}"

    def add_constant(self, stem: str, value: np.ndarray) -> str:
        name = self.names(stem)
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def emit(self, node: onnx.NodeProto, inputs: Sequence[str] | None = None, **attributes) -> onnx.NodeProto:
        """Append a copy of ``node`` reading ``inputs`` (default: its own, renamed) with some attributes changed."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(self.source(n) if n else n for n in (node.input if inputs is None else inputs))
        if attributes:
            kept = [a for a in copy.attribute if a.name not in attributes]
            del copy.attribute[:]
            copy.attribute.extend(kept)
            copy.attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
        self.nodes.append(copy)
        return copy


def rewrite_onnx(classifier: OnnxClassifier, *, dense: bool = False, pool: str | None = None) -> OnnxConversion:
    """Rewrite ``classifier``'s head as convolutions: a graph with free batch, height and width.

    The converted graph keeps the input's and the outputs' names, in their order;
    each output is (N, K, h, w), one score vector per window of the feature map
    (N×K×1×1 when a global pooling is kept), or (N, h, w, K) for a channels-last
    input, which stays N×H×W×C. The options are :func:`fcconv.rewrite`'s: ``dense``
    drops a global pooling before the head, so each position of the map is scored
    (on a head without one it changes nothing, as there); ``pool`` ('avg' or 'max')
    pools each output over its positions, (N, K) at any size. Raises
    :class:`NotConvertibleError` naming the node that cannot be rewritten exactly.
    """
    if pool not in (None, "avg", "max"):
        raise BadInputError(f"pool {pool!r} is not avg or max")
    model = classifier.model
    batch = classifier.batch or 1
    channels, height, width = classifier.input_shape
    probe_dims = classifier.input_dims(batch + 1, channels, 2 * height, 2 * width)
    analysis = _analyze(classifier)
    graph, head, outputs = analysis.graph, analysis.head, analysis.outputs
    map_shape = graph.shape(head.map_name)

    trunk_ids = _ancestors(graph, head.map_name)
    trunk = _size_free_trunk(graph, trunk_ids, classifier.input_name, head.map_name, probe_dims)
    trunk_nodes, trunk_constants, notes = trunk.nodes, trunk.constants, trunk.notes
    _check_trunk_grows(graph, trunk.probe, trunk_ids, head.map_name, map_shape)

    rewriter = _Rewriter(graph, head, classifier.opset, _NameMaker(_taken_names(model)))
    rewriter.names.taken.update(t.name for t in trunk_constants)
    rewriter.names.taken.update(o for n in trunk_nodes for o in n.output)
    rewriter.initializers.update((t.name, t) for t in trunk_constants)
    _rewrite_chain(rewriter, dense=dense)
    carried = rewrite_head(rewriter, outputs)
    for output_name in outputs:
        _finish_output(rewriter, output_name, classifier.layout, pool)
    _materialize_constants(rewriter, trunk_nodes, classifier.input_name)

    pooled_head = head.pool is not None and not dense  # the head keeps its global pooling: N×K×1×1
    spatial = () if pool is not None else (1, 1) if pooled_head else SCORE_AXES[1:]
    converted = _assemble(classifier, [*trunk_nodes, *rewriter.nodes], rewriter.initializers, analysis, spatial)
    input_dims = classifier.input_dims(MAP_AXES[0], channels, *MAP_AXES[1:])
    trunk_part = _sub_model(
        model,
        trunk_nodes,
        {t.name: t for t in trunk_constants},
        [_value_info(classifier.input_name, classifier.elem_type, input_dims)],
        [_value_info(head.map_name, graph.types[head.map_name], ("batch", map_shape[1], "map_height", "map_width"))],
    )
    head_part = _original_head(classifier, graph, head, map_shape, analysis.classes, whole_map=pooled_head)
    geometry = HeadGeometry(
        input_shape=tuple(classifier.input_shape),
        feature_shape=tuple(map_shape[1:]),
        window=None if pooled_head else (1, 1) if head.pool is not None else tuple(map_shape[2:]),
        stride=(1, 1),
        dense=dense,
        pool=pool,
        logits=classifier.logits,
        until=classifier.until,
    )
    total = sum(
        math.prod(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES and math.prod(t.dims) > 1
    )
    branches = []
    for name in outputs:
        computed = _ancestors(graph, name)
        nodes = [_label(node) for node in head.nodes if id(node) in computed and graph.is_float(node.output[0])]
        branches.append(OnnxOutput(name, analysis.classes[name], nodes))
    return OnnxConversion(
        model=converted,
        trunk=trunk_part,
        head=head_part,
        geometry=geometry,
        head_input=head.map_name,
        layers=rewriter.layers,
        removed=rewriter.removed,
        notes=notes,
        total_parameters=total,
        layout=classifier.layout,
        outputs=branches,
        carried=carried,
        until_names=list(_until_names(analysis)),
    )


def _finish_output(rewriter: _Rewriter, output_name: str, layout: str, pool: str | None = None) -> None:
    """End ``output_name`` in the converted graph: an Identity of the map that holds it, or for a channels-last
    input a Transpose of it to (N, h, w, K); with ``pool`` a global pooling of the map and a Flatten, (N, K) in
    either layout. The head's interpreter has checked that it holds the map's channels in order."""
    final = rewriter.source(output_name)
    if pool is not None:
        _pool_output(rewriter, output_name, final, pool)
    elif layout == "nhwc":
        if final == output_name:  # computed under the output's name: that name now goes to the transposed map
            final = rewriter.names(f"{output_name}/channels_first")
            _rename_tensor(rewriter.nodes, output_name, final)
        name = rewriter.names(f"{output_name}/channels_last")
        rewriter.nodes.append(helper.make_node("Transpose", [final], [output_name], name=name, perm=[0, 2, 3, 1]))
    elif final != output_name:
        identity = rewriter.names(f"{output_name}/identity")
        rewriter.nodes.append(helper.make_node("Identity", [final], [output_name], name=identity))


def _pool_output(rewriter: _Rewriter, output_name: str, final: str, pool: str) -> None:
    """Pool the score map ``final`` over its positions into ``output_name``, (N, K): the map, channels-first
    whatever the layout, is pooled before any Transpose, so a channels-last model needs none."""
    if final == output_name:  # computed under the output's name: that name now goes to the pooled scores
        final = rewriter.names(f"{output_name}/score_map")
        _rename_tensor(rewriter.nodes, output_name, final)
    op = "GlobalAveragePool" if pool == "avg" else "GlobalMaxPool"
    pooled = rewriter.names(f"{output_name}/pooled")
    rewriter.nodes.append(helper.make_node(op, [final], [pooled], name=pooled))
    flatten = rewriter.names(f"{output_name}/flatten")
    rewriter.nodes.append(helper.make_node("Flatten", [pooled], [output_name], name=flatten, axis=1))


def _rename_tensor(nodes: Sequence[onnx.NodeProto], old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` wherever ``nodes`` compute or read it."""
    for node in nodes:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                if name == old:
                    names[index] = new


def _materialize_constants(rewriter: _Rewriter, trunk_nodes: Sequence[onnx.NodeProto], input_name: str) -> None:
    """Give every constant the rewritten head reads (a Constant node's or an Identity's output) an initializer.

    The nodes that computed them are not part of the head, so they are not carried over.
    """
    graph = rewriter.graph
    available = {input_name, *graph.initializers, *rewriter.initializers}
    available.update(o for node in (*trunk_nodes, *rewriter.nodes) for o in node.output)
    for node in rewriter.nodes:
        for name in node.input:
            if not name or name in available:
                continue
            value = graph.constant(name)
            if value is None:
                raise refusal("not-constant", rewriter.where(node), name=name)
            rewriter.initializers[name] = numpy_helper.from_array(np.asarray(value), name)
            available.add(name)


def _rewrite_chain(rewriter: _Rewriter, *, dense: bool = False) -> None:
    """Re-emit the chain's element-wise nodes and pooling on the map; its layout nodes go into the first kernel.

    With ``dense`` the pooling is dropped: its channels are the map's, read at each position.
    """
    head = rewriter.head
    current = head.map_name
    for node in head.chain:
        if node.op_type in _ELEMENTWISE:
            rewriter.emit(node, [current, *node.input[1:]])
            current = node.output[0]
        elif node is head.pool_node and dense:
            rewriter.removed.append(f"{_label(node)}: the global {head.pool} pooling, dropped: a dense map")
        elif node is head.pool_node:
            op = "GlobalAveragePool" if head.pool == "avg" else "GlobalMaxPool"
            pooled = helper.make_node(op, [current], [node.output[0]], name=node.name or node.output[0])
            rewriter.nodes.append(pooled)
            if op != node.op_type:
                rewriter.removed.append(f"{_label(node)}: written as {op}, the same pooling, keeping N×C×1×1")
            current = node.output[0]
        elif head.pool is not None:
            kept = "the dense map stays N×C×h×w" if dense else "the pooled map stays N×C×1×1"
            rewriter.removed.append(f"{_label(node)}: {kept}")
        else:
            rewriter.removed.append(f"{_label(node)}: its order is read into the first kernel")
    rewriter.renamed[head.collapse.output[0]] = current
    order = _flatten_axes(head.feature_order, rewriter.graph.shape(head.map_name)[1:])
    if head.pool is None and order not in (None, "(c, h, w)"):
        rewriter.removed.append(f"the flatten's {order} order: undone, the first kernel reads its weight's rows so")
    window = head.pool is not None or head.feature_order.size == rewriter.graph.shape(head.map_name)[1]
    rewriter.channels[head.collapse.output[0]] = head.feature_order if window else None


def _flatten_axes(order: np.ndarray, map_shape: Sequence[int]) -> str | None:
    """The order of the map's axes the flatten lays its elements out in, as ``(h, w, c)``; None for another order."""
    index = np.arange(math.prod(map_shape)).reshape(map_shape)
    for perm in itertools.permutations(range(3)):
        if np.array_equal(index.transpose(perm).reshape(-1), order):
            return "(" + ", ".join("chw"[axis] for axis in perm) + ")"
    return None
