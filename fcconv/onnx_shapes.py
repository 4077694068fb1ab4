"""The shapes of an ONNX graph's values at a given input size, by ONNX shape inference alone.

``fcconv check`` decides from them whether a node folds the spatial axes into
features; the memory estimate sums the activations they imply; the ONNX export
measures its output grid with them. The graph's weights never enter the inference:
only their types and shapes do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx

__all__ = [
    "declared_dims",
    "fixed_size",
    "inferred_element_types",
    "inferred_shapes",
    "multiply_adds",
    "onnx_output_shapes",
    "shapes_only",
    "value_dims",
]

# Initializers up to this many elements keep their values for shape inference (shape and slice constants);
# larger ones, the weights, enter it as typed inputs without their data.
_SMALL_INITIALIZER = 64


def value_dims(value_info: Any) -> list[int | str | None]:
    """Each dimension of a value: its fixed size, its symbolic name, or None."""
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    return dims


def fixed_size(dim: Any) -> int | None:
    """A declared dimension's fixed size, None for a free one.

    A size that is not positive is free: paddle2onnx writes a free batch axis as
    ``dim_value: -1`` rather than as a symbolic name.
    """
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def declared_dims(value_info: Any) -> list[int | str | None]:
    """Each dimension of a graph input or output as declared: its fixed size, its symbolic name, or None."""
    return [fixed_size(dim) or dim.dim_param or None for dim in value_info.type.tensor_type.shape.dim]


def shapes_only(model: Any) -> Any:
    """A copy of the graph for shape inference: the weights become typed inputs without their data."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= _SMALL_INITIALIZER and tensor.data_location != onnx.TensorProto.EXTERNAL:
            light.graph.initializer.append(tensor)
        elif tensor.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    for output in model.graph.output:  # declared output shapes would be merged with what is inferred at each size
        light.graph.output.append(
            onnx.helper.make_tensor_value_info(output.name, output.type.tensor_type.elem_type, None)
        )
    return light


def _inferred(light: Any, input_name: str, shape: tuple[int, ...]) -> Any:
    """``light`` with its input's shape set to ``shape`` and every value's type inferred; None where inference fails."""
    sized = onnx.ModelProto()
    sized.CopyFrom(light)
    for graph_input in sized.graph.input:
        if graph_input.name == input_name:
            graph_input.type.tensor_type.shape.ClearField("dim")
            for size in shape:
                graph_input.type.tensor_type.shape.dim.add().dim_value = size
    try:
        return onnx.shape_inference.infer_shapes(sized, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes at all: every axis is undetermined
        return None


def inferred_element_types(light: Any, input_name: str, shape: tuple[int, ...]) -> dict[str, int]:
    """Every value's element type (``onnx.TensorProto.FLOAT``, …) when the input has ``shape``."""
    inferred = _inferred(light, input_name, shape)
    if inferred is None:
        return {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {info.name: info.type.tensor_type.elem_type for info in values}


def inferred_shapes(light: Any, input_name: str, shape: tuple[int, ...]) -> dict[str, tuple[int | None, ...] | None]:
    """Every value's shape when the input has ``shape``, as ONNX shape inference (with data propagation) gives it."""
    inferred = _inferred(light, input_name, shape)
    if inferred is None:
        return {}
    shapes: dict[str, tuple[int | None, ...] | None] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        shapes[info.name] = tuple(value_dims(info)) if tensor_type.HasField("shape") else None
    for name, dims in list(shapes.items()):
        if dims is not None:
            shapes[name] = tuple(d if isinstance(d, int) else None for d in dims)
    for tensor in light.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def multiply_adds(light: Any, input_name: str, shape: tuple[int, ...]) -> int | None:
    """The multiply-adds of ``light`` (:func:`shapes_only`) on an input of ``shape``: each convolution's and matrix
    product's output values times the products summed into each (a transposed convolution's input values times
    the products each spreads); None where a shape is not inferred. Other operators (activations, pooling,
    additions) are left out: they cost little beside these in a classifier."""
    shapes = inferred_shapes(light, input_name, shape)
    total = 0
    for node in light.graph.node:
        if node.op_type not in {"Conv", "ConvTranspose", "MatMul", "Gemm"}:
            continue
        source, weight, out = (shapes.get(name) for name in (node.input[0], node.input[1], node.output[0]))
        if any(not dims or None in dims for dims in (source, weight, out)):
            return None
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(weight[1:])  # (input channels / groups) × kernel per output value
        elif node.op_type == "ConvTranspose":
            total += math.prod(source) * math.prod(weight[1:])
        else:  # a matrix product sums over the first operand's last axis (its first, for Gemm's transA)
            transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
            total += math.prod(out) * (source[0] if transposed else source[-1])
    return total


def onnx_output_shapes(model: Any) -> Callable[[tuple[int, ...]], tuple[int, ...] | None]:
    """The output's shape for a batch-1 input of a given (C, *spatial) shape, by ONNX shape inference alone.

    What :func:`~fcconv.grid_fit.fit_output_grid` needs to measure an ONNX model's
    total stride and receptive field without running it; None where inference
    cannot determine every axis.
    """
    light = shapes_only(model)
    input_name, output_name = model.graph.input[0].name, model.graph.output[0].name

    def output_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
        dims = inferred_shapes(light, input_name, (1, *shape)).get(output_name)
        return None if dims is None or any(d is None for d in dims) else tuple(int(d) for d in dims)

    return output_shape
