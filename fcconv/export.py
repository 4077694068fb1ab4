"""Write a converted model as fully convolutional ONNX, and run ONNX files.

The export is a graph of Conv nodes with named free batch and spatial axes. The
converted module's fast layers (:mod:`fcconv.layers`) are exported as the plain
convolutions they are, so the file holds no Flatten, Reshape or Gemm in the head.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from fcconv.errors import BadInputError
from fcconv.layers import FullyConnectedConvMixin, WindowGemm, as_plain_conv

if TYPE_CHECKING:
    from fcconv.rewrite import HeadGeometry

__all__ = ["OnnxModel", "SPATIAL_AXIS_NAMES", "export_onnx", "fcconv_metadata", "staged_path"]

SPATIAL_AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
INPUT_NAME = "input"
OUTPUT_NAME = "scores"
OPSET = 18
HEAD_FORMATS = ("conv", "gemm")


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
        import copy

        plain = copy.copy(module)
        plain._modules = dict(module._modules)
    for name in fast:
        conv = module.get_submodule(name)
        plain.set_submodule(name, as_plain_conv(conv) if head_format == "conv" else WindowGemm(conv), strict=False)
    return plain


@contextlib.contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds and removed otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_onnx(
    converted: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] = (3, 224, 224),
    *,
    metadata: Mapping[str, str] | None = None,
    head_format: str = "conv",
    opset: int = OPSET,
) -> Path:
    """Export ``converted`` to ONNX at ``path`` with free batch and spatial axes.

    ``input_shape`` is the native per-sample shape used to trace. The input is named
    ``input`` and the output ``scores``; the axes are ``batch``, then ``height`` and
    ``width`` (``length`` in 1D, ``depth, height, width`` in 3D). ``metadata`` is
    added to the model's metadata_props, after what fcconv records itself (its
    version and, for a module made by :func:`fcconv.convert`, the native input
    shape, the conversion mode and the head's window and stride). The file is written under a temporary
    name and renamed into place, so a failed export leaves nothing behind.

    ``head_format="gemm"`` writes the same function another way: each converted layer
    as its windows gathered with strided slices and one MatMul over all windows of
    the batch (:class:`~fcconv.layers.WindowGemm`), which onnxruntime runs faster at
    batch > 1 because it reads the head's weights once per batch instead of once per
    image. The default ``"conv"`` writes the head as Conv nodes only.
    """
    path = Path(path)
    input_shape = tuple(int(s) for s in input_shape)
    rank = len(input_shape) - 1
    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"head format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    module = as_export_module(converted, head_format).eval()
    geometry = getattr(converted, "fcconv_geometry", None)
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    sample = torch.zeros((1, *input_shape), dtype=dtype)
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(SPATIAL_AXIS_NAMES[rank])}}

    with staged_path(path) as tmp:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (sample,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        props = {**fcconv_metadata(geometry), "fcconv.head_format": head_format, **(metadata or {})}
        _append_metadata(tmp, props)
    return path


def _append_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Add metadata_props to the ONNX file at ``path`` without reading it back.

    Serialized protobuf messages merge when concatenated (repeated fields append),
    so a ModelProto holding only the new entries is appended to the file: the
    weights are neither parsed nor copied again.
    """
    import onnx

    extra = onnx.ModelProto()
    for key, value in props.items():
        entry = extra.metadata_props.add()
        entry.key, entry.value = key, str(value)
    with open(path, "ab") as f:
        f.write(extra.SerializeToString())


class OnnxModel:
    """An ONNX file run with onnxruntime on the CPU, called like a module on tensors.

    ``optimize="basic"`` (the default, for verification) applies onnxruntime's basic
    graph optimizations only: constant folding and removal of redundant nodes; the
    layout and fusion passes of ``"all"`` (onnxruntime's own default, for timing)
    take seconds to set up on a large head.
    """

    def __init__(self, path: str | Path, optimize: str = "basic") -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"{path}: no such file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options.graph_optimization_level = levels[optimize]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure means the file is not a usable ONNX model
            text = " ".join(str(exc).split())[:200]
            raise BadInputError(f"{path} is not an ONNX model onnxruntime can load: {text}") from exc
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy())})
        return torch.from_numpy(outputs[0])


def fcconv_metadata(geometry: HeadGeometry | None = None, source: str | Path | None = None) -> dict[str, str]:
    """What a later ``fcconv verify`` needs to know about an export, as ONNX metadata_props."""
    import hashlib

    from fcconv import __version__

    meta = {"fcconv.version": __version__}
    if geometry is not None:
        meta.update({
            "fcconv.input_shape": ",".join(map(str, geometry.input_shape)),
            "fcconv.dense": "true" if geometry.dense else "false",
            "fcconv.window": "global" if geometry.window is None else ",".join(map(str, geometry.window)),
            "fcconv.stride": ",".join(map(str, geometry.stride)),
        })  # fmt: skip
    if source is not None:
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        meta["fcconv.source_sha256"] = digest.hexdigest()
    return meta
