"""A graph's producers, consumers, constants and shapes at a given input size, by onnx shape inference or,
where that cannot follow, by running it in onnxruntime."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.onnx_graph.classifier import _FLOAT_TYPES, OnnxClassifier, _one_line
from fcconv.onnx_head import label as _label
from fcconv.runtime import inference_session

_SMALL_CONSTANT = 64  # initializers up to this many elements stay in the graph that shape inference reads


class _Graph:
    """A graph's producers, consumers and constants, with its tensors' shapes and types at the native size."""

    def __init__(
        self, model: onnx.ModelProto, shapes: Mapping[str, tuple], types: Mapping[str, int], layout: str = "nchw"
    ) -> None:
        self.model = model
        self.layout = layout
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.shapes = shapes
        self.types = types
        # What is computed from constants alone (an exporter's Identity of a shared weight, a Cast of a bias)
        known = set(self.initializers)
        self.foldable: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            inputs = [n for n in node.input if n]
            constant_op = node.op_type == "Constant" or (
                inputs and all(n in known for n in inputs) and not _is_random(node)
            )
            if constant_op:
                for name in node.output:
                    if name:
                        self.foldable[name] = node
                        known.add(name)
        self._values: dict[str, np.ndarray | None] = {}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or of a tensor computed from constants alone; None for anything else."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name not in self.foldable:
            return None
        if name not in self._values:
            node = self.foldable[name]
            values = _constant_node_value(node) if node.op_type == "Constant" else self._fold(node)
            self._values.update(zip(node.output, values))
        return self._values.get(name)

    def _fold(self, node: onnx.NodeProto) -> list[np.ndarray | None]:
        """The node's outputs, computed by onnx's reference implementation from its constant inputs."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: self.constant(name) for name in dict.fromkeys(n for n in node.input if n)}
        if any(value is None for value in feeds.values()):
            return [None] * len(node.output)
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in feeds.items()
        ]
        outputs = [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in node.output if name]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        try:
            model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception:  # noqa: BLE001 - what cannot be folded is treated as computed
            return [None] * len(node.output)
        return [np.asarray(value) for value in results]

    def is_float(self, name: str) -> bool:
        return self.types.get(name) in _FLOAT_TYPES

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.shapes.get(name)
        if shape is None or None in shape:
            node = self.producer.get(name)
            where = f" ({_label(node)})" if node is not None else ""
            raise NotConvertibleError(f"the shape of {name}{where} is not known at the native size")
        return shape


def _is_random(node: onnx.NodeProto) -> bool:
    return node.op_type.startswith("Random") or node.op_type in ("Multinomial", "Bernoulli")


def _constant_node_value(node: onnx.NodeProto) -> list[np.ndarray | None]:
    """The value a Constant node holds, whichever of its attributes holds it."""
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.name == "value":
            return [numpy_helper.to_array(value)]
        if attribute.name in ("value_float", "value_floats"):
            return [np.array(value, dtype=np.float32)]
        if attribute.name in ("value_int", "value_ints"):
            return [np.array(value, dtype=np.int64)]
    return [None]


def _skeleton(
    model: onnx.ModelProto,
    input_name: str,
    dims: Sequence[int | str],
    *,
    nodes: Sequence[onnx.NodeProto] | None = None,
    extra: Sequence[onnx.TensorProto] = (),
    outputs: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """``model``'s graph (or ``nodes`` over its weights and ``extra``) with the input set to ``dims`` and its large
    weights declared by type alone, for shape inference and the checker.

    Shape inference needs the values of shape constants, not of weights; leaving the
    weights out keeps each inference from copying the whole model.
    """
    graph = model.graph
    nodes = graph.node if nodes is None else nodes
    elem_type = next(i.type.tensor_type.elem_type for i in graph.input if i.name == input_name)
    kept, declared = [], []
    for tensor in [*graph.initializer, *extra]:
        if tensor.data_type in _FLOAT_TYPES and math.prod(tensor.dims) > _SMALL_CONSTANT:
            declared.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    inputs = [helper.make_tensor_value_info(input_name, elem_type, list(dims)), *declared]
    types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    names = list(types) if outputs is None else outputs
    result = [helper.make_tensor_value_info(name, types.get(name, elem_type), None) for name in names]
    skeleton = helper.make_graph(nodes, graph.name, inputs, result, initializer=kept)
    return helper.make_model(
        skeleton, opset_imports=model.opset_import, ir_version=max(model.ir_version, 4), functions=model.functions
    )


def _infer(
    model: onnx.ModelProto,
    input_name: str,
    dims: Sequence[int | str],
    *,
    strict: bool = False,
    nodes: Sequence[onnx.NodeProto] | None = None,
    extra: Sequence[onnx.TensorProto] = (),
    outputs: Sequence[str] | None = None,
) -> tuple[dict[str, tuple], dict[str, int]]:
    """Every tensor's shape (None for an unknown dimension) and data type with the input set to ``dims``."""
    skeleton = _skeleton(model, input_name, dims, nodes=nodes, extra=extra, outputs=outputs)
    inferred = shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=strict, data_prop=True)
    shapes: dict[str, tuple] = {}
    types: dict[str, int] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        types[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
        types[tensor.name] = tensor.data_type
    return shapes, types


def _measure_unknown_shapes(
    model: onnx.ModelProto,
    classifier: OnnxClassifier,
    dims: Sequence[int],
    shapes: dict[str, tuple],
    types: dict[str, int],
) -> None:
    """Fill in the native shapes shape inference could not follow, by running the graph once in onnxruntime.

    onnx propagates shape arithmetic through some ops only (a Reshape target computed
    with Div, as the TorchScript exporter writes for ``c // 2``, stays unknown).
    """
    unknown = [
        name
        for node in model.graph.node
        for name in node.output
        if name and (shapes.get(name) is None or None in shapes[name]) and types.get(name)
    ]
    if not unknown:
        return
    try:
        shapes.update(_run_shapes(model, classifier.input_name, dims, unknown, types))
    except Exception as exc:  # noqa: BLE001 - a model that does not run at its own size is not usable
        raise BadInputError(f"the model does not run at its native size {tuple(dims)}: {_one_line(exc)}") from None


def _run_shapes(
    model: onnx.ModelProto,
    input_name: str,
    dims: Sequence[int],
    names: Sequence[str],
    types: Mapping[str, int],
    *,
    nodes: Sequence[onnx.NodeProto] | None = None,
    extra: Sequence[onnx.TensorProto] = (),
) -> dict[str, tuple]:
    """The shapes of tensors ``names`` when ``nodes`` (default: the whole graph) run on zeros of shape ``dims``.

    Only the nodes those tensors need run; onnxruntime's errors pass through.
    """
    graph_input = next(i for i in model.graph.input if i.name == input_name)
    elem_type = graph_input.type.tensor_type.elem_type
    outputs = [helper.make_tensor_value_info(name, types[name], None) for name in names]
    needed, kept = set(names), []
    for node in reversed(model.graph.node if nodes is None else nodes):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    nodes = kept[::-1]
    runnable = _sub_model(
        model, nodes, {t.name: t for t in extra}, [helper.make_tensor_value_info(input_name, elem_type, dims)], outputs
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = inference_session(runnable.SerializeToString(), options)
    values = session.run(list(names), {input_name: np.zeros(dims, helper.tensor_dtype_to_np_dtype(elem_type))})
    return {name: tuple(np.shape(value)) for name, value in zip(names, values)}


def _failing_node(exc: Exception) -> str:
    """The node an onnx shape-inference or onnxruntime error names, as ``name (op)``, or the error's first words."""
    found = re.search(r"op_type:\s*([\w.]+),\s*node name:\s*([^)]*)\)", str(exc))
    if found:
        return f"{found.group(2).strip() or '(unnamed)'} ({found.group(1)})"
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", str(exc))
    if found:
        return f"{found.group(2) or '(unnamed)'} ({found.group(1)})"
    return _one_line(exc)


def _descendants(graph: _Graph, name: str) -> list[onnx.NodeProto]:
    """The nodes computed from tensor ``name``, in graph order."""
    seen: set[int] = set()
    stack = [name]
    while stack:
        for node in graph.consumers.get(stack.pop(), []):
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(o for o in node.output if o)
    return [node for node in graph.nodes if id(node) in seen]


class _NameMaker:
    """Tensor and node names not yet taken in a graph, derived from a readable stem."""

    def __init__(self, taken: Iterable[str]) -> None:
        self.taken = set(taken)

    def __call__(self, stem: str) -> str:
        name, n = stem, 1
        while name in self.taken:
            n += 1
            name = f"{stem}_{n}"
        self.taken.add(name)
        return name


def _taken_names(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    return [
        *(n.name for n in graph.node), *(o for n in graph.node for o in n.output),
        *(t.name for t in graph.initializer), *(i.name for i in graph.input),
    ]  # fmt: skip


def _sub_model(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    extra: Mapping[str, onnx.TensorProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
) -> onnx.ModelProto:
    """A model of ``nodes`` over the weights they read (``extra`` first, then ``model``'s), with ``model``'s opsets."""
    read = {n for node in nodes for n in node.input if n}
    weights = [t for t in model.graph.initializer if t.name in read and t.name not in extra]
    weights += [t for name, t in extra.items() if name in read]
    graph = helper.make_graph(nodes, model.graph.name, list(inputs), list(outputs), initializer=weights)
    return helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=max(model.ir_version, 4), functions=model.functions
    )


def _ancestors(graph: _Graph, name: str) -> set[int]:
    """The nodes ``name`` is computed from (by id)."""
    seen: set[int] = set()
    stack = [name]
    while stack:
        node = graph.producer.get(stack.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(n for n in node.input if n)
    return seen


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))
