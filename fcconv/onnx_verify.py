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

import onnx
import torch

from fcconv.onnx_rewrite import OnnxClassifier, OnnxConversion
from fcconv.runtime import OnnxRunner
from fcconv.verify import References, VerificationReport, compare_outputs, reference_outputs

__all__ = ["converted_runner", "onnx_reference_outputs", "verify_onnx"]


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
    """The random inputs of a verification and the input model's readings of them, every output (see
    :func:`verify_onnx`)."""
    nhwc = classifier.layout == "nhwc"
    sliding = SimpleNamespace(
        features=OnnxRunner(conversion.trunk, nhwc_input=nhwc),
        head=OnnxRunner(conversion.head),
        geometry=conversion.geometry,
    )
    return reference_outputs(
        OnnxRunner(classifier.model, nhwc_input=nhwc), classifier.input_shape, sizes=sizes, batch=batch, seed=seed,
        rtol=rtol, atol=atol, conversion=sliding, on_size=on_size,
    )  # fmt: skip


def converted_runner(
    converted: str | Path | onnx.ModelProto | Callable[[torch.Tensor], torch.Tensor], layout: str = "nchw"
) -> Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]:
    """``converted`` as a callable on channels-first tensors: an ONNX file or model of ``layout`` in onnxruntime."""
    if isinstance(converted, (str, Path, onnx.ModelProto)):
        nhwc = layout == "nhwc"
        return OnnxRunner(converted, nhwc_input=nhwc, nhwc_outputs=nhwc)
    return converted


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
    (N, K, 1, 1); at every size (default: :func:`fcconv.sizes.default_sizes`) it is
    the sliding-window reading: ``conversion.trunk`` on the whole input, then the
    input model's head on every window of the map. Every output is compared, a
    channels-last model's read channels-first. Returns the report; does not raise
    when the check fails.
    """
    references = onnx_reference_outputs(
        classifier, conversion, sizes=sizes, batch=batch, seed=seed, rtol=rtol, atol=atol
    )
    return compare_outputs(converted_runner(converted, conversion.layout), references)
