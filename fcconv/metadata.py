"""The ``fcconv.*`` metadata an export carries, written and read in one place.

Every export (ONNX ``metadata_props``, a safetensors header, a ``.pt2``'s extra file)
records what a later ``fcconv verify`` or ``fcconv check`` needs without the original:
the native input shape, how the head was converted, the output map's geometry, the
weights' digest and the original's output on a fixed probe input. This module holds
the keys, the encoders that write them and the decoders that read them back. It
imports neither torch nor onnxruntime, so that ``fcconv check`` runs without torch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from fcconv._version import __version__
from fcconv.files import file_sha256
from fcconv.sizes import parse_input_shape

if TYPE_CHECKING:
    from fcconv.rewrite import HeadGeometry

__all__ = [
    "EACH_DIGEST_KEY",
    "ONNX_EXPORTER_FALLBACK_KEY",
    "ONNX_EXPORTER_KEY",
    "OUTPUT_CHANNELS_KEY",
    "PROBE_OUTPUT_KEY",
    "PROBE_SHAPE_KEY",
    "PROBE_VALUES",
    "SPATIAL_AXIS_NAMES",
    "WEIGHTS_DIGEST_KEY",
    "ConversionOptions",
    "OutputGrid",
    "append_metadata",
    "card_metadata",
    "conversion_options",
    "fcconv_metadata",
    "metadata_fragment",
    "metadata_grid",
    "metadata_input_shape",
    "output_channels_metadata",
    "parse_output_channels",
    "probe_array",
    "probe_keys",
    "probe_metadata",
    "recorded_card",
    "recorded_probe",
    "truncation_metadata",
]

SPATIAL_AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
"""The names an export gives its spatial axes, by their count (the batch axis is ``batch``)."""
INPUT_SHAPE_KEY = "fcconv.input_shape"
LAYOUT_KEY = "fcconv.layout"
NUM_CLASSES_KEY = "fcconv.num_classes"
WEIGHTS_DIGEST_KEY = "fcconv.weights_sha256"
EACH_DIGEST_KEY = "fcconv.initializer_sha256"
OUTPUT_CHANNELS_KEY = "fcconv.output_channels"
ONNX_EXPORTER_KEY = "fcconv.onnx_exporter"  # which of torch.onnx's exporters wrote the graph: dynamo or torchscript
ONNX_EXPORTER_FALLBACK_KEY = "fcconv.onnx_exporter_fallback"  # why the dynamo one was not used, where it failed
PROBE_OUTPUT_KEY, PROBE_SHAPE_KEY = "fcconv.probe_output", "fcconv.probe_shape"
LOW_RANK_KEY = "fcconv.low_rank"  # with --rank: each factored layer's rank and the share of its energy kept
STRIDE_KEY = "fcconv.atrous_stride"  # with --stride: the output stride asked for, per spatial axis ("16,16")
PROBE_VALUES = 4096  # the first this many values of the probe output are recorded


@dataclass(frozen=True)
class OutputGrid:
    """Per spatial axis: input pixels between neighbouring output positions, and the input that gives one.

    Recorded as ``fcconv.total_stride`` and ``fcconv.receptive_field``; measured by
    :func:`fcconv.grid.probe_output_grid`.
    """

    total_stride: tuple[int, ...]
    receptive_field: tuple[int, ...]

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The output map's size for an input of spatial ``size`` (0 along an axis shorter than the field)."""
        return tuple(
            max(0, (int(x) - rf) // stride + 1) for x, rf, stride in zip(size, self.receptive_field, self.total_stride)
        )


# --- writing ----------------------------------------------------------------------------------------


def fcconv_metadata(
    geometry: HeadGeometry | None = None,
    source: str | Path | None = None,
    *,
    grid: OutputGrid | None = None,
    num_classes: int | None = None,
) -> dict[str, str]:
    """What a later ``fcconv verify`` or ``fcconv check`` needs to know about an export, as metadata entries.

    ``grid`` is the output map's geometry in input pixels (:func:`~fcconv.grid.probe_output_grid`);
    for a map without one the total stride and receptive field are ``unknown``, for a
    pooled output ``global``. The weights' digest is not here: the writers append it
    once the weights are written.
    """
    meta = {"fcconv.version": __version__}
    if geometry is not None:
        pooled = geometry.mode == "pooled"
        meta.update({
            INPUT_SHAPE_KEY: ",".join(map(str, geometry.input_shape)),
            "fcconv.dense": "true" if geometry.dense else "false",
            "fcconv.pool": geometry.pool or "none",
            "fcconv.mode": geometry.mode,
            "fcconv.window": "global" if geometry.window is None else ",".join(map(str, geometry.window)),
            "fcconv.stride": ",".join(map(str, geometry.stride)),
            "fcconv.total_stride": "global" if pooled else _axes(grid and grid.total_stride),
            "fcconv.receptive_field": "global" if pooled else _axes(grid and grid.receptive_field),
            **truncation_metadata(geometry.logits, geometry.until),
        })  # fmt: skip
    if num_classes is not None:
        meta[NUM_CLASSES_KEY] = str(num_classes)
    if source is not None:
        meta["fcconv.source_sha256"] = file_sha256(source)
    return meta


def truncation_metadata(logits: bool, until: str | None) -> dict[str, str]:
    """How the original was ended before conversion (``--logits``, ``--until``), for ``fcconv verify`` to end its
    reference the same way: ``fcconv.logits`` always, ``fcconv.until`` when set."""
    return {"fcconv.logits": str(bool(logits)).lower(), **({"fcconv.until": until} if until else {})}


def output_channels_metadata(channels: Mapping[str, int | None]) -> dict[str, str]:
    """``fcconv.num_classes`` (the first output's channels) and, for several outputs, ``fcconv.output_channels``."""
    counts = list(channels.values())
    meta = {} if not counts or counts[0] is None else {NUM_CLASSES_KEY: str(counts[0])}
    if len(channels) > 1 and None not in counts:
        meta[OUTPUT_CHANNELS_KEY] = ",".join(f"{name}:{count}" for name, count in channels.items())
    return meta


def probe_array(input_shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """A fixed input of the native shape, batch 1, made by a formula rather than a random generator.

    An export records its original's output on this input (``fcconv.probe_output``),
    so that ``fcconv check`` can compare the export with the trained model without it:
    the same values on every machine and with every library version. Computed in
    float64 and rounded to ``dtype`` (:func:`fcconv.verify.probe_input` gives the same
    values as a tensor).
    """
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in input_shape], indexing="ij")
    phase = sum((0.61803 + 0.29 * i) * (axis + 1) for i, axis in enumerate(axes))
    return (2 * np.sin(phase) + np.cos(0.37 * phase))[np.newaxis].astype(dtype)


def probe_keys(index: int, name: str) -> tuple[str, str]:
    """The metadata keys of output ``index`` (named ``name``): plain for the first, ``KEY:NAME`` for the others."""
    if index == 0:
        return PROBE_SHAPE_KEY, PROBE_OUTPUT_KEY
    return f"{PROBE_SHAPE_KEY}:{name}", f"{PROBE_OUTPUT_KEY}:{name}"


def probe_metadata(expected: Any) -> dict[str, str]:
    """The original's output on the probe input (:func:`probe_array`), as metadata ``fcconv check`` compares with.

    For each output (``expected`` is a tensor, or a tuple or dict of them) its shape,
    and its first :data:`PROBE_VALUES` values (C order) as float32 little-endian
    bytes in base64, under :func:`probe_keys`.
    """
    # torch is installed wherever there are tensors to record
    from fcconv.outputs import named_outputs

    entries = {}
    for index, (name, tensor) in enumerate(named_outputs(expected)):
        values = tensor.detach().reshape(-1)[:PROBE_VALUES].cpu().float().numpy().astype("<f4")
        shape_key, output_key = probe_keys(index, name)
        entries[shape_key] = ",".join(map(str, tensor.shape))
        entries[output_key] = base64.b64encode(values.tobytes()).decode("ascii")
    return entries


def card_metadata(card: Mapping[str, Any]) -> dict[str, str]:
    """The parts of a model card a heatmap needs (class names, preprocessing), as metadata entries."""
    meta = {}
    if isinstance(card.get("classes"), list):
        meta["fcconv.classes"] = json.dumps([str(c) for c in card["classes"]])
    if isinstance(card.get("preprocess"), dict):
        meta["fcconv.preprocess"] = json.dumps(card["preprocess"], sort_keys=True)
    if isinstance(card.get("background_class"), str):
        meta["fcconv.background_class"] = card["background_class"]
    return meta


def low_rank_metadata(factored: Sequence[Any]) -> dict[str, str]:
    """With ``--rank``: each factored layer's rank and share of energy kept, as JSON; nothing otherwise."""
    if not factored:
        return {}
    layers = {f.name: {"rank": f.rank, "energy": round(f.energy, 6)} for f in factored}
    return {LOW_RANK_KEY: json.dumps(layers, separators=(",", ":"))}


def stride_metadata(plan: Any) -> dict[str, str]:
    """With ``--stride``: the output stride per spatial axis, which ``verify`` reads to convert the original alike."""
    if plan is None:
        return {}
    return {STRIDE_KEY: ",".join(map(str, plan.stride))}


def metadata_fragment(entries: Mapping[str, str]) -> bytes:
    """A serialized ``ModelProto {metadata_props {...}}`` that, appended to a model file, adds these entries."""
    fragment = onnx.ModelProto()
    for key, value in entries.items():
        entry = fragment.metadata_props.add()
        entry.key, entry.value = key, value
    return fragment.SerializeToString()


def append_metadata(path: str | Path, entries: Mapping[str, str]) -> None:
    """Add metadata entries to the ONNX file at ``path`` without rewriting it (serialized messages merge)."""
    with open(path, "ab") as f:
        f.write(metadata_fragment(entries))


def _axes(values: tuple[int, ...] | None) -> str:
    return "unknown" if not values else ",".join(map(str, values))


# --- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionOptions:
    """How an export was converted, as its metadata says: what ``fcconv verify`` repeats on the original."""

    dense: bool
    pool: str
    pointwise: bool
    logits: bool
    until: str | None


def conversion_options(meta: Mapping[str, str]) -> ConversionOptions:
    """The conversion options recorded in ``meta`` (the defaults where a key is absent)."""
    return ConversionOptions(
        dense=meta.get("fcconv.dense", "false") == "true",
        pool=meta.get("fcconv.pool", "none"),
        pointwise=meta.get("fcconv.pointwise", "false") == "true",
        logits=meta.get("fcconv.logits", "false") == "true",
        until=meta.get("fcconv.until") or None,
    )


def metadata_input_shape(meta: Mapping[str, str]) -> tuple[int, ...] | None:
    """The native (C, *spatial) input shape recorded as ``fcconv.input_shape``, or None."""
    return parse_input_shape(meta[INPUT_SHAPE_KEY]) if INPUT_SHAPE_KEY in meta else None


def metadata_num_classes(meta: Mapping[str, str]) -> int | None:
    """``fcconv.num_classes``, or None where it is absent or not a count."""
    value = meta.get(NUM_CLASSES_KEY, "")
    return int(value) if value.isdigit() else None


def metadata_grid(meta: Mapping[str, str]) -> OutputGrid | None:
    """The :class:`OutputGrid` an export's metadata records, or None (global, unknown or absent)."""
    try:
        stride = tuple(int(s) for s in meta["fcconv.total_stride"].split(","))
        field_ = tuple(int(s) for s in meta["fcconv.receptive_field"].split(","))
    except (KeyError, ValueError):
        return None
    return OutputGrid(stride, field_) if len(stride) == len(field_) else None


def parse_output_channels(meta: Mapping[str, str]) -> dict[str, int]:
    """``fcconv.output_channels`` ("name:K,name:K", written for a model with several outputs) as a dict."""
    channels = {}
    for item in meta.get(OUTPUT_CHANNELS_KEY, "").split(","):
        name, _, count = item.rpartition(":")
        if name and count.isdigit():
            channels[name] = int(count)
    return channels


def recorded_card(meta: Mapping[str, str]) -> dict[str, Any]:
    """The model card's parts an export recorded (:func:`card_metadata`): ``classes``, ``preprocess`` and
    ``background_class``, those present; ValueError when one is not the JSON fcconv writes."""
    card: dict[str, Any] = {}
    for key in ("classes", "preprocess"):
        if f"fcconv.{key}" in meta:
            card[key] = json.loads(meta[f"fcconv.{key}"])
    if "fcconv.background_class" in meta:
        card["background_class"] = meta["fcconv.background_class"]
    return card


def recorded_probe(meta: Mapping[str, str], shape_key: str, output_key: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape and the recorded float32 values of one output on the probe input; ValueError when malformed."""
    shape = tuple(int(d) for d in meta[shape_key].split(","))
    values = np.frombuffer(base64.b64decode(meta[output_key]), dtype="<f4").copy()
    return shape, values
