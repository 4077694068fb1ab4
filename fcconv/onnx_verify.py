"""Check a converted ONNX classifier against the ONNX model it came from, in onnxruntime.

The readings are those of :mod:`fcconv.verify`, computed from the input model's own
graph: at the native size its output; at every size the sliding-window reference,
its trunk run on the whole input and its head run on every window of the feature
map the trunk gives. The report and its table are the PyTorch path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch

from fcconv.errors import BadInputError
from fcconv.onnx_rewrite import OnnxClassifier, OnnxConversion
from fcconv.verify import References, VerificationReport, compare_outputs, reference_outputs

__all__ = ["OnnxReferences", "OnnxRunner", "compare_onnx_outputs", "onnx_reference_outputs", "verify_onnx"]

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


class OnnxRunner:
    """An ONNX model (in memory, or a file) run with onnxruntime on the CPU, called like a module on tensors.

    It takes and gives channels-first tensors whatever the model's layout, so that
    the comparison sees (N, C, H, W) inputs and (N, K, h, w) outputs: ``nhwc_input``
    transposes the input to N×H×W×C, ``nhwc_outputs`` every rank-4 output from
    (N, h, w, K) back. It returns the output ``output`` (an index), or else the one
    output, or a dict of all of them by name, in order, for a model with several.

    A model whose input has a fixed batch size (as most exports have) is run on
    pieces of exactly that size, the last one padded with zeros and cut back, so
    that any batch can be read through it.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        nhwc_input: bool = False,
        nhwc_outputs: bool = False,
        output: int | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure means the graph is not runnable
            text = " ".join(str(exc).split())[:200]
            raise BadInputError(f"onnxruntime cannot load the model: {text}") from exc
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = graph_input.shape[0] if graph_input.shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None
        self.dtype = _TORCH_DTYPES.get(graph_input.type, torch.float32)
        self.nhwc_input, self.nhwc_outputs, self.output = nhwc_input, nhwc_outputs, output

    def __call__(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        array = np.ascontiguousarray(x.detach().cpu().numpy())
        if self.nhwc_input:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
        outputs = [self._run(array, index) for index in self._indices()]
        if self.nhwc_outputs:
            outputs = [out.transpose(0, 3, 1, 2) if out.ndim == 4 else out for out in outputs]
        tensors = [torch.from_numpy(np.ascontiguousarray(out)) for out in outputs]
        if self.output is not None or len(tensors) == 1:
            return tensors[0]
        return dict(zip(self.output_names, tensors))

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


@dataclass
class OnnxReferences:
    """The input model's readings of the verification inputs, one :class:`~fcconv.verify.References` per output.

    One per output because :func:`fcconv.verify.reference_outputs` reads one output;
    ``outputs`` are the output names, in the model's order.
    """

    outputs: list[str]
    per_output: list[References]

    @property
    def cases(self) -> list:
        return [case for references in self.per_output for case in references.cases]


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
) -> OnnxReferences:
    """The random inputs of a verification and the input model's readings of them (see :func:`verify_onnx`).

    Every output is read on the same inputs (the same ``seed``).
    """
    nhwc = classifier.layout == "nhwc"
    names = classifier.output_names
    per_output = []
    for index in range(len(names)):
        original = OnnxRunner(classifier.model, nhwc_input=nhwc, output=index)
        sliding = SimpleNamespace(
            features=OnnxRunner(conversion.trunk, nhwc_input=nhwc),
            head=OnnxRunner(conversion.head, output=index),
            geometry=conversion.geometry,
        )
        per_output.append(
            reference_outputs(
                original,
                classifier.input_shape,
                sizes=sizes,
                batch=batch,
                seed=seed,
                rtol=rtol,
                atol=atol,
                conversion=sliding,
                on_size=on_size,
            )  # fmt: skip
        )
    return OnnxReferences(names, per_output)


def compare_onnx_outputs(
    converted: str | Path | onnx.ModelProto | Callable[[torch.Tensor], torch.Tensor],
    references: OnnxReferences,
    *,
    layout: str = "nchw",
    on_size: Callable[[tuple[int, ...]], None] | None = None,
) -> VerificationReport:
    """Run ``converted`` (an ONNX file or model of the given ``layout``, or a callable) on the reference inputs and
    compare every output.

    With several outputs each check's reading is prefixed with the output's name
    (``class_scores: sliding window``), and the checks are listed size by size.
    """
    several = len(references.outputs) > 1
    reports = []
    for index, (name, part) in enumerate(zip(references.outputs, references.per_output)):
        if callable(converted) and not isinstance(converted, (str, Path, onnx.ModelProto)):
            run = converted if not several else _one_output(converted, name)
        else:
            nhwc = layout == "nhwc"
            run = OnnxRunner(converted, nhwc_input=nhwc, nhwc_outputs=nhwc, output=index)
        report = compare_outputs(run, part, on_size=on_size)
        if several:
            report.checks = [replace(check, reference=f"{name}: {check.reference}") for check in report.checks]
        reports.append(report)
    merged = VerificationReport(rtol=reports[0].rtol, atol=reports[0].atol, dtype=reports[0].dtype)
    sizes = list(dict.fromkeys(check.input_size for report in reports for check in report.checks))
    for size in sizes:
        merged.checks.extend(check for report in reports for check in report.checks if check.input_size == size)
    return merged


def _one_output(run: Callable, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: run(x)[name]


def verify_onnx(
    classifier: OnnxClassifier,
    converted: str | Path | onnx.ModelProto | Callable[[torch.Tensor], torch.Tensor],
    conversion: OnnxConversion,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
) -> VerificationReport:
    """Compare ``converted`` (an ONNX file or model, or any callable) with the ONNX classifier it came from.

    At the native size the reference is the input model's own (N, K) output, as
    (N, K, 1, 1); at every size (default: :func:`fcconv.verify.default_sizes`) it is
    the sliding-window reading: ``conversion.trunk`` on the whole input, then the
    input model's head on every window of the map. Every output is compared, a
    channels-last model's read channels-first. Returns the report; does not raise
    when the check fails.
    """
    references = onnx_reference_outputs(
        classifier, conversion, sizes=sizes, batch=batch, seed=seed, rtol=rtol, atol=atol
    )
    return compare_onnx_outputs(converted, references, layout=conversion.layout)
