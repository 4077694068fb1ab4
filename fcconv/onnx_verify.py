"""Check a converted ONNX classifier against the ONNX model it came from, in onnxruntime.

The readings are those of :mod:`fcconv.verify`, computed from the input model's own
graph: at the native size its output; at every size the sliding-window reference,
its trunk run on the whole input and its head run on every window of the feature
map the trunk gives. The report and its table are the PyTorch path's.

A conversion with ``dense`` or ``pool`` is read as the PyTorch path reads it: a dense
map is the input model's head on each position of the trunk's map, a pooled output
the mean or maximum of the sliding-window map over its positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import onnx
import torch

from fcconv.onnx_rewrite import OnnxClassifier, OnnxConversion
from fcconv.outputs import like, named_outputs
from fcconv.readings import SlidingWindowHead
from fcconv.runtime import OnnxRunner
from fcconv.verify import (
    References,
    VerificationReport,
    compare_outputs,
    probe_input,
    reference_outputs,
)

__all__ = ["converted_runner", "onnx_probe_output", "onnx_reference_outputs", "verify_onnx"]


class _EachPositionHead:
    """The input model's head read at one position of the map: that position's features spread over a native-size
    map, which the head's global pooling gives back exactly (the mean or the maximum of equal values).

    The head runs at the very shapes it was exported for, so a Reshape of the chain
    fixed to the native size still holds.
    """

    def __init__(self, head: OnnxRunner, native: Sequence[int]) -> None:
        self.head, self.native = head, tuple(native)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.head(windows.expand(*windows.shape[:2], *self.native))


def _sliding_window(classifier: OnnxClassifier, conversion: OnnxConversion) -> SimpleNamespace:
    """What :class:`fcconv.readings.SlidingWindowHead` runs: the size-free trunk and the input model's own head."""
    geometry = conversion.geometry
    head = OnnxRunner(conversion.head)
    native_map = tuple(geometry.feature_shape[1:])
    if geometry.dense and geometry.window is not None and tuple(geometry.window) != native_map:
        head = _EachPositionHead(head, native_map)  # the global pooling dropped: the window is one position
    return SimpleNamespace(
        features=OnnxRunner(conversion.trunk, nhwc_input=classifier.layout == "nhwc"), head=head, geometry=geometry
    )


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
    return reference_outputs(
        OnnxRunner(classifier.model, nhwc_input=nhwc), classifier.input_shape, sizes=sizes, batch=batch, seed=seed,
        rtol=rtol, atol=atol, conversion=_sliding_window(classifier, conversion), on_size=on_size,
    )  # fmt: skip


@torch.inference_mode()
def onnx_probe_output(classifier: OnnxClassifier, conversion: OnnxConversion) -> torch.Tensor | dict:
    """What the converted model must answer on :func:`~fcconv.verify.probe_input`, channels-first, as the export
    records it for ``fcconv check``: the input model's own outputs as (1, K, 1, 1), or, for a dense or pooled
    conversion, the sliding-window reading (a dense map has positions at the native size already)."""
    runner = OnnxRunner(classifier.model, nhwc_input=classifier.layout == "nhwc")
    probe = probe_input(classifier.input_shape, runner.dtype)
    if conversion.geometry.dense or conversion.geometry.pool is not None:
        return SlidingWindowHead(_sliding_window(classifier, conversion))(probe)
    out = runner(probe)
    spatial = (1,) * (len(classifier.input_shape) - 1)
    return like(out, [value.reshape(*value.shape, *spatial) for _, value in named_outputs(out)])


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
    (N, K, 1, 1) (kept (N, K) when pooled; none for a dense map); at every size (default: :func:`fcconv.sizes.default_sizes`) it is
    the sliding-window reading: ``conversion.trunk`` on the whole input, then the
    input model's head on every window of the map. Every output is compared, a
    channels-last model's read channels-first. Returns the report; does not raise
    when the check fails.
    """
    references = onnx_reference_outputs(
        classifier, conversion, sizes=sizes, batch=batch, seed=seed, rtol=rtol, atol=atol
    )
    return compare_outputs(converted_runner(converted, conversion.layout), references)
