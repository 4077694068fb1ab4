"""Write a converted model as fully convolutional ONNX.

The export is a graph of Conv nodes with named free batch and spatial axes. The
converted module's fast layers (:mod:`fcconv.layers`) are exported as the plain
convolutions they are, so the file holds no Flatten, Reshape or Gemm in the head.
The graph comes from torch.onnx's exporter built on torch.export (``dynamo``), each
node named after the module it computes (``classifier.0``); the TorchScript exporter
is the named fallback for what that one cannot export.
The metadata it records is :mod:`fcconv.metadata`'s, the weights' digest
:mod:`fcconv.weights_digest`'s; :mod:`fcconv.runtime` runs the file.
"""

from __future__ import annotations

import ast
import copy
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch import fx, nn

from fcconv.errors import BadInputError, FcconvWarning, NotConvertibleError, reason
from fcconv.external_data import PROTOBUF_LIMIT, external_data_path
from fcconv.grid import output_names, probe_output_grid
from fcconv.layers import POINTWISE_CONV, FullyConnectedConvMixin, WindowGemm, as_plain_conv
from fcconv.metadata import (
    EACH_DIGEST_KEY,
    ONNX_EXPORTER_FALLBACK_KEY,
    ONNX_EXPORTER_KEY,
    SPATIAL_AXIS_NAMES,
    WEIGHTS_DIGEST_KEY,
    fcconv_metadata,
    metadata_fragment,
    output_channels_metadata,
)
from fcconv.outputs import SINGLE_OUTPUT_NAME, named_outputs
from fcconv.sizes import spatial_size, spatial_start
from fcconv.staging import staged_path
from fcconv.traceable import traceable_form
from fcconv.weights_digest import WeightsDigest, onnx_data_type, tensor_bytes

__all__ = ["as_export_module", "export_onnx", "external_data_path", "inline_external_data"]

INPUT_NAME = "input"
OUTPUT_NAME = SINGLE_OUTPUT_NAME
OPSET = 18
HEAD_FORMATS = ("conv", "gemm")
EXPORTERS = ("auto", "dynamo", "torchscript")
"""``auto``: the torch.export-based exporter, the TorchScript one where it fails; or either one alone."""


def as_export_module(module: nn.Module, head_format: str = "conv") -> nn.Module:
    """``module`` with every fully connected convolution swapped for its export form (parameters shared).

    ``conv``: the plain torch.nn convolution; ``gemm``: :class:`~fcconv.layers.WindowGemm`.
    """
    fast = [name for name, m in module.named_modules() if isinstance(m, FullyConnectedConvMixin)]
    if not fast:
        return module
    if isinstance(module, fx.GraphModule):
        plain = fx.GraphModule(module, module.graph, class_name=type(module).__name__)
    else:
        plain = copy.copy(module)
        plain._modules = dict(module._modules)
    for name in fast:
        conv = module.get_submodule(name)
        # the trunk's stay convolutions
        gemm = head_format == "gemm" and not isinstance(conv, tuple(POINTWISE_CONV.values()))
        plain.set_submodule(name, WindowGemm(conv) if gemm else as_plain_conv(conv), strict=False)
    return plain


def export_onnx(
    converted: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] = (3, 224, 224),
    *,
    metadata: Mapping[str, str] | None = None,
    head_format: str = "conv",
    opset: int = OPSET,
    external_data: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    exporter: str = "auto",
) -> Path:
    """Export ``converted`` to ONNX at ``path`` with free batch and spatial axes.

    ``input_shape`` is the native per-sample shape used to trace. The input is named
    ``input`` and the output ``scores``; the axes are ``batch``, then ``height`` and
    ``width`` (``length`` in 1D, ``depth, height, width`` in 3D). ``metadata`` is
    added to the model's metadata_props, after what fcconv records itself (its
    version, the class count and, for a module made by :func:`fcconv.convert`, the
    native input shape, the conversion mode, the head's window and stride, and the
    output map's total stride and receptive field in input pixels, probed on shapes
    alone).

    The graph is traced without its weights, and each weight is then streamed to the
    file from the module's own storage, so the export holds no second copy of the
    model in memory. The weights are hashed as they are written, and their digest
    (:mod:`fcconv.weights_digest`) is appended to the metadata at the end of the file. ``external_data`` writes the weights to ``NAME.onnx.data``
    beside the file (ONNX external data); by default that happens only when the file
    would pass protobuf's 2 GiB limit. Files are written under temporary names and
    renamed into place, so a failed export leaves nothing behind. ``on_progress``
    is called with the bytes of weights written so far and their total.

    ``head_format="gemm"`` writes the same function another way: each converted layer
    as its windows gathered with strided slices and one MatMul over all windows of
    the batch (:class:`~fcconv.layers.WindowGemm`), which onnxruntime runs faster at
    batch > 1 because it reads the head's weights once per batch instead of once per
    image. The default ``"conv"`` writes the head as Conv nodes only.

    ``exporter`` picks torch.onnx's exporter: ``"dynamo"``, the one built on
    torch.export, which names each node after the module it computes
    (``classifier.0``, or ``layer1.0.downsample.0/Conv`` where a module makes several
    nodes), and raises :class:`~fcconv.errors.NotConvertibleError` where it fails;
    ``"torchscript"``, the deprecated one, whose nodes carry generic names
    (``/Conv_3``); or ``"auto"`` (the default), the dynamo exporter, falling back to
    the TorchScript one when it fails, with a :class:`~fcconv.errors.FcconvWarning`
    and the reason in the metadata (``fcconv.onnx_exporter_fallback``). The metadata's
    ``fcconv.onnx_exporter`` says which one wrote the file.
    """
    path = Path(path)
    input_shape = tuple(int(s) for s in input_shape)
    native = spatial_size(input_shape)
    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"head format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    if exporter not in EXPORTERS:
        raise BadInputError(f"ONNX exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    module = as_export_module(converted, head_format).eval()
    geometry = getattr(converted, "fcconv_geometry", None)
    grid = probe_output_grid(module, input_shape) if geometry is not None and geometry.mode == "map" else None
    # a channel-free input (N, L) has its length at axis 1; every output map is (N, K, *map)
    names = SPATIAL_AXIS_NAMES[len(native)]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(names)}}
    input_axes = {0: "batch", **{spatial_start(input_shape) + i: name for i, name in enumerate(names)}}
    outputs = output_names(module, input_shape)

    traced = input_shape, input_axes, axes, outputs, opset
    used, fallback = exporter, None
    if exporter == "torchscript":
        model, weights = _torchscript_graph(module, *traced)
    else:
        try:
            model, weights = _dynamo_graph(module, *traced)
        except Exception as exc:  # noqa: BLE001 - whatever torch.export or its translation raises
            cause = _innermost(exc)
            if exporter == "dynamo":
                raise NotConvertibleError(
                    f"the torch.export-based ONNX exporter cannot export this model ({type(cause).__name__}: "
                    f"{reason(cause)}); --onnx-exporter auto falls back to the TorchScript exporter"
                ) from exc
            used, fallback = "torchscript", f"{type(cause).__name__}: {reason(cause)}"
            warnings.warn(
                f"the torch.export-based ONNX exporter failed ({fallback}); exported with the TorchScript exporter",
                FcconvWarning,
                stacklevel=2,
            )
            model, weights = _torchscript_graph(module, *traced)
        else:
            used = "dynamo"
    props = {
        **fcconv_metadata(geometry, grid=grid),
        **output_channels_metadata(_output_channels(model)),
        "fcconv.head_format": head_format,
        **(metadata or {}),
    }
    # which exporter wrote the graph, and, written once from the weights themselves at the end, their digest
    for key in (ONNX_EXPORTER_KEY, ONNX_EXPORTER_FALLBACK_KEY, WEIGHTS_DIGEST_KEY, EACH_DIGEST_KEY):
        props.pop(key, None)
    props[ONNX_EXPORTER_KEY] = used
    if fallback is not None:
        props[ONNX_EXPORTER_FALLBACK_KEY] = fallback
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    graph_bytes = model.SerializeToString()
    if external_data is None:
        external_data = len(graph_bytes) + sum(_nbytes(t) + 1024 for t in weights.values()) >= PROTOBUF_LIMIT

    _write_streamed(path, graph_bytes, weights, external_data, on_progress)
    return path


def _dynamo_graph(
    module: nn.Module,
    input_shape: tuple[int, ...],
    input_axes: dict[int, str],
    axes: dict[int, str],
    outputs: list[str],
    opset: int,
) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """The graph of ``module`` exported by torch.onnx's torch.export-based exporter without its weights, and the
    weights it reads, by initializer name.

    As in :func:`_torchscript_graph`, the weights enter the trace as named inputs, so the
    exporter holds no copy of them and its optimizer folds nothing into new tensors; the
    module stays registered, with its parameters and buffers out of their slots, so the
    exporter records each node's module path, which names the node.
    """
    module = traceable_form(module, ceil_mode_pools=False)  # a 1D max pooling would fix the length
    sample, state = _sample_and_weights(module, input_shape, batch=2)  # torch.export fixes an axis traced at 1
    free = torch.export.Dim.DYNAMIC  # an axis the trace would fix fails the export rather than being frozen
    with _WeightsPassedIn(module, list(state)) as wrapper:
        program = torch.onnx.export(
            wrapper,
            (sample, list(state.values())),
            dynamo=True,
            input_names=[INPUT_NAME, *state],
            output_names=outputs,
            dynamic_shapes=(dict.fromkeys(input_axes, free), [None] * len(state)),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    del program  # it holds the traced program, whose example inputs are the weights
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    for axis, name in input_axes.items():
        if not dims[axis].dim_param:
            raise RuntimeError(f"the exporter fixed the input's {name} axis at {dims[axis].dim_value}")
        dims[axis].dim_param = name
    _name_axes(model.graph.output, axes)
    # The shapes inside are the exporter's own symbols (s0, s77): the graph's inputs and outputs name the axes.
    # The exporter's notes on the traced program (its signature, the symbols' ranges) describe inputs that are gone.
    del model.graph.value_info[:], model.graph.metadata_props[:]
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]
    _constants_as_nodes(model.graph)
    _name_nodes_after_modules(model.graph, _WeightsPassedIn.PREFIX)
    return _weights_taken_out(model, state)


def _torchscript_graph(
    module: nn.Module,
    input_shape: tuple[int, ...],
    input_axes: dict[int, str],
    axes: dict[int, str],
    outputs: list[str],
    opset: int,
) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """The graph of ``module`` traced by the TorchScript exporter without its weights, and the weights it reads,
    by initializer name."""
    sample, state = _sample_and_weights(module, input_shape, batch=1)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        # Within this call only: the fallback is asked for by name, or follows a failure that was
        # warned of, so its deprecation and tracer warnings are no news to the caller.
        warnings.simplefilter("ignore")
        # The weights enter the trace as named inputs in place of the module's parameters:
        # the exporter then holds no copy of them (its shape inference copies the parameters
        # a graph uses) and derives no new tensors from them (fused batch norms, folded
        # reshapes). oneDNN is off for the one traced forward pass, where it would reorder
        # each large kernel into a second copy.
        with torch.backends.mkldnn.flags(enabled=False):
            torch.onnx.export(
                _WeightsAsInputs(module, list(state)),
                (sample, *state.values()),
                buffer,
                input_names=[INPUT_NAME, *state],
                output_names=outputs,
                dynamic_axes={INPUT_NAME: input_axes, **dict.fromkeys(outputs, axes)},
                opset_version=opset,
                dynamo=False,
                export_params=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
    return _weights_taken_out(onnx.load_from_string(buffer.getvalue()), state)


def _sample_and_weights(
    module: nn.Module, input_shape: tuple[int, ...], batch: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A zero input of ``batch`` samples in the module's floating dtype, and its state_dict's tensors by name:
    what an exporter traces with, the weights entering as named inputs."""
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    state = {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}
    return torch.zeros((batch, *input_shape), dtype=dtype), state


def _weights_taken_out(model: onnx.ModelProto, state: dict[str, torch.Tensor]) -> tuple[onnx.ModelProto, dict]:
    """``model`` without the graph inputs that carried the weights, and the weights its nodes read, by name."""
    used = {name for node in model.graph.node for name in node.input}
    weights = {}
    for graph_input in list(model.graph.input)[1:]:
        if graph_input.name in used:
            weights[graph_input.name] = state[graph_input.name]
        model.graph.input.remove(graph_input)
    return model, weights


def _name_axes(values: Sequence[onnx.ValueInfoProto], axes: dict[int, str]) -> None:
    """Name the ``axes`` of each of ``values`` that has them (as the TorchScript exporter's dynamic axes did)."""
    for value in values:
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims):
                dims[axis].dim_param = name


def _constants_as_nodes(graph: onnx.GraphProto) -> None:
    """The exporter's own initializers (constants it lifted: reduction axes, a model's non-weight tensors) as
    Constant nodes, so that the file's initializers are the module's weights, each one streamed and digested."""
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    del graph.initializer[:]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)


def _name_nodes_after_modules(graph: onnx.GraphProto, prefix: str) -> None:
    """Name each node after the module it computes, from the scopes the exporter records on it.

    A module that makes one node names it (``classifier.0``); one that makes several names
    each ``PATH/OpType`` (a second of a type ``PATH/OpType_1``); a node outside any module
    is named by its type alone. The exporter's metadata (its source locations included)
    is dropped: the file's bytes depend on the model alone.
    """
    scopes = [_module_path(node, prefix) for node in graph.node]
    counts: dict[str, int] = {}
    for scope in scopes:
        counts[scope] = counts.get(scope, 0) + 1
    taken: set[str] = set()
    for node, scope in zip(graph.node, scopes):
        base = scope if scope and counts[scope] == 1 else "/".join(filter(None, (scope, node.op_type)))
        name, index = base, 0
        while name in taken:
            index += 1
            name = f"{base}_{index}"
        taken.add(name)
        node.name = name
        node.ClearField("doc_string")
        del node.metadata_props[:]


def _module_path(node: onnx.NodeProto, prefix: str) -> str:
    """The path of the innermost module ``node`` was made in, relative to the exported module ('' for none)."""
    props = {entry.key: entry.value for entry in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return ""
    paths = [s for s in scopes[1:-1] if isinstance(s, str) and (s == prefix or s.startswith(prefix + "."))]
    return paths[-1][len(prefix) + 1 :] if paths else ""


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s chain of causes: the exporter wraps what failed in its own."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _write_streamed(
    path: Path,
    graph_bytes: bytes,
    weights: dict[str, torch.Tensor],
    external_data: bool,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """Write the graph, then each weight streamed from its own storage (inline, or to ``NAME.onnx.data``),
    hashing it on the way; the digest is appended last, staged and moved into place."""
    digest = WeightsDigest()
    total, written = sum(_nbytes(t) for t in weights.values()), 0
    progress = on_progress or (lambda done, total: None)
    progress(0, total)
    with staged_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(graph_bytes)
            if external_data:
                location = external_data_path(path)
                with staged_path(location) as data_tmp, open(data_tmp, "wb") as data:
                    for name, tensor in weights.items():
                        data.write(b"\0" * (-data.tell() % EXTERNAL_DATA_ALIGNMENT))
                        offset = data.tell()
                        data.write(_digested_bytes(digest, name, tensor))
                        f.write(_initializer_fragment(name, tensor, location=location.name, offset=offset))
                        written += _nbytes(tensor)
                        progress(written, total)
            else:
                for name, tensor in weights.items():
                    f.write(_initializer_fragment(name, tensor))
                    f.write(_digested_bytes(digest, name, tensor))
                    written += _nbytes(tensor)
                    progress(written, total)
            # Metadata entries merge into the model like the weights do; the digest is known only now.
            f.write(metadata_fragment({WEIGHTS_DIGEST_KEY: digest.hexdigest(), EACH_DIGEST_KEY: digest.each_json()}))


def inline_external_data(path: str | Path) -> bool:
    """Move the weights from ``NAME.onnx.data`` into ``path`` itself, unless the file would pass 2 GiB.

    ``fcconv convert`` verifies its staged export with the weights in external data,
    which onnxruntime maps from the file instead of parsing and copying it; the single
    file is then written from those very bytes, and the data file removed. The
    result is the file :func:`export_onnx` writes without external data, byte for
    byte. Returns whether the weights were moved; nothing changes when they were not.
    """
    path = Path(path)
    data_path = external_data_path(path)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return False
    pieces = []
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != data_path.name:
            raise BadInputError(
                f"{path}: weight {tensor.name!r} lies in {info.get('location')!r}, not {data_path.name}"
            )
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else data_path.stat().st_size - offset
        pieces.append((tensor, offset, length))
    kept = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    # The weights' digests follow the weights, as export_onnx writes them.
    trailing = {e.key: e.value for e in model.metadata_props if e.key in (WEIGHTS_DIGEST_KEY, EACH_DIGEST_KEY)}
    leading = [e for e in model.metadata_props if e.key not in trailing]
    del model.metadata_props[:]
    model.metadata_props.extend(leading)
    head = model.SerializeToString()
    if len(head) + sum(length + 1024 for _, _, length in pieces) >= PROTOBUF_LIMIT:
        return False
    with staged_path(path) as tmp, open(tmp, "wb") as f, open(data_path, "rb") as data:
        f.write(head)
        for tensor, offset, length in pieces:
            inline = onnx.TensorProto()
            inline.CopyFrom(tensor)
            del inline.external_data[:]
            inline.ClearField("data_location")
            f.write(_inline_fragment_head(inline.SerializeToString(), length))
            data.seek(offset)
            remaining = length
            while remaining:  # in blocks: the weights pass through the page cache, not this process
                block = data.read(min(remaining, 1 << 22))
                if not block:
                    raise BadInputError(f"{data_path} ends before weight {tensor.name!r} does")
                f.write(block)
                remaining -= len(block)
        if trailing:
            f.write(metadata_fragment(trailing))
    data_path.unlink()
    return True


def _digested_bytes(digest: WeightsDigest, name: str, tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, as written to the file, after adding them to ``digest``."""
    data = tensor_bytes(tensor)
    digest.add(name, onnx_data_type(name, tensor), list(tensor.shape), [data])
    return data


def _output_channels(model) -> dict[str, int | None]:
    """Each output's channel count (axis 1 of the traced graph's output), None where the exporter could not state it."""
    channels = {}
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        channels[output.name] = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    return channels


class _WeightsAsInputs(nn.Module):
    """Calls ``module`` with its state_dict passed in as arguments, in place of its own tensors.

    ``module`` is held outside the module registry, so the exporter sees no parameters
    at all: none it could copy, fuse or fold (with the module registered, its eval-mode
    batch-norm fusion rewrote the shared tensors in place).
    """

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.__dict__["model"] = module
        self.names = names

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Each tensor goes into its module's registry as the very object the tracer was
        # given, so the trace reads the input, not a copy (torch.func.functional_call, which
        # does this swap, refuses to run under the tracer).
        saved = []
        for name, tensor in zip(self.names, tensors):
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            registry = owner._parameters if attr in owner._parameters else owner._buffers
            saved.append((registry, attr, registry[attr]))
            registry[attr] = tensor
        try:
            # several outputs (a tuple, named tuple or dict) become the graph's outputs in order
            return tuple(tensor for _, tensor in named_outputs(self.model(x)))
        finally:
            for registry, attr, original in reversed(saved):
                registry[attr] = original


class _WeightsPassedIn(nn.Module):
    """``module``, registered as a submodule, called with its state_dict passed in as a list of arguments.

    Inside ``with``, every slot of the state_dict holds None, so the exporter sees no
    parameters or buffers (none it could copy or fold) while it still sees every module
    and records each node's module path; each call puts the tensors it was given in
    their slots and empties them again. Leaving restores the module's own tensors.
    """

    PREFIX = "model"

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = module  # PREFIX
        self.slots = []
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            self.slots.append((owner, "_parameters" if attr in owner._parameters else "_buffers", attr))
        self.saved = [getattr(owner, kind)[attr] for owner, kind, attr in self.slots]
        self.eval()

    def _fill(self, tensors: Sequence[torch.Tensor | None]) -> None:
        # The registry is looked up on each call: torch.export swaps a module's registry dicts for copies.
        for (owner, kind, attr), tensor in zip(self.slots, tensors):
            getattr(owner, kind)[attr] = tensor

    def __enter__(self) -> _WeightsPassedIn:
        self._fill([None] * len(self.slots))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._fill(self.saved)

    def forward(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self._fill(tensors)
        try:
            # several outputs (a tuple, named tuple or dict) become the graph's outputs in order
            return tuple(tensor for _, tensor in named_outputs(self.model(x)))
        finally:
            self._fill([None] * len(self.slots))


EXTERNAL_DATA_ALIGNMENT = 4096  # page-aligned offsets let readers memory-map the weights


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _initializer_fragment(name: str, tensor: torch.Tensor, *, location: str | None = None, offset: int = 0) -> bytes:
    """A serialized ``ModelProto {graph {initializer {...}}}`` that, appended to a model file, adds one weight.

    Serialized protobuf messages merge when concatenated (repeated fields append), so
    the file is the traced graph followed by one fragment per weight. Inline, the
    fragment ends with the raw_data field's header and the caller writes the tensor's
    bytes right after it; with ``location`` it points into the external data file.
    """
    proto = onnx.TensorProto(name=name, dims=list(tensor.shape), data_type=onnx_data_type(name, tensor))
    size = _nbytes(tensor)
    if location is None:
        return _inline_fragment_head(proto.SerializeToString(), size)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", size)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)
    initializer = _field_header(5, proto.ByteSize()) + proto.SerializeToString()  # GraphProto.initializer
    return _field_header(7, len(initializer)) + initializer  # ModelProto.graph


def _inline_fragment_head(tensor_head: bytes, size: int) -> bytes:
    """The fragment that adds one weight whose ``size`` bytes of raw_data the caller writes right after it."""
    head = tensor_head + _field_header(9, size)  # TensorProto.raw_data
    initializer = _field_header(5, len(head) + size) + head  # GraphProto.initializer
    return _field_header(7, len(initializer) + size) + initializer  # ModelProto.graph


def _field_header(field: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(length)
