"""Rewrite the fully connected head of a classifier exported to ONNX as convolutions, on the ONNX graph.

A classifier someone else exported (``torch.onnx`` with either exporter, or a graph
written by other tools) has a fixed input size and collapses its feature map with a
Flatten or Reshape before Gemm or MatMul(+Add) layers. Here the graph itself is
rewritten, with onnx's own tools:

* the *chain* between the last N×C×H×W feature map and the collapse (Transpose,
  Reshape, Flatten, element-wise layers, a global pooling) is read exactly: the
  order in which it lays the map's elements out is found by passing an index array
  through it, so an NHWC flatten (a Transpose(0, 2, 3, 1) first, as Keras and
  TensorFlow exports have), a (W, H, C) flatten or a channel shuffle all give the
  first kernel in the right order, and the layout nodes disappear;
* the first Gemm or MatMul after the collapse becomes a k×k Conv whose kernel is
  its weight in that order (``transB`` and MatMul's (in, out) order honoured),
  every later one a 1×1 Conv, a MatMul's following Add its bias;
* the nodes between them that act on each feature (activations, Dropout,
  per-feature constants, BatchNormalization, PRelu, LayerNormalization over the
  features, softmax over the class axis) act on each position of the map;
* a global pooling before the collapse stays, so the output is N×K×1×1 at any size,
  unless ``dense`` drops it: each position of the map then feeds the head, and the
  output is the per-position score map;
* ``pool`` ends each output with a global pooling of its score map and a Flatten,
  so that it is (N, K) at any size (test-time pooling), channels-last input or not;
* the trunk's shape-dependent Reshapes are made size-free (their target computed from
  the input's shape) where that is exact;
* a channels-last input (N×H×W×C with a Transpose to N×C×H×W inside, as keras2onnx
  and tf2onnx write) stays channels-last, and each output ends with a Transpose to
  (N, h, w, K), as a natively fully convolutional NHWC model answers;
* several outputs that branch off the same head (class scores beside box
  regression) are each converted, in their order and with their names.

:func:`truncate_onnx_classifier` cuts the input model first where asked (``--logits``,
``--until``), so that the conversion and its verification start from the cut model.

Anything else raises :class:`NotConvertibleError` naming the node and its op.
The results are plain dataclasses; :mod:`fcconv.onnx_verify` checks them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.external_data_helper import load_external_data_for_model

from fcconv._version import __version__
from fcconv.conversion import HeadGeometry, RewrittenLayer
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.external_data import PROTOBUF_LIMIT, check_external_data, external_data_path
from fcconv.files import check_readable, is_onnx_file
from fcconv.grid import probe_output_grid
from fcconv.head.interpret import refusal
from fcconv.metadata import fcconv_metadata, output_channels_metadata
from fcconv.onnx_head import BINARY as _BINARY
from fcconv.onnx_head import ELEMENTWISE as _ELEMENTWISE
from fcconv.onnx_head import attribute as _attr
from fcconv.onnx_head import is_scalar as _is_scalar
from fcconv.onnx_head import label as _label
from fcconv.onnx_head import rewrite_head
from fcconv.onnx_shapes import onnx_output_shapes
from fcconv.runtime import inference_session
from fcconv.staging import staged_path
from fcconv.weights_digest import onnx_weights_digest

__all__ = [
    "OnnxClassifier",
    "OnnxConversion",
    "OnnxOutput",
    "is_onnx_file",
    "load_onnx_classifier",
    "rewrite_onnx",
    "truncate_onnx_classifier",
    "write_onnx",
]

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
_LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_POOLS = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max", "ReduceMean": "avg", "ReduceMax": "max"}
_FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")  # what --logits drops from the end of an output
LAYOUTS = ("nchw", "nhwc")
_SMALL_CONSTANT = 64  # initializers up to this many elements stay in the graph that shape inference reads
MAP_AXES = ("batch", "height", "width")
SCORE_AXES = ("batch", "map_height", "map_width")


@dataclass
class OnnxClassifier:
    """An ONNX classifier as read from disk: its graph and the input it was exported for."""

    model: onnx.ModelProto
    path: Path | None
    input_name: str
    input_shape: tuple[int, ...]
    """(C, H, W): the native per-sample input size."""
    batch: int | None
    """The input's fixed batch size, None when the batch axis is free."""
    elem_type: int
    """The input's onnx.TensorProto data type."""
    layout: str = "nchw"
    """``nhwc`` for a channels-last input (Keras, TensorFlow), which the converted model keeps."""
    logits: bool = False
    """Whether :func:`truncate_onnx_classifier` dropped the outputs' final softmax or sigmoid."""
    until: str | None = None
    """The head tensor or node :func:`truncate_onnx_classifier` cut the model at, if any."""

    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 1)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def input_dims(self, batch, channels, height, width) -> tuple:
        """The input's axes in its own order: (N, C, H, W), or (N, H, W, C) for a channels-last input."""
        return (batch, height, width, channels) if self.layout == "nhwc" else (batch, channels, height, width)


@dataclass
class OnnxOutput:
    """One output of the converted model: its name, its class count and the head nodes that compute it."""

    name: str
    classes: int
    nodes: list[str] = field(default_factory=list)
    """The head nodes after the collapse it is computed by, in graph order, as ``name (op)``."""


@dataclass
class OnnxConversion:
    """The result of :func:`rewrite_onnx`: the fully convolutional graph and how it relates to the input model.

    ``trunk`` and ``head`` are the input model cut at the head's input, as models of
    their own: the verifier runs ``trunk`` (made size-free exactly as in ``model``)
    on a large input and the input model's own ``head`` on every window of its map
    (for a dense map, on each position's features spread over a native-size map,
    which the head's global pooling reads back).
    """

    model: onnx.ModelProto
    trunk: onnx.ModelProto
    head: onnx.ModelProto
    geometry: HeadGeometry
    head_input: str
    """The tensor the head reads: the feature map, (N, C, H, W)."""
    layers: list[RewrittenLayer] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Changes to the trunk: the Reshapes whose target is now computed from the input's shape."""
    total_parameters: int = 0
    layout: str = "nchw"
    """``nhwc``: the input is N×H×W×C and every output (N, h, w, K); ``nchw``: N×C×H×W in, (N, K, h, w) out."""
    outputs: list[OnnxOutput] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    """The head nodes other than Gemm and MatMul that act on each position of the map, as ``name (op)``."""
    until_names: list[str] = field(default_factory=list)
    """What ``--until`` accepts: the head's node names and the tensors they compute."""

    @property
    def fully_convolutional(self) -> bool:
        """True when the head holds no Gemm or MatMul: the model was fully convolutional already."""
        return not self.layers

    @property
    def head_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)


# --- reading -----------------------------------------------------------------------------------------


def load_onnx_classifier(path: str | Path, input_shape: Sequence[int] | None = None) -> OnnxClassifier:
    """Read the ONNX classifier at ``path`` and the input size it was exported for.

    The native size is the input's fixed (C, H, W); an input with free height and
    width needs ``input_shape`` (C, H, W also for a channels-last input, whose
    layout is recorded), which must agree with every fixed dimension. The file
    is only read. Raises :class:`BadInputError` for a file that is not a valid ONNX
    model or a size that is missing or does not fit, and :class:`NotConvertibleError`
    for a graph that is not a classifier of one N×C×H×W (or N×H×W×C) image input.
    """
    path = Path(path)
    check_readable(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign files all end here
        raise BadInputError(f"{path} is not an ONNX model ({_one_line(exc)})") from None
    check_external_data(model, path)
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # noqa: BLE001 - a weights file that cannot be read makes the model unusable
        raise BadInputError(f"{path}: its weights cannot be read ({_one_line(exc)})") from None
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the checker's reasons vary; any of them makes the file unusable
        raise BadInputError(f"{path} is not a valid ONNX model ({_one_line(exc)})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise NotConvertibleError(
            f"the graph takes {len(inputs)} inputs ({names}); fcconv converts models with one input"
        )
    graph_input = inputs[0]
    tensor_type = graph_input.type.tensor_type
    if tensor_type.elem_type not in _FLOAT_TYPES:
        kind = TensorProto.DataType.Name(tensor_type.elem_type).lower()
        raise NotConvertibleError(f"input {graph_input.name} is {kind}; fcconv converts classifiers of a float input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) != 4:
        raise NotConvertibleError(
            f"input {graph_input.name} has rank {len(dims)}; fcconv converts ONNX classifiers of an N×C×H×W "
            "or N×H×W×C image"
        )
    layout = "nhwc" if _channels_last_input(model.graph, graph_input.name) else "nchw"
    declared = (dims[3], dims[1], dims[2]) if layout == "nhwc" else tuple(dims[1:])
    written = "×".join("?" if d is None else str(d) for d in dims[1:])
    written = f"N×{written}" + (" (N×H×W×C, channels-last)" if layout == "nhwc" else "")
    if input_shape is not None:
        wanted = tuple(int(s) for s in input_shape)
        if len(wanted) != 3 or any(d is not None and d != w for d, w in zip(declared, wanted)):
            raise BadInputError(
                f"--input-shape {','.join(map(str, wanted))} does not fit input {graph_input.name}, which is {written}"
            )
        shape = wanted
    elif None in declared:
        raise BadInputError(
            f"input {graph_input.name} of {path.name} has a free size ({written}); pass --input-shape C,H,W, "
            "the size the classifier was trained at"
        )
    else:
        shape = declared
    batch = dims[0] if dims[0] else None
    return OnnxClassifier(model, path, graph_input.name, shape, batch, tensor_type.elem_type, layout)


def _channels_last_input(graph: onnx.GraphProto, input_name: str) -> str | None:
    """The Transpose that turns an N×H×W×C input into N×C×H×W, as Keras and TensorFlow exports begin, if any."""
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] == input_name and _attr(node, "perm") == [0, 3, 1, 2]:
            return node.name or node.output[0]
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(exc).__name__)


# --- the graph and its shapes ------------------------------------------------------------------------


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


# --- the head ----------------------------------------------------------------------------------------


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
    return _read_chain(graph, collapse, input_name)


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


def _read_chain(graph: _Graph, collapse: onnx.NodeProto, input_name: str) -> _Head:
    """Walk back from the collapse through layout, element-wise and pooling nodes to the feature map."""
    chain = [collapse]
    while True:
        name = _chain_input(chain[0])
        node = graph.producer.get(name)
        if node is None or not _extends_chain(graph, node, chain[0]):
            break
        chain.insert(0, node)
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


def _pool_index(graph: _Graph, node: onnx.NodeProto, index: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """The (sample, channel) each output of a global pooling gathers; refuses one that mixes channels or keeps positions."""
    if node.op_type.startswith("Global"):
        axes = tuple(range(2, index.ndim))
    else:
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = graph.constant(node.input[1])
            axes = None if value is None else value.tolist()
        if axes is None:
            axes = list(range(index.ndim))
        axes = tuple(sorted(a % index.ndim for a in axes))
    low, high = index.min(axis=axes, keepdims=True), index.max(axis=axes, keepdims=True)
    gathered = math.prod(index.shape[a] for a in axes)
    positions = math.prod(index.shape) // max(gathered, 1)
    if not np.array_equal(low, high) or positions != len(np.unique(index)):
        raise NotConvertibleError(f"{_label(node)} does not pool exactly the spatial axes of the feature map")
    return low.reshape(out_shape)


# --- the trunk ---------------------------------------------------------------------------------------


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
    while True:
        probe, types = _probe_shapes(graph.model, input_name, probe_dims, nodes, constants, at_probe, map_name)
        for node in nodes:
            if node.op_type != "Reshape" or node.output[0] in at_probe:
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


# --- the rewrite -------------------------------------------------------------------------------------


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


def _until_names(analysis: _Analysis) -> dict[str, str]:
    """What ``--until`` accepts, each with the tensor it cuts at: a head node's name and the tensor it computes."""
    graph, names = analysis.graph, {}
    for node in analysis.head.nodes:
        output = node.output[0] if node.output else ""
        if not output or not graph.is_float(output) or len(graph.shapes.get(output) or ()) != 2:
            continue
        if node.name:
            names[node.name] = output
        names[output] = output
    return names


def truncate_onnx_classifier(
    classifier: OnnxClassifier, *, logits: bool = False, until: str | None = None
) -> OnnxClassifier:
    """``classifier`` cut before its conversion, so that the verification compares with the cut model.

    ``until`` (a head node's name, or a tensor it computes) ends the model at that
    tensor, its one output; ``logits`` drops the Softmax, LogSoftmax or Sigmoid that
    ends an output (each output that has one), leaving the raw scores under the
    output's name. Raises :class:`BadInputError` for a name that is not in the head,
    or ``logits`` on a model none of whose outputs ends in one of those.
    """
    if not logits and until is None:
        return classifier
    model = classifier.model
    if until is not None:
        analysis = _analyze(classifier)
        accepted = _until_names(analysis)
        if until not in accepted:
            shown = ", ".join(accepted) or "none"
            raise BadInputError(f"--until {until}: not a node or tensor of the head; it accepts {shown}")
        model = _cut_at(classifier, analysis.graph, accepted[until])
    if logits:
        model = _without_final_activations(model)
    return OnnxClassifier(
        model, classifier.path, classifier.input_name, classifier.input_shape, classifier.batch,
        classifier.elem_type, classifier.layout, logits=logits, until=until,
    )  # fmt: skip


def _cut_at(classifier: OnnxClassifier, graph: _Graph, tensor: str) -> onnx.ModelProto:
    """The input model ending at ``tensor``: the nodes it is computed from, with ``tensor`` the one output."""
    source = classifier.model
    needed, kept = {tensor}, []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    graph_input = next(i for i in source.graph.input if i.name == classifier.input_name)
    batch = "batch" if classifier.batch is None else classifier.batch
    output = _value_info(tensor, graph.types[tensor], [batch, graph.shape(tensor)[1]])
    cut = _sub_model(source, kept[::-1], {}, [graph_input], [output])
    cut.producer_name, cut.producer_version = source.producer_name, source.producer_version
    cut.metadata_props.extend(source.metadata_props)
    return cut


def _without_final_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the Softmax, LogSoftmax or Sigmoid that ends each output replaced by an Identity."""
    producer = {o: node for node in model.graph.node for o in node.output if o}
    ends = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        ends[output.name] = node
    if not any(node is not None and node.op_type in _FINAL_ACTIVATIONS for node in ends.values()):
        shown = "; ".join(
            f"{name} ends in {_label(node) if node is not None else 'the input'}" for name, node in ends.items()
        )
        raise BadInputError(
            f"--logits: no output ends in a {', '.join(_FINAL_ACTIVATIONS[:-1])} or {_FINAL_ACTIVATIONS[-1]} "
            f"({shown}); its scores are raw already"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        if node.op_type in _FINAL_ACTIVATIONS and node.output[0] in ends:
            identity = helper.make_node(
                "Identity", [node.input[0]], [node.output[0]], name=f"{node.name or node.output[0]}/fcconv_logits"
            )
            copy.graph.node[index].CopyFrom(identity)
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


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def _assemble(
    classifier: OnnxClassifier,
    nodes: Sequence[onnx.NodeProto],
    new_weights: Mapping[str, onnx.TensorProto],
    analysis: _Analysis,
    spatial: Sequence[int | str],
) -> onnx.ModelProto:
    """The converted model: ``nodes`` without what the outputs do not need, free axes, the input's metadata.

    ``spatial`` are the outputs' spatial axes: free, (1, 1) for a kept global pooling, none for pooled scores.
    """
    source = classifier.model
    needed = set(analysis.outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    outputs = []
    for output in source.graph.output:
        classes = analysis.classes[output.name]
        dims = (SCORE_AXES[0], *spatial, classes) if classifier.layout == "nhwc" else (SCORE_AXES[0], classes, *spatial)
        outputs.append(_value_info(output.name, output.type.tensor_type.elem_type, dims))
    input_dims = classifier.input_dims(MAP_AXES[0], classifier.input_shape[0], *MAP_AXES[1:])
    converted = _sub_model(
        source, kept, new_weights, [_value_info(classifier.input_name, classifier.elem_type, input_dims)], outputs
    )
    converted.producer_name, converted.producer_version = "fcconv", __version__
    converted.metadata_props.extend(source.metadata_props)
    if converted.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        onnx.checker.check_model(converted)
    return converted


def _original_head(
    classifier: OnnxClassifier,
    graph: _Graph,
    head: _Head,
    map_shape: Sequence[int],
    classes: Mapping[str, int],
    *,
    whole_map: bool,
) -> onnx.ModelProto:
    """The input model's own head, from the feature map to every output, cut out with onnx's Extractor.

    It takes one native-size window per sample (or the whole map, at any size, when
    ``whole_map``: the head's global pooling is kept), with the input model's batch
    size; its recorded intermediate shapes are dropped, since they were inferred for
    the whole model.
    """
    map_type = graph.types[head.map_name]
    batch = "batch" if classifier.batch is None else classifier.batch
    window = ["map_height", "map_width"] if whole_map else list(map_shape[2:])
    extractor = onnx.utils.Extractor(classifier.model)
    extractor.value_infos[head.map_name] = _value_info(head.map_name, map_type, [batch, map_shape[1], *window])
    for output in classifier.model.graph.output:
        extractor.value_infos[output.name] = _value_info(
            output.name, output.type.tensor_type.elem_type, [batch, classes[output.name]]
        )
    part = extractor.extract_model([head.map_name], list(classes))
    del part.graph.value_info[:]
    produced = {head.map_name} | {t.name for t in part.graph.initializer}
    produced |= {o for node in part.graph.node for o in node.output}
    for node in part.graph.node:
        for name in node.input:
            if name and name not in produced:
                raise NotConvertibleError(
                    f"{_label(node)} in the head reads {name} from before the feature map; "
                    "the head cannot be run on a window by itself"
                )
    return part


def write_onnx(
    conversion: OnnxConversion,
    path: str | Path,
    *,
    source: str | Path | None = None,
    metadata: Mapping[str, str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write the converted model to ``path`` with fcconv's metadata (``metadata`` added after it).

    The metadata is what the PyTorch path writes: fcconv's version, the native input
    shape, the window and stride of the head, the conversion mode, the total stride
    and receptive field (measured by ONNX shape inference), the class count (of the
    first output), the weights' digest and, given ``source`` (the input file), its
    sha256; and the input's layout (``fcconv.layout``) and the cut made before the
    conversion (``fcconv.logits``, ``fcconv.until``). ``external_data`` writes the
    weights to ``NAME.onnx.data`` beside the file; by default only when the file would
    pass protobuf's 2 GiB limit. Both files are written under temporary names and
    renamed into place.
    """
    path = Path(path)
    model = conversion.model
    input_shape = conversion.geometry.input_shape
    output_shape = onnx_output_shapes(model)
    if conversion.layout == "nhwc" and conversion.geometry.pool is None:  # pooled scores are (N, K) either way
        output_shape = _channels_first_shapes(output_shape)
    native_output = output_shape(tuple(input_shape))
    grid = probe_output_grid(output_shape, input_shape) if conversion.geometry.mode == "map" else None
    digest = onnx_weights_digest(model)
    props = {
        **fcconv_metadata(
            conversion.geometry,
            source=source,
            grid=grid,
            num_classes=native_output[1] if native_output and len(native_output) > 1 else None,
        ),
        **output_channels_metadata({output.name: output.classes for output in conversion.outputs}),
        "fcconv.head_format": "conv",
        "fcconv.layout": conversion.layout,
        **(metadata or {}),
        **digest.metadata(),
    }
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=str(value))
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT
    with staged_path(path) as tmp:
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            location = external_data_path(path)
            with staged_path(location) as data_tmp:
                onnx.save_model(
                    copy, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_tmp.name, size_threshold=1024,
                )  # fmt: skip
                for tensor in copy.graph.initializer:
                    for entry in tensor.external_data:
                        if entry.key == "location":
                            entry.value = location.name
                onnx.save_model(copy, str(tmp))
        else:
            onnx.save_model(model, str(tmp))
    return path


def _channels_first_shapes(output_shape):
    """A channels-last model's shape probe read as a channels-first one's: (C, H, W) in, (1, K, h, w) out."""

    def channels_first(shape: tuple[int, ...]) -> tuple[int, ...] | None:
        out = output_shape((*shape[1:], shape[0]))
        return None if out is None or len(out) != 4 else (out[0], out[3], out[1], out[2])

    return channels_first
