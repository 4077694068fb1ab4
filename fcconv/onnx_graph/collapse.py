"""Where the head begins: the collapse of the feature map into N×features, the chain of nodes before it, and
the order in which that chain lays the map's elements out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.head.order import Step, feature_order
from fcconv.onnx_graph.classifier import OnnxClassifier
from fcconv.onnx_graph.graph import (
    _ancestors,
    _descendants,
    _failing_node,
    _Graph,
    _infer,
    _measure_unknown_shapes,
)
from fcconv.onnx_head import BINARY as _BINARY
from fcconv.onnx_head import ELEMENTWISE as _ELEMENTWISE
from fcconv.onnx_head import attribute as _attr
from fcconv.onnx_head import is_scalar as _is_scalar
from fcconv.onnx_head import label as _label

_LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


_POOLS = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max", "ReduceMean": "avg", "ReduceMax": "max"}


@dataclass
class _Head:
    """Where the head begins: the feature map, the chain of nodes that collapses it, and the collapse."""

    collapse: onnx.NodeProto
    chain: list[onnx.NodeProto]
    """From the node after the map to the collapse, in graph order."""
    map_name: str
    pool: str | None
    pool_node: onnx.NodeProto | None
    feature_order: np.ndarray
    """For each flattened feature, the element of the (C, H, W) map it reads (pooled: the channel)."""
    nodes: list[onnx.NodeProto]
    """The nodes after the collapse that compute the outputs, in graph order."""


def _find_head(graph: _Graph, input_name: str, outputs: Sequence[str]) -> _Head:
    """The first collapse of a rank ≥ 3 tensor into (N, features) whose descendants are the whole rest of the graph.

    A collapse that is mixed back into the trunk (a squeeze-and-excitation gate's
    Flatten, say) is part of the trunk, not the head.
    """
    candidates = [
        node
        for node in graph.nodes
        if node.input
        and node.output
        and graph.is_float(node.output[0])
        and len(graph.shapes.get(node.input[0]) or ()) >= 3
        and len(graph.shapes.get(node.output[0]) or ()) == 2
    ]
    if not candidates:
        raise NotConvertibleError(
            "no node collapses the feature map into N×features (a Flatten or Reshape before Gemm or MatMul): "
            "not a classifier fcconv can rewrite"
        )
    reason = ""
    for collapse in candidates:
        reason = _open_end(graph, collapse, outputs)
        if not reason:
            break
    else:
        raise NotConvertibleError(reason)
    pooling = _pooling_before(graph, collapse, outputs)
    if pooling is not None and pooling not in _chain(graph, collapse):
        return _read_chain(graph, pooling, input_name)  # the head begins at the pooling: all after it is per position
    return _read_chain(graph, collapse, input_name)


def _pooling_before(graph: _Graph, collapse: onnx.NodeProto, outputs: Sequence[str]) -> onnx.NodeProto | None:
    """The last global pooling ``collapse`` is computed from after which everything is the head's, if any.

    A head that pools and then acts on the pooled N×C×1×1 map (a 1×1 Conv and its
    activation, as PP-LCNet and MobileNetV3 end) begins at that pooling; a pooling
    whose result is mixed back into the map (a squeeze-and-excitation block's) is
    part of the trunk.
    """
    ancestors = _ancestors(graph, collapse.input[0])
    for node in reversed(graph.nodes):
        if id(node) in ancestors and _is_global_pooling(graph, node) and not _open_end(graph, node, outputs):
            return node
    return None


def _is_global_pooling(graph: _Graph, node: onnx.NodeProto) -> bool:
    """Whether ``node`` pools an N×C×H×W map over exactly its spatial axes into N×C×1×1."""
    if node.op_type not in _POOLS or not node.input or not node.output:
        return False
    source, result = graph.shapes.get(node.input[0]) or (), graph.shapes.get(node.output[0]) or ()
    if len(source) != 4 or len(result) != 4 or any(d != 1 for d in result[2:]):
        return False
    return node.op_type.startswith("Global") or _reduced_axes(graph, node, 4) == (2, 3)


def _open_end(graph: _Graph, collapse: onnx.NodeProto, outputs: Sequence[str]) -> str:
    """Why the nodes after ``collapse`` do not form the head ('' when they do): a float tensor read from outside it."""
    nodes = _descendants(graph, collapse.output[0])
    inside = {collapse.output[0]} | {o for node in nodes for o in node.output}
    for node in nodes:
        for name in node.input:
            if name and name not in inside and graph.is_float(name) and graph.constant(name) is None:
                return f"{_label(node)} after {_label(collapse)} also reads {name}, which the flatten does not feed"
    for name in outputs:
        if name not in inside:
            return f"the model also returns {name}, which is not computed by the head after {_label(collapse)}"
    return ""


def _chain_input(node: onnx.NodeProto) -> str:
    return node.input[0]


def _chain(graph: _Graph, collapse: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The collapse and the layout, element-wise and pooling nodes before it, back towards the feature map."""
    chain = [collapse]
    while True:
        name = _chain_input(chain[0])
        node = graph.producer.get(name)
        if node is None or not _extends_chain(graph, node, chain[0]):
            return chain
        chain.insert(0, node)


def _read_chain(graph: _Graph, collapse: onnx.NodeProto, input_name: str) -> _Head:
    """Walk back from the collapse through layout, element-wise and pooling nodes to the feature map."""
    chain = _chain(graph, collapse)
    # The map is the farthest rank-4 tensor back: what comes before it (say, positions mixed
    # in an (N, C, H·W) layout) stays in the trunk and must be made size-free there.
    while len(chain) > 1 and len(graph.shapes.get(_chain_input(chain[0])) or ()) != 4:
        chain.pop(0)
    map_name = _chain_input(chain[0])
    shape = graph.shape(map_name)
    producer = graph.producer.get(map_name)
    if len(shape) != 4:
        origin = _label(producer) if producer is not None else "the input"
        raise NotConvertibleError(
            f"{_label(collapse)} flattens {map_name} from {origin}, of shape {'×'.join(map(str, shape))}: "
            "not an N×C×H×W feature map, so the head has no sliding-window reading"
        )
    permuted = _permuted_map(graph, map_name, input_name)
    if permuted:
        raise NotConvertibleError(
            f"the head reads {map_name}, a map whose axes {permuted} left in another order than N×C×H×W; "
            f"{_label(chain[0])} would have to be carried over as it is"
        )
    pools = [node for node in chain if node.op_type in _POOLS or node.op_type.startswith("Reduce")]
    if len(pools) > 1:
        raise NotConvertibleError(f"{_label(pools[1])} pools the map a second time after {_label(pools[0])}")
    if collapse.op_type not in _LAYOUT and collapse.op_type not in _POOLS:
        raise NotConvertibleError(
            f"{_label(collapse)} collapses the feature map in a way fcconv cannot read per window"
        )
    pool_node = pools[0] if pools else None
    if pool_node is not None and pool_node.op_type not in _POOLS:
        raise NotConvertibleError(f"{_label(pool_node)} reduces the feature map in a way that is not a global pooling")
    order = _feature_order(graph, chain, shape, pool_node)
    head_nodes = [node for node in _descendants(graph, collapse.output[0]) if node not in chain]
    return _Head(
        collapse=collapse,
        chain=chain,
        map_name=map_name,
        pool=_POOLS[pool_node.op_type] if pool_node is not None else None,
        pool_node=pool_node,
        feature_order=order,
        nodes=head_nodes,
    )


def _extends_chain(graph: _Graph, node: onnx.NodeProto, reader: onnx.NodeProto) -> bool:
    """Whether ``node``, whose output ``reader`` reads, belongs to the collapse's chain.

    It must be a layout, element-wise or pooling node whose result nothing else
    reads (Shape nodes aside: they only measure it).
    """
    if len([o for o in node.output if o]) != 1 and node.op_type != "Dropout":
        return False
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and graph.consumers.get(node.output[1]):
        return False
    readers = [n for n in graph.consumers.get(node.output[0], []) if n.op_type not in ("Shape", "Size")]
    if readers != [reader]:
        return False
    if node.op_type in _LAYOUT or node.op_type in _POOLS:
        return True
    if node.op_type in _ELEMENTWISE:
        return all(_is_scalar(graph, name) for name in node.input[1:] if name)
    return False


def _permuted_map(graph: _Graph, map_name: str, input_name: str) -> str:
    """How ``map_name`` is transposed from the input's N×C×H×W order ('' when it is not).

    Transposes compose; element-wise nodes keep their input's order; every other
    node (Conv, pooling, Reshape) makes an N×C×H×W map. A channels-last input is
    (N, H, W, C), so the Transpose(0, 3, 1, 2) that Keras exports begin with makes it N×C×H×W.
    """
    order: dict[str, tuple[int, ...]] = {input_name: (0, 2, 3, 1) if graph.layout == "nhwc" else (0, 1, 2, 3)}
    for node in graph.nodes:
        if not node.input or not node.output:
            continue
        source = order.get(node.input[0], (0, 1, 2, 3))
        if node.op_type == "Transpose" and len(source) == len(_attr(node, "perm", [])):
            result = tuple(source[p] for p in _attr(node, "perm"))
        elif node.op_type in _ELEMENTWISE or node.op_type in _BINARY:
            data = next((n for n in node.input if n and graph.constant(n) is None), node.input[0])
            result = order.get(data, (0, 1, 2, 3))
        else:
            result = (0, 1, 2, 3)
        for name in node.output:
            order[name] = result
        if node.output[0] == map_name:
            break
    result = order.get(map_name, (0, 1, 2, 3))
    if result == (0, 1, 2, 3):
        return ""
    return "(" + ", ".join("NCHW"[a] for a in result) + ")"


def _feature_order(
    graph: _Graph, chain: Sequence[onnx.NodeProto], map_shape: tuple[int, ...], pool_node: onnx.NodeProto | None
) -> np.ndarray:
    """Which element of the (C, H, W) map (pooled: which channel) each flattened feature is.

    The chain's layout nodes are applied to an array of element indices, at the
    native shapes, so the answer is exact for any Transpose and Reshape between the
    map and the collapse; a pooling must reduce exactly the spatial axes.
    """
    batch, channels, height, width = map_shape
    steps = _layout_steps(graph, chain, batch) if pool_node is None else None
    if steps is not None:
        return feature_order(map_shape[1:], steps)
    per_sample = channels if pool_node is not None else channels * height * width
    if pool_node is None:
        index = np.arange(batch * per_sample).reshape(map_shape)
    else:
        # each element carries its (sample, channel); the pooling must gather exactly one such pair
        index = np.broadcast_to(
            (np.arange(batch)[:, None] * channels + np.arange(channels)[None, :])[:, :, None, None], map_shape
        )
    for node in chain:
        if node.op_type in _ELEMENTWISE:
            continue
        out_shape = graph.shape(node.output[0])
        if node.op_type == "Transpose":
            perm = _attr(node, "perm") or list(reversed(range(index.ndim)))
            index = np.transpose(index, perm)
        elif node.op_type in _LAYOUT:
            index = index.reshape(out_shape)
        else:
            index = _pool_index(graph, node, index, out_shape)
    collapsed = index.reshape(index.shape[0], -1) if index.ndim >= 2 else index
    if collapsed.shape != (batch, per_sample) or index.shape[0] != batch:
        raise NotConvertibleError(
            f"{_label(chain[-1])} does not keep the batch axis apart: its output is "
            f"{'×'.join(map(str, index.shape))} for a batch of {batch}"
        )
    order = collapsed[0] if batch else collapsed
    offsets = collapsed - np.arange(batch)[:, None] * per_sample
    if not np.array_equal(offsets, np.broadcast_to(order, offsets.shape)) or sorted(order) != list(range(per_sample)):
        raise NotConvertibleError(f"{_label(chain[-1])} mixes the samples of a batch")
    return np.asarray(order)


def _layout_steps(graph: _Graph, chain: Sequence[onnx.NodeProto], batch: int) -> list[Step] | None:
    """The chain's layout nodes as steps on one sample, or None when one of them moves or resizes the batch axis
    (the batch-wide index array then shows whether it mixes the samples)."""
    steps: list[Step] = []
    for node in chain:
        if node.op_type in _ELEMENTWISE:
            continue
        out_shape = graph.shape(node.output[0])
        if node.op_type == "Transpose":
            perm = _attr(node, "perm") or list(reversed(range(len(out_shape))))
            if perm[0] != 0:
                return None
            steps.append(("transpose", [axis - 1 for axis in perm[1:]]))
        elif node.op_type in _LAYOUT:
            if not out_shape or out_shape[0] != batch:
                return None
            steps.append(("reshape", out_shape[1:]))
        else:
            return None
    return steps


def _pool_index(graph: _Graph, node: onnx.NodeProto, index: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """The (sample, channel) each output of a global pooling gathers; refuses one that mixes channels or keeps positions."""
    axes = _reduced_axes(graph, node, index.ndim)
    low, high = index.min(axis=axes, keepdims=True), index.max(axis=axes, keepdims=True)
    gathered = math.prod(index.shape[a] for a in axes)
    positions = math.prod(index.shape) // max(gathered, 1)
    if not np.array_equal(low, high) or positions != len(np.unique(index)):
        raise NotConvertibleError(f"{_label(node)} does not pool exactly the spatial axes of the feature map")
    return low.reshape(out_shape)


def _reduced_axes(graph: _Graph, node: onnx.NodeProto, rank: int) -> tuple[int, ...]:
    """The axes a global pooling or a Reduce node reduces, for an input of ``rank``."""
    if node.op_type.startswith("Global"):
        return tuple(range(2, rank))
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.constant(node.input[1])
        axes = None if value is None else value.tolist()
    if axes is None:
        axes = list(range(rank))
    return tuple(sorted(a % rank for a in axes))


@dataclass
class _Analysis:
    """The input model read at its native size: its graph, its head, and its outputs' (N, K) shapes."""

    graph: _Graph
    head: _Head
    outputs: list[str]
    classes: dict[str, int]


def _analyze(classifier: OnnxClassifier) -> _Analysis:
    """Infer the input model's shapes at its native size and find its head; refuse what is not a classifier."""
    model = classifier.model
    native_dims = classifier.input_dims(classifier.batch or 1, *classifier.input_shape)
    try:
        shapes, types = _infer(model, classifier.input_name, native_dims)
    except Exception as exc:  # noqa: BLE001 - a model that fails at its own size is not usable
        raise BadInputError(f"shape inference fails at the native size {native_dims}: {_failing_node(exc)}") from None
    _measure_unknown_shapes(model, classifier, native_dims, shapes, types)
    graph = _Graph(model, shapes, types, classifier.layout)
    outputs = classifier.output_names
    classes = {}
    for name in outputs:
        out_shape = graph.shape(name)
        if len(out_shape) != 2:
            raise NotConvertibleError(
                f"the output {name} is {'×'.join(map(str, out_shape))}, not N×classes: not a classifier fcconv reads"
            )
        classes[name] = out_shape[1]
    return _Analysis(graph, _find_head(graph, classifier.input_name, outputs), outputs, classes)
