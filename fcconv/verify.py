"""Check a converted model against the original, number by number.

Two readings of the original are compared with the converted model's output:

* at the native input size, the original's own (N, K) output;
* at any input size, the *sliding-window reference*: the original's feature part
  run on the whole input, and the original head applied to every window of that
  feature map that one output position reads (:class:`~fcconv.rewrite.HeadGeometry`).

Errors are measured against the reference's largest magnitude: a check passes
when ``max |converted - reference| <= atol + rtol * max |reference|``.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument
from torch import fx, nn

from fcconv import memory
from fcconv.capture import EXPORT
from fcconv.compare import DEFAULT_RTOL, RTOL_BY_DTYPE_NAME
from fcconv.errors import BadInputError
from fcconv.grid import _OutputShapes
from fcconv.metadata import probe_array
from fcconv.outputs import SINGLE_OUTPUT_NAME, like, named_outputs
from fcconv.readings import HEAD_CHUNK, SlidingWindowHead, atrous_reading, eager_map_reader
from fcconv.rewrite import Conversion, analyze, truncate
from fcconv.runtime import ONNXRUNTIME, OnnxRunner
from fcconv.sizes import batched_shape, default_sizes, spatial_size

__all__ = [
    "ReferenceCase",
    "References",
    "SizeCheck",
    "VerificationReport",
    "compare_outputs",
    "compare_reading",
    "default_sizes",
    "probe_input",
    "reference_outputs",
    "refuse_sizes_beyond_memory",
    "verification_sizes",
    "verify",
]

# Reduced precision rounds each product and partial sum; the defaults allow for it and are reported.
RTOL_BY_DTYPE = {getattr(torch, name): rtol for name, rtol in RTOL_BY_DTYPE_NAME.items()}
ATROUS = "à trous"
"""The reading of a ``--stride`` conversion: the original's own layers read à trous (:class:`AtrousReading`)."""
# What a model raises for an input size it cannot take (torch: RuntimeError; timm's checks: AssertionError).
SIZE_REFUSALS = (RuntimeError, ValueError, AssertionError, IndexError, OrtFail, OrtInvalidArgument)


@dataclass(frozen=True)
class SizeCheck:
    """The comparison at one input size. Relative errors are relative to ``scale``, the reference's largest magnitude."""

    input_size: tuple[int, ...]
    reference: str
    expected_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    scale: float
    worst: tuple[int, ...]
    tolerance: float
    passed: bool
    message: str = ""
    output: str = SINGLE_OUTPUT_NAME
    """Which of the model's outputs was compared (see :mod:`fcconv.outputs`)."""


@dataclass
class VerificationReport:
    """Every :class:`SizeCheck` of one verification, with the tolerances used."""

    checks: list[SizeCheck] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    atol: float = 0.0
    dtype: str = "float32"
    engine: str = ""
    """What ran the converted model where it was not onnxruntime or PyTorch: onnx's reference evaluator (float64)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def probe_input(input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed input of the native shape, batch 1, made by a formula rather than a random generator.

    An export records its original's output on this input (``fcconv.probe_output``),
    so that ``fcconv check`` can compare the export with the trained model without it:
    the same values on every machine and with every library version.
    """
    return torch.from_numpy(probe_array(input_shape, np.float64)).to(dtype)


def compare_reading(
    size: tuple[int, ...],
    reference: str,
    expected: torch.Tensor,
    actual: torch.Tensor,
    rtol: float,
    atol: float,
    output: str = SINGLE_OUTPUT_NAME,
) -> SizeCheck:
    """One reading of one output compared: passes when ``max |actual - expected| <= atol + rtol * max |expected|``."""
    expected, actual = expected.detach().double().cpu(), actual.detach().double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tolerance = atol + rtol * scale
    if tuple(actual.shape) != tuple(expected.shape):
        return SizeCheck(size, reference, tuple(expected.shape), tuple(actual.shape), math.inf, math.inf, math.inf,
                         math.inf, scale, (), tolerance, False, "output shape differs from the reference",
                         output)  # fmt: skip
    diff = (actual - expected).abs()
    finite = bool(torch.isfinite(diff).all())
    max_abs = float(diff.max()) if finite else math.inf
    mean_abs = float(diff.mean()) if finite else math.inf
    worst = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=math.inf).argmax(), diff.shape))
    denom = scale if scale > 0 else 1.0
    return SizeCheck(
        input_size=size,
        reference=reference,
        expected_shape=tuple(expected.shape),
        output_shape=tuple(actual.shape),
        max_abs=max_abs,
        mean_abs=mean_abs,
        max_rel=max_abs / denom,
        mean_rel=mean_abs / denom,
        scale=scale,
        worst=worst,
        tolerance=tolerance,
        passed=finite and max_abs <= tolerance,
        message="" if finite else "the output holds NaN or infinity",
        output=output,
    )


def _runner(
    converted: nn.Module | str | Path | Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(converted, (str, Path)):
        return OnnxRunner(converted)
    if isinstance(converted, nn.Module):
        converted.eval()
    return converted


@dataclass
class ReferenceCase:
    """One random input and what the original makes of it: by reading, each output's expected value."""

    input_size: tuple[int, ...]
    input: torch.Tensor
    expected: dict[str, dict[str, torch.Tensor]]
    """reading ('original', 'sliding window') → output name → tensor."""


@dataclass
class References:
    """Everything a comparison needs from the original, so that the original can be freed before the comparison."""

    cases: list[ReferenceCase]
    rtol: float
    atol: float
    dtype: torch.dtype
    device: torch.device
    subgrids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Readings compared with every n-th position of the output only, n per axis: with ``--stride``, the readings
    at the model's own stride (its map is the subgrid of the finer one)."""


@torch.inference_mode()
def reference_outputs(
    original: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int] = (3, 224, 224),
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    dense: bool = False,
    pool: str | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    device: str | torch.device = "cpu",
    conversion: Conversion | None = None,
    on_size: Callable[[tuple[int, ...]], None] | None = None,
    stride: int | tuple[int, ...] | None = None,
) -> References:
    """The random inputs of a verification and the original's readings of them (see :func:`verify`).

    At the native size the original's own output, reshaped to (N, K, 1, ...) (kept
    (N, K) when ``pool``), unless ``dense``; at every size :func:`sliding_window_reference`,
    pooled when ``pool`` is 'avg' or 'max'; for a model captured by torch.export whose head
    reads the whole map, the original's own output at every size too. A given
    ``conversion`` says how the model was converted, in place of ``dense`` and ``pool``.

    With ``stride`` (a conversion made with it), the original's readings at its own
    stride are compared with every (total / stride)-th position of the output, and the
    whole map with the original's layers read à trous (:class:`~fcconv.atrous.AtrousReading`).

    ``original`` may also be any callable on tensors with a ``dtype`` attribute (an
    ONNX model run in onnxruntime); ``conversion`` is then required, and needs only
    ``geometry`` and the ``features`` and ``head`` callables the sliding window runs.
    """
    input_shape = tuple(int(s) for s in input_shape)
    native = spatial_size(input_shape)
    sizes = [tuple(int(s) for s in size) for size in (sizes or [])]
    for size in sizes:
        if len(size) != len(native) or any(s < n for s, n in zip(size, native)):
            shown, smallest = "×".join(map(str, size)), "×".join(map(str, native))
            raise BadInputError(f"size {shown} is not a {len(native)}-axis size of at least the native {smallest}")
    device = _device(device)
    if isinstance(original, nn.Module):
        original.eval()
        if conversion is None:
            conversion = analyze(original, input_shape, dense=dense, pool=pool, stride=stride)
        original.to(device)
        params = [p for p in original.parameters() if p.is_floating_point()]
        dtype = params[0].dtype if params else torch.float32
    else:
        if conversion is None:
            raise TypeError("reference_outputs: an original that is not a module needs its conversion")
        dtype = getattr(original, "dtype", torch.float32)
    dense, pool = conversion.geometry.dense, conversion.geometry.pool
    sizes = sizes or verification_sizes(conversion, input_shape, original if isinstance(original, nn.Module) else None)
    refuse_sizes_beyond_memory(conversion, input_shape, sizes, dtype, batch)
    rtol = RTOL_BY_DTYPE.get(dtype, DEFAULT_RTOL) if rtol is None else rtol
    generator = torch.Generator().manual_seed(seed)
    references = References([], rtol, atol, dtype, device)
    eager_everywhere = _original_reads_every_size(original, conversion)
    eager_map = None
    if getattr(conversion, "captured_by", None) == EXPORT and not eager_everywhere:
        if isinstance(original, nn.Module) and not isinstance(original, fx.GraphModule):
            eager_map = eager_map_reader(original, conversion)
    atrous = getattr(conversion, "atrous", None)
    readings = {"original": "original", "sliding window": "sliding window"}
    if atrous is not None and atrous.changes:
        # the model's own readings at its own stride are every (total / stride)-th position of the finer map
        at = "×".join(map(str, atrous.total)) if len(set(atrous.total)) > 1 else str(atrous.total[0])
        readings = {key: f"{key} at stride {at}" for key in readings}
        references.subgrids = {name: atrous.dilation for name in readings.values()}
    with full_float32_precision():
        for size in sizes:
            if on_size is not None:
                on_size(size)
            x = torch.randn(batched_shape(input_shape, size, batch), generator=generator).to(dtype=dtype, device=device)
            # One sample at a time: each reading is per sample, and the activations of a
            # large input are the largest memory a conversion needs beside the weights.
            samples = x.split(1)
            expected = {}
            try:
                with _printed_unless_failing(failing_quietly=size != native):
                    if (size == native and not dense) or (size != native and eager_everywhere):
                        outputs = _concatenated([original(sample) for sample in samples])
                        expected[readings["original"]] = {
                            name: out if pool else out.reshape(*out.shape, *(1,) * len(native))
                            for name, out in outputs.items()
                        }
                    sliding = SlidingWindowHead(conversion, chunk=HEAD_CHUNK, features=eager_map)
                    expected[readings["sliding window"]] = _concatenated([sliding(s) for s in samples])
                    if references.subgrids:
                        expected[ATROUS] = _concatenated([atrous_reading(conversion)(s) for s in samples])
            except SIZE_REFUSALS as exc:
                if size == native:  # the model was traced at this size: not a size it refuses
                    raise
                raise BadInputError(_size_refused(size, exc)) from exc
            references.cases.append(ReferenceCase(size, x, expected))
    return references


def _size_refused(size: tuple[int, ...], exc: BaseException) -> str:
    """One line: the original cannot run at ``size``, with its complaint shortened."""
    complaint = " ".join(str(exc.__cause__ or exc).split()).split(" While executing")[0]
    shown = "×".join(map(str, size))
    return f"size {shown}: the original model cannot take it ({complaint[:200]}); verify at sizes it takes (--sizes)"


@contextlib.contextmanager
def _printed_unless_failing(failing_quietly: bool = True) -> Iterator[None]:
    """Hold back what the block prints on stderr, and pass it on unless the block raises and ``failing_quietly``.

    A traced module prints the lines of its generated code around the one that failed
    before raising; the caller reports the failure in one line.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        if not failing_quietly:
            sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())


def verification_sizes(
    conversion: Conversion | Any, input_shape: Sequence[int], original: nn.Module | None = None
) -> list[tuple[int, ...]]:
    """The sizes a verification runs at unless told: :func:`default_sizes` where the original's trunk takes them.

    A trunk that adds an upsampled map to a skip connection (DLA, HRNet) or folds space
    into channels (TResNet) takes only the native size plus whole steps; it is then
    verified at the native size plus multiples of the smallest step it takes, a multiple
    of its total stride (so that the sliding windows line up with its map). Which sizes
    it takes is found on shapes alone: the trunk's, which keeps the model's own checks
    of its input's size, and the ``original``'s where given and its head reads the whole
    map (an export drops those checks; timm's HaloNet asserts that its attention blocks
    tile the map). Where that cannot be told, the default sizes.
    """
    input_shape = tuple(int(s) for s in input_shape)
    sizes = default_sizes(input_shape)
    features = conversion.features
    if not isinstance(features, fx.GraphModule):  # an ONNX trunk
        return sizes
    trunk_shapes = _trunk_shapes(features, input_shape)
    # an original whose head reads the whole map takes every size its trunk takes; one that reads a window, none
    whole_map = getattr(conversion.geometry, "window", ()) is None
    original_output = _OutputShapes(original) if original is not None and whole_map else None

    def shapes(size: tuple[int, ...]) -> dict | None:
        if original_output is not None:
            from fcconv.fx_trunk import _fake_tensor_errors_unlogged

            with _fake_tensor_errors_unlogged():
                if original_output(batched_shape(input_shape, size, 1)[1:]) is None:
                    return None
        return trunk_shapes(size)

    native, double = sizes[0], tuple(2 * s for s in sizes[0])
    if all(shapes(size) is not None for size in reversed(sizes[1:])) or shapes(native) is None:
        return sizes
    stride = _total_stride(native, shapes(native), shapes(double) or {})
    tried = set()
    for factor in (2**k for k in range(5)):  # up to 16 times the total stride
        step = tuple(factor * s for s in stride)
        if step not in tried:
            tried.add(step)
            stepped = default_sizes(input_shape, step)
            if all(shapes(size) is not None for size in stepped[1:]):
                return stepped
    return sizes


def _total_stride(
    native: tuple[int, ...], at_native: dict[str, tuple[int, ...]], at_double: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """Per axis, the input pixels per cell of the trunk's coarsest map: of the maps that grow with the input."""
    stride = [1] * len(native)
    for name, small in at_native.items():
        large = at_double.get(name)
        if len(small) != len(native) + 2 or large is None or len(large) != len(small):
            continue
        if all(b > a > 0 for a, b in zip(small[2:], large[2:])):
            stride = [max(t, round(n / a)) for t, n, a in zip(stride, native, small[2:])]
    return tuple(stride)


def _trunk_shapes(features: fx.GraphModule, input_shape: tuple[int, ...]) -> Callable[[tuple[int, ...]], dict | None]:
    """The shapes of ``features``'s nodes on an input of a spatial size, found on fake tensors (shapes alone);
    None where the trunk refuses the size or fake tensors cannot tell."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fcconv.fx_trunk import _fake_tensor_errors_unlogged, _NodeShapes

    params = [p for p in features.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    seen: dict[tuple[int, ...], dict | None] = {}

    def shapes(size: tuple[int, ...]) -> dict | None:
        if size not in seen:
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            with fake_mode:
                sample = torch.empty(batched_shape(input_shape, size, 1), dtype=dtype, device=device)
            prop = _NodeShapes(features, fake_mode)
            try:
                with _fake_tensor_errors_unlogged(), torch.no_grad():
                    prop.run(sample)
                seen[size] = prop.shapes
            except Exception:  # noqa: BLE001 - a size the trunk refuses, or one fake tensors cannot tell
                seen[size] = None
        return seen[size]

    return shapes


def _original_reads_every_size(original: Any, conversion: Conversion) -> bool:
    """Whether the eager original is also the reference at the larger sizes.

    A trunk captured by torch.export may hold a value the export fixed at the native
    size, and the sliding window runs that same trunk; so where the head reads the whole
    map (a global pooling, no ``dense``) and therefore the eager original takes any size,
    its own output is compared at every size too.
    """
    if not isinstance(original, nn.Module) or isinstance(original, fx.GraphModule):
        return False
    if conversion.geometry.window is not None or conversion.geometry.dense:
        return False
    return getattr(conversion, "captured_by", None) == EXPORT


def refuse_sizes_beyond_memory(
    conversion: Conversion | Any,
    input_shape: Sequence[int],
    sizes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    batch: int = 2,
) -> None:
    """Raise :class:`BadInputError` before anything is allocated when verifying at ``sizes`` cannot fit in memory.

    ``conversion`` needs ``features`` (a traced module or an ``OnnxRunner``) and
    ``geometry``; the estimate is :func:`fcconv.memory.verification_bytes`.
    """
    geometry = conversion.geometry

    def needs(at: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], int]]:
        return memory.verification_bytes(
            conversion.features, input_shape, at, geometry.window, geometry.stride, batch, dtype.itemsize
        )

    at_sizes = needs(sizes)
    if at_sizes and at_sizes[-1][1] > memory.machine_memory():  # say so first where no size would do
        native = [spatial_size(input_shape)]
        memory.refuse_beyond_memory(needs(native), "verifying", "even the native size does not fit on this machine")
    memory.refuse_beyond_memory(at_sizes, "verifying", "verify at smaller sizes (--sizes)")


def _concatenated(per_sample: list[Any]) -> dict[str, torch.Tensor]:
    """Per-sample model outputs joined along the batch axis, by output name."""
    named = [named_outputs(value) for value in per_sample]
    return {name: torch.cat([sample[i][1] for sample in named]) for i, (name, _) in enumerate(named[0])}


@torch.inference_mode()
def compare_outputs(
    converted: nn.Module | str | Path | Callable[[torch.Tensor], torch.Tensor],
    references: References,
    on_size: Callable[[tuple[int, ...]], None] | None = None,
) -> VerificationReport:
    """Run ``converted`` (a module, an ONNX file or any callable) on each reference input and compare."""
    if isinstance(converted, nn.Module):
        converted.to(references.device)
    run = _runner(converted)
    rtol, atol = references.rtol, references.atol
    report = VerificationReport(rtol=rtol, atol=atol, dtype=str(references.dtype).removeprefix("torch."))
    if getattr(run, "engine", ONNXRUNTIME) != ONNXRUNTIME:
        report.engine = run.engine
    largest = max((math.prod(case.input_size) for case in references.cases), default=0)
    batch_checked = False  # whether a case has run the whole batch over more than one map position
    with full_float32_precision():
        for case in references.cases:
            if on_size is not None:
                on_size(case.input_size)
            one_at_a_time = batch_checked and math.prod(case.input_size) == largest
            try:
                with _printed_unless_failing():
                    actual = _sample_by_sample(run, case.input) if one_at_a_time else run(case.input)
            except Exception as exc:  # noqa: BLE001 - a model that fails at a size fails the check, with the reason
                text = " ".join(str(exc).split())[:300]
                report.checks.append(SizeCheck(case.input_size, "-", (), (), math.inf, math.inf, math.inf, math.inf,
                                               0.0, (), 0.0, False, f"the converted model failed: {text}"))  # fmt: skip
                continue
            produced = dict(named_outputs(actual))
            batch_checked = batch_checked or (
                len(case.input) > 1 and any(math.prod(value.shape[2:]) > 1 for value in produced.values())
            )
            graph_names = getattr(run, "output_names", None)
            if isinstance(actual, torch.Tensor) and isinstance(graph_names, list) and len(graph_names) == 1:
                # a runner of a one-output graph returns its tensor alone: the graph names it (a classifier's
                # single ModelOutput field, logits), where the original's outputs have that name
                if any(graph_names[0] in expected for expected in case.expected.values()):
                    produced = {graph_names[0]: actual}
            for reading, expected in case.expected.items():
                for name, value in expected.items():
                    if name not in produced:
                        report.checks.append(SizeCheck(case.input_size, reading, tuple(value.shape), (), math.inf,
                                                       math.inf, math.inf, math.inf, 0.0, (), 0.0, False,
                                                       f"the converted model has no output {name} "
                                                       f"(it has {', '.join(produced)})", name))  # fmt: skip
                        continue
                    value_produced = produced[name]
                    step = references.subgrids.get(reading)
                    if step is not None:
                        value_produced = value_produced[(Ellipsis, *(slice(None, None, n) for n in step))]
                    report.checks.append(
                        compare_reading(case.input_size, reading, value, value_produced, rtol, atol, name)
                    )
    return report


def _sample_by_sample(run: Callable[[torch.Tensor], Any], batch: torch.Tensor) -> Any:
    """``run`` on each sample of ``batch`` in turn, the outputs joined along the batch axis.

    The largest size's activations are the verification's peak memory; once a smaller size
    has run the whole batch over several positions (where a batch and a position axis in the
    wrong order would show), the largest runs its samples one at a time, holding half as much
    for the default batch of two.
    """
    parts = [run(batch[i : i + 1]) for i in range(len(batch))]
    return like(parts[0], list(_concatenated(parts).values()))  # in the container the runner gives


def verify(
    original: nn.Module,
    converted: nn.Module | str | Path | Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int] = (3, 224, 224),
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    dense: bool | None = None,
    pool: str | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    device: str | torch.device = "cpu",
    conversion: Conversion | None = None,
    on_size: Callable[[tuple[int, ...]], None] | None = None,
    stride: int | tuple[int, ...] | None = None,
) -> VerificationReport:
    """Compare ``converted`` (a module, an ONNX file or any callable) with ``original`` on random inputs.

    At the native size the reference is ``original``'s own output, reshaped to
    (N, K, 1, ...); at every size it is also :func:`sliding_window_reference`.
    ``sizes`` are spatial sizes (default: :func:`verification_sizes`); ``dense`` says how
    the model was converted (default: as recorded on ``converted``, else False), and
    so does ``pool`` ('avg' or 'max': the output is the pooled score map, (N, K)).
    A module converted with ``logits`` or ``until`` is compared with ``original``
    ended at the same point (:func:`~fcconv.rewrite.truncate`).
    ``stride`` says the model was converted with one (default: as recorded on ``converted``).
    ``rtol`` defaults to 1e-4 in float32 and to a looser bound in float16 and
    bfloat16 (``RTOL_BY_DTYPE``); the report states the one used. On CUDA
    (``device="cuda"``, the models are moved there) float32 runs with TF32 off,
    so that convolutions and GEMMs round as the CPU does.
    Returns a :class:`VerificationReport`; it does not raise when the check fails, and raises
    :class:`BadInputError` naming a size other than the native one the original cannot take.

    The same as :func:`reference_outputs` followed by :func:`compare_outputs`, which a
    caller that wants to free the original before running the converted model uses.
    """
    geometry = getattr(converted, "fcconv_geometry", None)
    if dense is None:
        dense = bool(getattr(geometry, "dense", False))
    if pool is None:
        pool = getattr(geometry, "pool", None)
    if stride is None:
        stride = getattr(converted, "fcconv_stride", None)
    logits, until = bool(getattr(geometry, "logits", False)), getattr(geometry, "until", None)
    if (logits or until) and conversion is None:
        # converted with --logits or --until: the reference is the original ended at the same point
        original = truncate(original, input_shape, logits=logits, until=until)
    references = reference_outputs(
        original, input_shape, sizes=sizes, dense=dense, pool=pool, batch=batch, seed=seed, rtol=rtol, atol=atol,
        device=device, conversion=conversion, on_size=on_size, stride=stride,
    )  # fmt: skip
    return compare_outputs(converted, references)


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"--device {device!r} is not a device like cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: CUDA is not available on this machine")
    return device


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """Turn TF32 off for CUDA convolutions and matmuls (cuDNN uses it by default), restoring the settings after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
