"""The ONNX classifier as read from disk, and the results of its conversion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_model

from fcconv.conversion import HeadGeometry, RewrittenHead, RewrittenLayer
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.external_data import check_external_data
from fcconv.files import check_readable
from fcconv.onnx_head import attribute as _attr
from fcconv.onnx_shapes import fixed_size

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


LAYOUTS = ("nchw", "nhwc")


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
class OnnxConversion(RewrittenHead):
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
    warnings: list[str] = field(default_factory=list)
    """What the conversion cannot decide (:func:`~fcconv.onnx_graph.padding.baked_padding_warnings`)."""


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
    dims = [fixed_size(d) for d in tensor_type.shape.dim]
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
