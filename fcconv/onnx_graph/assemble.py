"""The converted model put together, the input model's own head cut out for the verifier, and the file written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from fcconv._version import __version__
from fcconv.errors import NotConvertibleError
from fcconv.external_data import PROTOBUF_LIMIT, external_data_path
from fcconv.grid_fit import fit_output_grid
from fcconv.metadata import fcconv_metadata, output_channels_metadata
from fcconv.onnx_graph.classifier import MAP_AXES, SCORE_AXES, OnnxClassifier, OnnxConversion
from fcconv.onnx_graph.collapse import _Analysis, _Head
from fcconv.onnx_graph.graph import _Graph, _sub_model, _value_info
from fcconv.onnx_head import label as _label
from fcconv.onnx_shapes import onnx_output_shapes
from fcconv.staging import staged_path
from fcconv.weights_digest import onnx_weights_digest


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
    grid = fit_output_grid(output_shape, input_shape) if conversion.geometry.mode == "map" else None
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
