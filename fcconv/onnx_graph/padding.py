"""Padding an exporter may have computed for one input size: constant, uneven pads before a strided window.

TensorFlow's "SAME" padding (Hugging Face's MobileNets, timm's ``tf_`` models) pads a
strided convolution or pooling by an amount that depends on the input's size. An
exporter that evaluated it at the export size writes constant pads into a graph whose
spatial axes it declares free: the graph runs at every size and is wrong at most of
them. fcconv converts such a graph exactly, and its verification, which compares with
that graph, cannot see it; only the original model can. Which pads were computed this
way cannot be told from the graph, so these are warnings, never refusals.
"""

from __future__ import annotations

import numpy as np

from fcconv.onnx_graph.classifier import OnnxClassifier
from fcconv.onnx_graph.graph import _Graph
from fcconv.onnx_head import attribute as _attr
from fcconv.onnx_shapes import fixed_size

__all__ = ["baked_padding_warnings"]

_WINDOWED = ("Conv", "MaxPool", "AveragePool", "LpPool")


def baked_padding_warnings(classifier: OnnxClassifier, output: str = "OUT.onnx") -> list[str]:
    """One warning per Pad node of constant pads, uneven on a spatial axis, that feeds a strided Conv or pooling,
    in a graph whose input declares free spatial axes; ``output`` is the export the advice names."""
    if not _free_spatial_input(classifier):
        return []
    graph = _Graph(classifier.model, {}, {})  # constants and consumers only: no shape inference
    warnings = []
    for node in graph.nodes:
        if node.op_type != "Pad" or not node.output:
            continue
        pads = _constant_pads(graph, node)
        if pads is None:
            continue
        for consumer in graph.consumers.get(node.output[0], []):
            uneven = _uneven_strided_axes(pads, consumer) if consumer.input[0] == node.output[0] else []
            if uneven:
                warnings.append(_warning(node, consumer, uneven, output))
                break
    return warnings


def _free_spatial_input(classifier: OnnxClassifier) -> bool:
    graph_input = next(i for i in classifier.model.graph.input if i.name == classifier.input_name)
    dims = list(graph_input.type.tensor_type.shape.dim)
    spatial = dims[1:3] if classifier.layout == "nhwc" else dims[2:]
    return any(fixed_size(dim) is None for dim in spatial)


def _constant_pads(graph: _Graph, node) -> dict[int, tuple[int, int]] | None:
    """{axis: (begin, end)} (an axis may be negative) of a Pad whose pads are constants (an attribute before
    opset 11, else an input computed from constants alone); None where they are computed from the input's shape."""
    if len(node.input) > 1 and node.input[1]:
        pads = graph.constant(node.input[1])
    else:
        pads = _attr(node, "pads")
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    half = len(pads) // 2
    axes = list(range(half))
    if len(node.input) > 3 and node.input[3]:
        given = graph.constant(node.input[3])
        if given is None:
            return None
        axes = [int(a) for a in np.asarray(given).reshape(-1)]
    if len(axes) != half:
        return None
    return {axis: (pads[i], pads[half + i]) for i, axis in enumerate(axes)}


def _uneven_strided_axes(pads: dict[int, tuple[int, int]], consumer) -> list[tuple[int, int, int, int]]:
    """(spatial axis, begin, end, stride) where ``consumer`` windows the padded map with a stride above 1 and the
    pads before and after differ."""
    if consumer.op_type not in _WINDOWED:
        return []
    strides = list(_attr(consumer, "strides", []) or [])
    rank = 2 + len(strides)
    pads = {axis % rank: value for axis, value in pads.items()}  # a negative axis of the opset-18 ``axes`` input
    uneven = []
    for index, stride in enumerate(strides):
        begin, end = pads.get(2 + index, (0, 0))
        if stride > 1 and begin != end:
            uneven.append((index, begin, end, stride))
    return uneven


def _warning(node, consumer, uneven, output: str) -> str:
    names = ("height", "width") if len(_attr(consumer, "strides", []) or []) == 2 else None
    parts = [
        f"{begin} before and {end} after along {names[axis] if names else f'spatial axis {axis}'} (stride {stride})"
        for axis, begin, end, stride in uneven
    ]
    return (
        f"Pad node {node.name or node.output[0]!r} pads the input of {consumer.op_type} node "
        f"{consumer.name or consumer.output[0]!r} by constants, {', '.join(parts)}: TensorFlow-style SAME padding "
        f"that an exporter computed for one input size, so at other sizes the model may differ "
        f"from its original, which verification against this graph cannot see; verify against the PyTorch "
        f"original: fcconv verify {output} --reference model.pt"
    )
