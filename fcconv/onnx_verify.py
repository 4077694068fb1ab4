"""Check a converted ONNX classifier against the ONNX model it came from, in onnxruntime.

The readings are those of :mod:`fcconv.verify`, computed from the input model's own
graph: at the native size its output; at every size the sliding-window reference,
its trunk run on the whole input and its head run on every window of the feature
map the trunk gives. The report and its table are the PyTorch path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import TensorProto

from fcconv.errors import BadInputError
from fcconv.onnx_rewrite import OnnxClassifier, OnnxConversion
from fcconv.verify import References, VerificationReport, compare_outputs, reference_outputs

__all__ = ["OnnxRunner", "onnx_reference_outputs", "verify_onnx"]

_TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.DOUBLE: torch.float64,
}


class OnnxRunner:
    """An in-memory ONNX model run with onnxruntime on the CPU, called like a module on tensors.

    A model whose input has a fixed batch size (as most exports have) is run on
    pieces of exactly that size, the last one padded with zeros and cut back, so
    that any batch can be read through it.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure means the graph is not runnable
            text = " ".join(str(exc).split())[:200]
            raise BadInputError(f"onnxruntime cannot load the model: {text}") from exc
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        first = graph_input.shape[0] if graph_input.shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None
        self.dtype = _TORCH_DTYPES.get(model.graph.input[0].type.tensor_type.elem_type, torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy())
        if self.batch is None or len(array) == self.batch:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        pieces = []
        for start in range(0, len(array), self.batch):
            piece = array[start : start + self.batch]
            short = self.batch - len(piece)
            if short:
                piece = np.concatenate([piece, np.zeros((short, *piece.shape[1:]), piece.dtype)])
            out = self.session.run(None, {self.input_name: piece})[0]
            pieces.append(out[: len(out) - short])
        return torch.from_numpy(np.concatenate(pieces))


def onnx_reference_outputs(
    classifier: OnnxClassifier,
    conversion: OnnxConversion,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    on_size: Callable[[tuple[int, ...]], None] | None = None,
) -> References:
    """The random inputs of a verification and the input model's readings of them (see :func:`verify_onnx`)."""
    original = OnnxRunner(classifier.model)
    sliding = SimpleNamespace(
        features=OnnxRunner(conversion.trunk), head=OnnxRunner(conversion.head), geometry=conversion.geometry
    )
    return reference_outputs(
        original, classifier.input_shape, sizes=sizes, batch=batch, seed=seed, rtol=rtol, atol=atol,
        conversion=sliding, on_size=on_size,
    )  # fmt: skip


def verify_onnx(
    classifier: OnnxClassifier,
    converted: str | Path | Callable[[torch.Tensor], torch.Tensor],
    conversion: OnnxConversion,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
) -> VerificationReport:
    """Compare ``converted`` (an ONNX file, or any callable) with the ONNX classifier it came from.

    At the native size the reference is the input model's own (N, K) output, as
    (N, K, 1, 1); at every size (default: :func:`fcconv.verify.default_sizes`) it is
    the sliding-window reading: ``conversion.trunk`` on the whole input, then the
    input model's head on every window of the map. Returns the report; does not raise
    when the check fails.
    """
    references = onnx_reference_outputs(
        classifier, conversion, sizes=sizes, batch=batch, seed=seed, rtol=rtol, atol=atol
    )
    return compare_outputs(converted, references)
