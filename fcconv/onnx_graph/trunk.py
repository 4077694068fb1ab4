"""The trunk made size-free: each Reshape whose target is fixed to the native size given a target computed from
its input's shape, checked at a larger probe size."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fcconv.errors import NotConvertibleError
from fcconv.onnx_graph.graph import _failing_node, _Graph, _infer, _NameMaker, _run_shapes, _taken_names
from fcconv.onnx_head import attribute as _attr
from fcconv.onnx_head import label as _label


def _reshape_groups(source: Sequence[int], target: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Align a reshape's input and output axes into groups of equal size (None when they do not align).

    Equal axes pair up one to one; an axis of size 1 may stand alone on either side.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(source) or j < len(target):
        if i < len(source) and j < len(target) and source[i] == target[j]:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(source) and source[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(target) and target[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i < len(source) and j < len(target):
            left, right = [i], [j]
            size_in, size_out = source[i], target[j]
            i, j = i + 1, j + 1
            while size_in != size_out:
                if size_in < size_out and i < len(source):
                    left.append(i)
                    size_in *= source[i]
                    i += 1
                elif size_out < size_in and j < len(target):
                    right.append(j)
                    size_out *= target[j]
                    j += 1
                else:
                    return None
            groups.append((left, right))
        else:
            return None
    return groups


def _size_free_target(
    node: onnx.NodeProto,
    groups: list[tuple[list[int], list[int]]],
    source: Sequence[int],
    target: Sequence[int],
    varying: Sequence[bool],
    names: _NameMaker,
    initializers: list[onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing a reshape's target from its input's shape: the axes that follow the input's size are read
    from it (a merged group is their product), the others keep their native size."""
    stem = node.name or node.output[0]
    nodes: list[onnx.NodeProto] = []
    shape_name = names(f"{stem}/fcconv_input_shape")
    nodes.append(helper.make_node("Shape", [node.input[0]], [shape_name], name=shape_name))
    parts: list[str] = []
    for left, right in groups:
        if not right:
            continue
        if not any(varying[a] for a in left):
            const = names(f"{stem}/fcconv_static_dims")
            initializers.append(numpy_helper.from_array(np.array([target[b] for b in right], np.int64), const))
            parts.append(const)
            continue
        factors = []
        for axis in left:
            index = names(f"{stem}/fcconv_axis{axis}")
            initializers.append(numpy_helper.from_array(np.array([axis], np.int64), index))
            value = names(f"{stem}/fcconv_dim{axis}")
            nodes.append(helper.make_node("Gather", [shape_name, index], [value], name=value, axis=0))
            factors.append(value)
        product = factors[0]
        for factor in factors[1:]:
            merged = names(f"{stem}/fcconv_product")
            nodes.append(helper.make_node("Mul", [product, factor], [merged], name=merged))
            product = merged
        parts.append(product)
    target_name = names(f"{stem}/fcconv_target")
    nodes.append(helper.make_node("Concat", parts, [target_name], name=target_name, axis=0))
    return nodes, target_name


@dataclass
class _SizeFreeTrunk:
    """The trunk's nodes made size-free, the constants they read, what changed, and its shapes at the probe size."""

    nodes: list[onnx.NodeProto]
    constants: list[onnx.TensorProto]
    notes: list[str]
    probe: dict[str, tuple]


def _size_free_trunk(
    graph: _Graph, trunk: set[int], input_name: str, map_name: str, probe_dims: tuple[int, ...]
) -> _SizeFreeTrunk:
    """The trunk with each Reshape whose target is fixed to the native size given a target computed from its
    input's shape.

    Which axes follow the input's size is read by inferring shapes at the native and
    at a larger probe size (batch and spatial axes both grow). A Reshape keeps those
    axes whole or merges them; one that splits or drops such an axis has no size-free
    form and is refused, as is a node that fails at the probe size.
    """
    nodes = [node for node in graph.nodes if id(node) in trunk]
    constants: list[onnx.TensorProto] = []
    at_probe: dict[str, onnx.TensorProto] = {}
    names = _NameMaker(_taken_names(graph.model))
    notes: list[str] = []
    grouped: set[str] = set()  # the group splits and joins of a group normalization, size-free as they now are
    while True:
        probe, types = _probe_shapes(graph.model, input_name, probe_dims, nodes, constants, at_probe, map_name)
        for node in nodes:
            if node.op_type != "Reshape" or node.output[0] in at_probe or node.output[0] in grouped:
                continue
            edit = _group_reshape(graph, node, names, constants)
            if edit is not None:
                grouped.add(node.output[0])
                if edit.nodes:
                    position = nodes.index(node)
                    nodes[position : position + 1] = edit.nodes
                    notes.append(edit.note)
                    break
                continue
            source, target = graph.shape(node.input[0]), graph.shape(node.output[0])
            grown = probe.get(node.input[0])
            if grown is None or None in grown:
                grown = _measure_at_probe(graph, input_name, probe_dims, node.input[0], nodes, constants, types)
            if len(grown) != len(source):
                raise NotConvertibleError(
                    f"the shape of {node.input[0]} read by {_label(node)} is not known at a larger size"
                )
            varying = [a != b for a, b in zip(source, grown)]
            groups = _reshape_groups(source, target)
            if groups is None or any(any(varying[a] for a in left) and len(right) != 1 for left, right in groups):
                raise NotConvertibleError(
                    f"{_label(node)} reshapes {'×'.join(map(str, source))} to {'×'.join(map(str, target))}, "
                    "splitting or dropping an axis whose size follows the input's: it has no size-free form"
                )
            expected = []
            for left, right in groups:
                if any(varying[a] for a in left):
                    expected.append(math.prod(grown[a] for a in left))
                else:
                    expected.extend(target[b] for b in right)
            if tuple(expected) == probe.get(node.output[0]):
                continue
            new_nodes, target_name = _size_free_target(node, groups, source, target, varying, names, constants)
            rewritten = onnx.NodeProto()
            rewritten.CopyFrom(node)
            rewritten.input[1] = target_name
            position = nodes.index(node)
            nodes[position : position + 1] = [*new_nodes, rewritten]
            stem = names(f"{node.name or node.output[0]}/fcconv_probe_target")
            at_probe[node.output[0]] = numpy_helper.from_array(np.array(expected, np.int64), stem)
            notes.append(
                f"{_label(node)}: its target {'×'.join(map(str, target))} is now computed from its input's shape"
            )
            break
        else:
            probe, types = _probe_shapes(
                graph.model, input_name, probe_dims, nodes, constants, at_probe, map_name, strict=True
            )
            if probe.get(map_name) is None or None in probe[map_name]:
                probe[map_name] = _measure_at_probe(graph, input_name, probe_dims, map_name, nodes, constants, types)
            return _SizeFreeTrunk(nodes, constants, notes, probe)


@dataclass
class _GroupEdit:
    """A group normalization's reshape made size-free: the nodes that replace it (none when it is already) and
    the note that says so."""

    nodes: list[onnx.NodeProto]
    note: str = ""


def _group_reshape(
    graph: _Graph, node: onnx.NodeProto, names: _NameMaker, constants: list[onnx.TensorProto]
) -> _GroupEdit | None:
    """A group normalization's Reshape made size-free, or None when ``node`` is not one.

    Exporters write GroupNorm as a split of the N×C×H×W map into (N, G, -1), a
    normalization over the last axis, and a reshape back to the map's shape. The
    split keeps the batch and the fixed group count, and -1 takes the rest at any
    size (a batch written as a number becomes 0, the input's own batch). The
    reshape back is size-free when its target is the Shape of the map that was
    split; a target written as that map's native shape is replaced by its Shape.
    """
    split = _group_split(graph, node)
    if split is not None:
        if split[0] == 0:
            return _GroupEdit([])
        target = names(f"{node.name or node.output[0]}/fcconv_group_target")
        constants.append(numpy_helper.from_array(np.array([0, *split[1:]], np.int64), target))
        rewritten = _with_target(node, target)
        note = f"{_label(node)}: its target {'×'.join(map(str, split))} now keeps the input's batch (0)"
        return _GroupEdit([rewritten], note)
    split_node = _split_before(graph, node.input[0])
    if split_node is None:
        return None
    source = split_node.input[0]
    producer = graph.producer.get(node.input[1])
    whole = producer is not None and producer.op_type == "Shape" and _attr(producer, "start", 0) == 0
    if whole and _attr(producer, "end") is None and producer.input[0] == source:
        return _GroupEdit([])
    target = graph.constant(node.input[1])
    if target is None or tuple(target.tolist()) != graph.shape(source):
        return None
    shape_name = names(f"{node.name or node.output[0]}/fcconv_group_shape")
    shape = helper.make_node("Shape", [source], [shape_name], name=shape_name)
    note = (
        f"{_label(node)}: its target {'×'.join(map(str, graph.shape(source)))} is now the shape of {source}, "
        "the map its groups were split from"
    )
    return _GroupEdit([shape, _with_target(node, shape_name)], note)


def _group_split(graph: _Graph, node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The constant (batch or 0, G, -1) target of a Reshape that splits an N×C×… map into G groups of whole
    channels, else None."""
    if node.op_type != "Reshape" or _attr(node, "allowzero", 0):
        return None
    target, source = graph.constant(node.input[1]), graph.shapes.get(node.input[0])
    if target is None or target.ndim != 1 or target.size != 3 or not source or len(source) < 3 or None in source:
        return None
    batch, groups, rest = (int(v) for v in target)
    if rest != -1 or groups <= 0 or source[1] % groups or batch not in (0, source[0]):
        return None
    return batch, groups, rest


def _split_before(graph: _Graph, name: str) -> onnx.NodeProto | None:
    """The group split whose result ``name`` is computed from, through nodes that keep their first input's shape
    (the normalization: InstanceNormalization, or ReduceMean, Sub, Pow, Div as exporters write it)."""
    node = graph.producer.get(name)
    for _ in range(32):
        if node is None or not node.input:
            return None
        if node.op_type == "Reshape":
            return node if _group_split(graph, node) is not None else None
        if graph.shapes.get(node.input[0]) != graph.shapes.get(node.output[0]):
            return None
        node = graph.producer.get(node.input[0])
    return None


def _with_target(node: onnx.NodeProto, target: str) -> onnx.NodeProto:
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    rewritten.input[1] = target
    return rewritten


def _measure_at_probe(
    graph: _Graph,
    input_name: str,
    probe_dims: Sequence[int],
    name: str,
    nodes: Sequence[onnx.NodeProto],
    constants: Sequence[onnx.TensorProto],
    types: Mapping[str, int],
) -> tuple[int, ...]:
    """The probe-size shape of trunk tensor ``name``, measured in onnxruntime.

    Shape inference leaves a shape unknown behind arithmetic it cannot follow (a
    Slice whose ends are computed with Div, as the TorchScript exporter writes
    ``x.chunk(2, dim=1)``).
    """
    try:
        return _run_shapes(graph.model, input_name, probe_dims, [name], {**graph.types, **types}, nodes=nodes,
                           extra=constants)[name]  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - onnxruntime names the node it stopped at
        raise NotConvertibleError(f"{_failing_node(exc)} cannot take an input larger than the native size") from None


def _probe_shapes(
    model: onnx.ModelProto,
    input_name: str,
    dims: Sequence[int],
    nodes: Sequence[onnx.NodeProto],
    constants: Sequence[onnx.TensorProto],
    at_probe: Mapping[str, onnx.TensorProto],
    map_name: str,
    *,
    strict: bool = False,
) -> tuple[dict[str, tuple], dict[str, int]]:
    """The trunk's shapes and types at the probe size, each size-free Reshape reading its target's value there as a
    constant.

    onnx's shape inference does not follow shape arithmetic (Shape, Gather, Mul,
    Concat) far enough to compute those targets itself.
    """
    variant = []
    for node in nodes:
        if node.op_type == "Reshape" and node.output[0] in at_probe:
            node_at_probe = onnx.NodeProto()
            node_at_probe.CopyFrom(node)
            node_at_probe.input[1] = at_probe[node.output[0]].name
            node = node_at_probe
        variant.append(node)
    try:
        return _infer(
            model, input_name, dims, strict=strict, nodes=variant, extra=[*constants, *at_probe.values()],
            outputs=[map_name],
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - onnx reports the node it stopped at
        raise NotConvertibleError(f"{_failing_node(exc)} cannot take an input larger than the native size") from None


def _check_trunk_grows(
    graph: _Graph, probe: Mapping[str, tuple], trunk: set[int], map_name: str, native: Sequence[int]
) -> None:
    """Refuse a trunk whose map does not grow with the input, naming the node where it stops growing."""
    grown = probe.get(map_name)
    if grown is not None and None not in grown and all(g > n for g, n in zip(grown[2:], native[2:])):
        if grown[1] == native[1]:
            return
    for node in graph.nodes:
        if id(node) not in trunk or not node.output or not graph.is_float(node.output[0]):
            continue
        out_native, out_probe = graph.shapes.get(node.output[0]), probe.get(node.output[0])
        if not out_native or not out_probe or len(out_native) != 4:
            continue
        inputs_grow = any(
            len(graph.shapes.get(n) or ()) == 4 and (probe.get(n) or (None,) * 4)[2:] != graph.shapes[n][2:]
            for n in node.input
            if n and graph.is_float(n) and graph.constant(n) is None
        )
        if inputs_grow and out_probe[2:] == out_native[2:]:
            raise NotConvertibleError(f"{_label(node)} keeps the map at its native size when the input grows")
    shown = "×".join("?" if d is None else str(d) for d in (grown or ())[1:])
    raise NotConvertibleError(
        f"the feature map {map_name} does not grow with the input (at a larger input it is {shown})"
    )
