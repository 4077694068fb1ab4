"""Run an ONNX model on the CPU: one runner for exports, input models and their pieces.

:class:`OnnxRunner` is called like a module. Given numpy arrays it returns numpy
arrays, which is all ``fcconv check`` needs (no torch); given torch tensors it
returns tensors, for verification against a PyTorch original. A float64 model,
whose convolutions onnxruntime's CPU provider cannot run, runs in onnx's reference
evaluator instead (:func:`inference_session`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

from fcconv.errors import BadInputError
from fcconv.external_data import check_file_external_data
from fcconv.files import check_readable

__all__ = ["ONNXRUNTIME", "OnnxRunner", "ReferenceSession", "inference_session"]

ONNXRUNTIME = "onnxruntime"
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
"""The numpy dtype of an input, by the element type onnxruntime names."""
OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRunner:
    """An ONNX model (a file, or a ModelProto in memory) run with onnxruntime on the CPU, called like a module.

    It takes and gives channels-first values whatever the model's layout, so that a
    comparison sees (N, C, H, W) inputs and (N, K, h, w) outputs: ``nhwc_input``
    transposes the input to N×H×W×C, ``nhwc_outputs`` every rank-4 output from
    (N, h, w, K) back. It returns the output ``output`` (an index), or else the one
    output, or a dict of all of them by name, in order, for a model with several.
    Arrays in, arrays out; tensors in, tensors out.

    A model whose input has a fixed batch size (as most exports from other tools
    have) is run on pieces of exactly that size, the last one padded with zeros and
    cut back, so that any batch can be read through it.

    ``optimize="basic"`` (the default, for verification) applies onnxruntime's basic
    graph optimizations only: constant folding and removal of redundant nodes; the
    layout and fusion passes of ``"all"`` (onnxruntime's own default, for timing)
    take seconds to set up on a large head; with ``"all"`` onnxruntime also plans the
    memory of a shape it has run before. ``engine`` names what runs the model.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        optimize: str = "basic",
        nhwc_input: bool = False,
        nhwc_outputs: bool = False,
        output: int | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failed run is reported by its caller, not logged
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimize]
        # A verification runs a shape once or twice (its largest sample by sample); the memory pattern onnxruntime
        # plans on a shape's second run is a second block for its activations beside the arena's (+50 MB at
        # VGG16's 448×448), and saves nothing on so few runs.
        options.enable_mem_pattern = optimize == "all"
        if isinstance(model, (str, Path)):
            check_readable(Path(model), "model")
            check_file_external_data(model)
            described = f"{model} is not an ONNX model onnxruntime can load"
        else:
            described = "onnxruntime cannot load the model"
        source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        try:
            self.session = inference_session(source, options)
        except Exception as exc:  # noqa: BLE001 - any load failure means the graph is not runnable
            text = " ".join(str(exc).split())[:200]
            raise BadInputError(f"{described}: {text}") from exc
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_type = graph_input.type
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = graph_input.shape[0] if graph_input.shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None
        self.numpy_dtype = np.dtype(NUMPY_DTYPES.get(graph_input.type, np.float32))
        self.engine = getattr(self.session, "engine", ONNXRUNTIME)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.nhwc_input, self.nhwc_outputs, self.output = nhwc_input, nhwc_outputs, output
        self.source = model  # what the memory estimate reads the graph's shapes from

    @property
    def dtype(self) -> Any:
        """The input's torch dtype (for callers that feed tensors; needs torch)."""
        import torch

        return {np.float16: torch.float16, np.float64: torch.float64}.get(self.numpy_dtype.type, torch.float32)

    def __call__(self, x: Any) -> Any:
        """The output (an array, or a tensor when ``x`` is one), or a dict of them by output name."""
        tensors = not isinstance(x, np.ndarray)
        array = np.ascontiguousarray(x.detach().cpu().numpy() if tensors else x)
        if self.nhwc_input:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
        outputs = [self._run(array, index) for index in self._indices()]
        if self.nhwc_outputs:
            outputs = [out.transpose(0, 3, 1, 2) if out.ndim == 4 else out for out in outputs]
        outputs = [np.ascontiguousarray(out) for out in outputs]
        if tensors:  # torch is installed wherever tensors are passed in
            import torch

            outputs = [torch.from_numpy(out) for out in outputs]
        if self.output is not None or len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs))

    def _indices(self) -> list[int]:
        return [self.output] if self.output is not None else list(range(len(self.output_names)))

    def _run(self, array: np.ndarray, index: int) -> np.ndarray:
        names = [self.output_names[index]]
        if self.batch is None or len(array) == self.batch:
            return self.session.run(names, {self.input_name: array})[0]
        pieces = []
        for start in range(0, len(array), self.batch):
            piece = array[start : start + self.batch]
            short = self.batch - len(piece)
            if short:
                piece = np.concatenate([piece, np.zeros((short, *piece.shape[1:]), piece.dtype)])
            out = self.session.run(names, {self.input_name: piece})[0]
            pieces.append(out[: len(out) - short])
        return np.concatenate(pieces)


def inference_session(source: str | bytes, options: Any) -> Any:
    """An onnxruntime session on the CPU for ``source`` (a path or a serialized model), or for a float64 model a
    :class:`ReferenceSession`.

    onnxruntime's CPU provider has no float64 convolution (it raises NOT_IMPLEMENTED); onnx's
    reference evaluator runs every standard op in float64, so that a float64 export is run,
    and verified, in float64 as written rather than in a lower precision.
    """
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except NoKernel:
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
        weights = {t.name for t in model.graph.initializer}
        inputs = [i.type.tensor_type.elem_type for i in model.graph.input if i.name not in weights]
        if onnx.TensorProto.DOUBLE not in inputs:
            raise
        return ReferenceSession(model)


class ReferenceSession:
    """onnx's reference evaluator (numpy, slower than onnxruntime) behind the calls of onnxruntime's
    InferenceSession that fcconv makes: ``run``, ``get_inputs``, ``get_outputs`` and ``get_modelmeta``."""

    engine = "onnx's reference evaluator"

    def __init__(self, model: onnx.ModelProto) -> None:
        weights = {t.name for t in model.graph.initializer}
        self._inputs = [_described(i) for i in model.graph.input if i.name not in weights]
        self._outputs = [_described(o) for o in model.graph.output]
        self._meta = SimpleNamespace(custom_metadata_map={e.key: e.value for e in model.metadata_props})
        self._evaluator = ReferenceEvaluator(model)

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs

    def get_modelmeta(self) -> Any:
        return self._meta

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._evaluator.run(names, dict(feeds)))


def _described(value: Any) -> SimpleNamespace:
    """A graph input or output as onnxruntime's NodeArg describes it: name, type, shape."""
    tensor_type = value.type.tensor_type
    kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return SimpleNamespace(name=value.name, type=f"tensor({kind})", shape=dims)
