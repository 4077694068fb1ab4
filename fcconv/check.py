"""Check an exported ONNX model on its own, without the original: the gate a CI pipeline puts after an export.

:func:`check_onnx` runs these checks and returns them as plain data (:class:`CheckReport`):

* ``onnx checker``: ``onnx.checker`` with full, strict shape inference;
* ``free spatial axes``: the input's spatial axes have no fixed size;
* ``no collapse``: no node folds the spatial axes into an axis it then contracts
  with weights (a Flatten or Reshape before a Gemm, MatMul or Conv), decided from
  the shapes ONNX shape inference gives at the native size and at a larger one, not
  from the op types alone (fcconv's ``gemm`` head format reshapes windows into rows
  of a MatMul and is still fully convolutional);
* ``weights digest``: the initializers still hash to the ``fcconv.weights_sha256``
  recorded at export, naming the first one that changed;
* per input size, ``runs``: onnxruntime runs the model and every output is finite;
  and ``output size``: the output has the shape that the metadata's class count,
  total stride and receptive field predict.

A check that needs fcconv's metadata is reported as skipped on a model without it.
This module needs onnx, onnxruntime and numpy only: CI jobs that gate exports run it
without torch. The checks of a ``.pt2`` or ``.safetensors`` file, which need torch,
are in :mod:`fcconv.check_pytorch`.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fcconv.check_result import (
    CHECKS,
    DECLARED,
    FAIL,
    GIVEN,
    METADATA,
    PASS,
    SKIP,
    SOURCES,
    CheckReport,
    CheckResult,
)
from fcconv.check_structure import free_axes_check, no_collapse_check
from fcconv.compare import DEFAULT_RTOL, RTOL_BY_DTYPE_NAME, compare_arrays
from fcconv.errors import BadInputError
from fcconv.external_data import check_external_data
from fcconv.files import check_readable
from fcconv.memory import refuse_beyond_memory, run_bytes
from fcconv.metadata import (
    EACH_DIGEST_KEY,
    PROBE_OUTPUT_KEY,
    SPATIAL_AXIS_NAMES,
    WEIGHTS_DIGEST_KEY,
    OutputGrid,
    metadata_grid,
    metadata_input_shape,
    metadata_num_classes,
    parse_output_channels,
    probe_array,
    probe_keys,
    recorded_probe,
)
from fcconv.onnx_shapes import declared_dims
from fcconv.runtime import ONNXRUNTIME, OnnxRunner
from fcconv.sizes import batched_shape, check_tensor_size, default_sizes, parse_input_shape, spatial_size
from fcconv.weights_digest import EACH_DIGITS, WeightsDigest, onnx_weights_digest

__all__ = ["CHECKS", "SOURCES", "CheckReport", "CheckResult", "check_onnx", "metadata_grid", "onnx_native_shape"]

RECORDED_RTOL = 1e-7
"""The default rtol of ``reference output`` at least: above float32's rounding (2**-24) of the recorded values."""


def check_onnx(
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    on_step: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check the ONNX model at ``path`` without a reference; returns a :class:`CheckReport`, never raises on a failure.

    ``input_shape`` is the native (C, H, W) (default: the model's ``fcconv.input_shape``
    metadata, else the sizes its input declares where channels and spatial sizes are
    all fixed: such a model then fails ``free spatial axes``); ``sizes`` are the
    spatial sizes to run at (default: those ``fcconv verify`` uses,
    :func:`fcconv.sizes.default_sizes`). Raises
    :class:`~fcconv.errors.BadInputError` when the file is not an ONNX model, its
    external weights are missing, or no native size is known.

    ``reference output`` compares the model's output on :func:`fcconv.metadata.probe_array`
    with the original's, which the export records (``fcconv.probe_output``): it passes
    when ``max |output - recorded| <= atol + rtol * max |recorded|`` (``rtol`` default:
    what ``fcconv verify`` uses for the input's dtype).
    """
    path = Path(path)
    step = on_step or (lambda _: None)
    step("Reading the model…")
    model = _read_model(path)
    meta = {entry.key: entry.value for entry in model.metadata_props}
    input_name, input_dims = _data_input(model, path)
    channels_last = meta.get("fcconv.layout") == "nhwc"
    if channels_last:  # an N×H×W×C model (from a Keras-style ONNX classifier): read as N×C×H×W from here on
        input_dims = [*input_dims[:1], *input_dims[-1:], *input_dims[1:-1]]
    opens_nhwc = not channels_last and _opens_channels_last(model, input_name)
    input_shape, source = _native_shape(path, input_shape, meta, input_dims, input_name, opens_nhwc)
    given = bool(sizes)
    sizes = _check_sizes(sizes or default_sizes(input_shape), input_shape)
    input_type = next(i for i in model.graph.input if i.name == input_name).type.tensor_type.elem_type
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(input_type).itemsize
    refuse_runs_beyond_memory(model, input_shape, sizes, batch, itemsize, channels_last=channels_last)
    report = CheckReport(str(path), input_shape, input_shape_source=source)

    step("Checking the graph's shapes at two sizes…")
    report.results.append(free_axes_check(input_name, input_dims, input_shape))
    report.results.append(no_collapse_check(model, input_name, input_shape, channels_last))
    step("Hashing the weights…")
    report.results.append(_weights_digest(model, path, meta))
    del model  # the weights of an inline model: free them before the checker and onnxruntime read the file

    step("Running onnx.checker with full shape inference…")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        report.results.insert(0, CheckResult("onnx checker", PASS, "valid, with strict shape inference"))
    except Exception as exc:  # noqa: BLE001 - any checker or inference error fails this check, with its text
        report.results.insert(0, CheckResult("onnx checker", FAIL, _first_line(exc)))

    report.results.extend(
        _runs(path, input_shape, sizes, batch, seed, step, meta, report, atol, rtol, channels_last, given)
    )
    return report


def onnx_native_shape(path: str | Path, reader: str = "fcconv check") -> tuple[tuple[int, ...], str]:
    """The native (C, *spatial) shape of the ONNX model at ``path`` and where it came from (:data:`SOURCES`):
    its ``fcconv.input_shape`` metadata, else the fixed sizes its input declares, as :func:`check_onnx` finds
    them. Raises :class:`BadInputError` asking for --input-shape where neither tells; ``reader`` names the
    command in that line."""
    path = Path(path)
    model = _read_model(path)
    meta = {entry.key: entry.value for entry in model.metadata_props}
    input_name, input_dims = _data_input(model, path)
    if meta.get("fcconv.layout") == "nhwc":
        input_dims = [*input_dims[:1], *input_dims[-1:], *input_dims[1:-1]]
    opens_nhwc = meta.get("fcconv.layout") != "nhwc" and _opens_channels_last(model, input_name)
    return _native_shape(path, None, meta, input_dims, input_name, opens_nhwc, reader)


# --- reading the file -----------------------------------------------------------------------------


def _read_model(path: Path) -> Any:
    check_readable(path, "model")
    try:
        # Parsed from a memory map, not from a bytes copy of the file as onnx.load reads it: while the
        # weights of an inline model are parsed, the file's pages stay reclaimable page cache.
        model = onnx.ModelProto()
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            model.ParseFromString(memoryview(mapped))
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, the file is not ONNX
        raise BadInputError(f"{path} is not an ONNX model ({_first_line(exc)[:200]})") from None
    if not model.graph.node or not model.graph.output:
        raise BadInputError(f"{path} is not an ONNX model (no graph with nodes and outputs)")
    check_external_data(model, path)
    return model


def _data_input(model: Any, path: Path) -> tuple[str, list[int | str | None]]:
    """The name and dimensions of the graph's one input that is not an initializer.

    Plain values, not the protobuf message, which would keep the whole model (its weights too) alive.
    """
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise BadInputError(f"{path} takes {len(inputs)} inputs; fcconv check checks models with one input")
    return str(inputs[0].name), declared_dims(inputs[0])


def _native_shape(
    path: Path,
    given: Sequence[int] | None,
    meta: dict[str, str],
    dims: list[int | str | None],
    input_name: str = "",
    opens_nhwc: bool = False,
    reader: str = "fcconv check",
) -> tuple[tuple[int, ...], str]:
    """The native (C, *spatial) shape and where it came from (:data:`SOURCES`).

    ``given`` wins, then the ``fcconv.input_shape`` metadata, then the input's
    declared (N, C, *spatial) dimensions, when channels and every spatial size are
    fixed: a size is taken only where the graph declares it, never guessed.
    """
    if given is not None:
        shape, source = parse_input_shape(list(given)), GIVEN
    elif metadata_input_shape(meta) is not None:
        shape, source = metadata_input_shape(meta), METADATA
    else:
        shape, source = _declared_shape(path, dims, input_name, opens_nhwc, reader), DECLARED
    if dims and len(dims) != len(shape) + 1:
        raise BadInputError(
            f"{path} takes a rank-{len(dims)} input; input shape {','.join(map(str, shape))} is rank {len(shape) + 1}"
        )
    if len(shape) > 1 and len(dims) > 1 and isinstance(dims[1], int) and dims[1] and dims[1] != shape[0]:
        raise BadInputError(f"{path} takes {dims[1]} input channels, not {shape[0]}")
    return shape, source


def _declared_shape(
    path: Path, dims: list[int | str | None], input_name: str, opens_nhwc: bool, reader: str = "fcconv check"
) -> tuple[int, ...]:
    """(C, *spatial) from an input declared N×C×spatial with every one of them fixed; else ask for --input-shape.

    An input that a Transpose to N×C×H×W opens is N×H×W×C (a Keras or TensorFlow
    export): its second axis is no channel count, and check reads that layout from
    fcconv's ``fcconv.layout`` metadata only.
    """
    missing = "no fcconv metadata"
    if opens_nhwc:
        raise BadInputError(
            f"{path} does not record its native input size ({missing}) and its input {input_name!r} is N×H×W×C "
            f"(a Transpose to N×C×H×W opens the graph), which {reader} reads only from fcconv's metadata"
        )
    if 3 <= len(dims) <= 5:
        names = ("channels", *SPATIAL_AXIS_NAMES[len(dims) - 2])
        free = [name for name, dim in zip(names, dims[1:]) if not isinstance(dim, int)]
        if not free:
            shape = tuple(int(d) for d in dims[1:])
            check_tensor_size(shape, f"{path}'s declared input size {','.join(map(str, shape))}")
            return shape
        missing += f", and input {input_name!r} fixes no {' and '.join(free)}"
    elif input_name:
        missing += f", and input {input_name!r} declares no N×C×spatial shape"
    raise BadInputError(f"{path} does not record its native input size ({missing}); give --input-shape")


def _opens_channels_last(model: Any, input_name: str) -> bool:
    """The graph turns its input from N×H×W×C into N×C×H×W first, as Keras and TensorFlow exports begin."""
    return any(
        node.op_type == "Transpose"
        and node.input[0] == input_name
        and [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 3, 1, 2]]
        for node in model.graph.node
    )


def _check_sizes(sizes: Sequence[Sequence[int]], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    native = spatial_size(input_shape)
    out = [tuple(int(s) for s in size) for size in sizes]
    for size in out:
        if len(size) != len(native) or any(s < n for s, n in zip(size, native)):
            shown, smallest = "×".join(map(str, size)), "×".join(map(str, native))
            raise BadInputError(f"size {shown} is not a {len(native)}-axis size of at least the native {smallest}")
    return out


def refuse_runs_beyond_memory(
    model: Any, input_shape: tuple[int, ...], sizes: list[tuple[int, ...]], batch: int, itemsize: int, **options: Any
) -> None:
    """Raise :class:`BadInputError` before anything is allocated when running ``model`` at ``sizes`` cannot fit in
    memory (:func:`fcconv.memory.run_bytes`)."""
    needs = run_bytes(model, input_shape, sizes, batch, itemsize, **options)
    refuse_beyond_memory(needs, "checking", "check at smaller sizes (--sizes)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:300]


# --- weights ----------------------------------------------------------------------------------------


def _weights_digest(model: Any, path: Path, meta: dict[str, str]) -> CheckResult:
    """Recompute :mod:`fcconv.weights_digest` from the file and compare it with the export's."""
    expected = meta.get(WEIGHTS_DIGEST_KEY)
    if expected is None:
        return CheckResult("weights digest", SKIP, f"no {WEIGHTS_DIGEST_KEY} metadata to compare the weights with")
    return digest_verdict(onnx_weights_digest(model, path), meta, "initializers")


def digest_verdict(digest: WeightsDigest, meta: dict[str, str], kind: str = "initializers") -> CheckResult:
    """``weights digest``: ``digest`` against the one recorded in ``meta``, naming the first tensor that changed."""
    expected = meta.get(WEIGHTS_DIGEST_KEY)
    if expected is None:
        return CheckResult("weights digest", SKIP, f"no {WEIGHTS_DIGEST_KEY} metadata to compare the weights with")
    noun = kind.rstrip("s")
    actual = digest.hexdigest()
    if actual == expected:
        return CheckResult("weights digest", PASS, f"{len(digest.each)} {kind} hash to sha256 {actual[:16]}…")
    try:
        each = json.loads(meta.get(EACH_DIGEST_KEY, "{}"))
    except ValueError:
        each = {}
    each = each if isinstance(each, dict) else {}
    for name, value in digest.each.items():
        if name not in each:
            if each:
                return CheckResult("weights digest", FAIL, f"{noun} {name!r} was not in the export")
            break
        if value.hex()[:EACH_DIGITS] != each[name]:
            return CheckResult("weights digest", FAIL, f"{noun} {name!r} changed since export")
    missing = [name for name in each if name not in digest.each]
    if missing:
        return CheckResult("weights digest", FAIL, f"{noun} {missing[0]!r} is missing")
    return CheckResult("weights digest", FAIL, f"the {kind} do not hash to the {WEIGHTS_DIGEST_KEY} of the export")


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expectation:
    """The output shape the metadata predicts, or why it cannot predict one."""

    classes: int | None
    grid: OutputGrid | None
    pooled_to_vector: bool
    global_map: bool
    unknown: str = ""
    output_channels: dict[str, int] = field(default_factory=dict)
    """Each output's channel count, for a model with several outputs (``fcconv.output_channels``)."""

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> _Expectation:
        expectation = cls._from_metadata(meta)
        return replace(expectation, output_channels=parse_output_channels(meta))

    @classmethod
    def _from_metadata(cls, meta: dict[str, str]) -> _Expectation:
        classes = metadata_num_classes(meta)
        if "fcconv.mode" not in meta:
            return cls(classes, None, False, False, "no fcconv.mode metadata: the output size cannot be predicted")
        if meta["fcconv.mode"] not in ("map", "pooled"):
            return cls(classes, None, False, False, f"fcconv.mode {meta['fcconv.mode']!r} is neither map nor pooled")
        if meta["fcconv.mode"] == "pooled":
            return cls(classes, None, meta.get("fcconv.pool", "none") != "none", True)
        grid = metadata_grid(meta)
        if grid is None:
            unknown = "the metadata states the total stride and receptive field as unknown"
            return cls(classes, None, False, False, unknown)
        return cls(classes, grid, False, False)

    def shape(self, batch: int, size: tuple[int, ...], output: str | None = None) -> tuple[int | None, ...] | None:
        if self.unknown:
            return None
        classes = self.output_channels.get(output, self.classes) if output else self.classes
        if self.pooled_to_vector:
            return (batch, classes)
        spatial = (1,) * len(size) if self.global_map else self.grid.output_size(size)
        return (batch, classes, *spatial)


def _runs(
    path: Path,
    input_shape: tuple[int, ...],
    sizes: list[tuple[int, ...]],
    batch: int,
    seed: int,
    step: Callable[[str], None],
    meta: dict[str, str],
    report: CheckReport,
    atol: float,
    rtol: float | None,
    channels_last: bool = False,
    given: bool = True,
) -> list[CheckResult]:
    """Run the model in onnxruntime at each size (finite outputs of the predicted shape), then on the probe input.

    A channels-last model is given N×H×W×C inputs and its outputs are read channels-first. ``given``: the
    sizes are the user's (see :func:`run_checks`).
    """
    step("Loading the model in onnxruntime…")
    try:
        runner = OnnxRunner(path, nhwc_input=channels_last, nhwc_outputs=channels_last)
    except BadInputError as exc:
        message = f"onnxruntime cannot load it: {exc}"
        results = [r for size in sizes for r in (CheckResult("runs", FAIL, message, size), _size_skipped(size))]
        return [*results, CheckResult("reference output", SKIP, "the model did not load")]

    def run(x: np.ndarray) -> Any:
        return runner(x.astype(runner.numpy_dtype, copy=False))

    dtype = runner.numpy_dtype.name
    results = run_checks(
        run, dtype, input_shape, sizes, batch, seed, meta, report, atol, rtol, step, runner.engine, given=given
    )
    if runner.engine != ONNXRUNTIME:  # a float64 model: say what ran it
        results = [
            replace(r, message=f"{r.message}, run in {runner.engine}") if r.check == "runs" and r.passed else r
            for r in results
        ]
    return results


def run_checks(
    runner: Callable[[np.ndarray], Any],
    dtype: str,
    input_shape: tuple[int, ...],
    sizes: list[tuple[int, ...]],
    batch: int,
    seed: int,
    meta: dict[str, str],
    report: CheckReport,
    atol: float,
    rtol: float | None,
    step: Callable[[str], None],
    engine: str = "onnxruntime",
    *,
    given: bool = True,
) -> list[CheckResult]:
    """``runs`` and ``output size`` at each size, for every output, then ``reference output`` on the probe input.

    A model that runs at the native size but not at every other one may take only some
    sizes (a trunk that adds an upsampled map to a skip connection, as DLA and HRNet do,
    takes the native size plus whole multiples of its total stride): where it runs at
    the native size plus multiples of a step (:func:`stepped_sizes`), sizes that are not
    ``given`` (the defaults) are replaced by those, and a ``given`` size it cannot take
    is bad input (:class:`BadInputError` naming the size), not a failed run.

    ``runner`` takes a channels-first float array (it casts it to the model's ``dtype``,
    named as numpy or torch name it: ``float32``, ``bfloat16``) and gives a
    channels-first array, or a dict of them by output name; ``engine`` names what runs
    it in the messages of a failed run.
    """
    results = _size_checks(runner, input_shape, sizes, batch, seed, meta, step, engine)
    refused = [r.input_size for r in results if r.check == "runs" and not r.passed and r.actual_shape is None]
    if refused and input_shape[1:] not in refused:
        taken = stepped_sizes(runner, input_shape, meta)
        if taken is not None and given:
            shown, native = "×".join(map(str, refused[0])), "×".join(map(str, input_shape[1:]))
            runs = ",".join("x".join(map(str, size)) for size in taken)
            raise BadInputError(
                f"size {shown}: {report.model} cannot take it, it takes only some sizes (it runs at the native "
                f"{native} plus whole steps); give --sizes it takes, such as --sizes {runs}"
            )
        if taken is not None:
            results = _size_checks(runner, input_shape, taken, batch, seed, meta, step, engine)
            note = f"; it cannot take {'×'.join(map(str, refused[0]))}, so it runs at sizes whole steps apart"
            results = [
                replace(r, message=r.message + note) if r.check == "runs" and r.input_size != input_shape[1:] else r
                for r in results
            ]
    step("Comparing with the original's recorded output…")
    results.extend(_reference_output(runner, dtype, input_shape, meta, report, atol, rtol, engine))
    return results


def stepped_sizes(
    runner: Callable[[np.ndarray], Any], input_shape: tuple[int, ...], meta: dict[str, str]
) -> list[tuple[int, ...]] | None:
    """The sizes :func:`fcconv.sizes.default_sizes` gives for the smallest step the model takes, trying each
    power of two (times the total stride its metadata records, if any) up to 128; None where none runs or the
    native size does not.

    What :func:`fcconv.verify.verification_sizes` finds on the original's shapes, found here by running the
    model, a batch of one zero input at each candidate size.
    """
    grid = metadata_grid(meta)
    stride = grid.total_stride if grid is not None else (1,) * (len(input_shape) - 1)
    tried: dict[tuple[int, ...], bool] = {}

    def takes(size: tuple[int, ...]) -> bool:
        if size not in tried:
            try:
                runner(np.zeros((1, input_shape[0], *size), dtype=np.float32))
                tried[size] = True
            except Exception:  # noqa: BLE001 - any failure: the model does not take this size
                tried[size] = False
        return tried[size]

    if not takes(tuple(input_shape[1:])):
        return None
    steps = dict.fromkeys(tuple(math.lcm(2**k, s) for s in stride) for k in range(8))
    for step in steps:
        sizes = default_sizes(input_shape, step)
        if all(takes(size) for size in sizes[1:]):
            return sizes
    return None


def _size_checks(
    runner: Callable[[np.ndarray], Any],
    input_shape: tuple[int, ...],
    sizes: list[tuple[int, ...]],
    batch: int,
    seed: int,
    meta: dict[str, str],
    step: Callable[[str], None],
    engine: str,
) -> list[CheckResult]:
    """``runs`` and ``output size`` at each size, for every output."""
    expectation = _Expectation.from_metadata(meta)
    generator = np.random.default_rng(seed)
    results = []
    for size in sizes:
        step(f"Running at {'×'.join(map(str, size))}…")
        x = generator.standard_normal(batched_shape(input_shape, size, batch), dtype=np.float32)
        try:
            outputs = _named_arrays(runner(x))
        except Exception as exc:  # noqa: BLE001 - a model that fails at a size fails there, with the reason
            results += [CheckResult("runs", FAIL, f"{engine} failed: {_first_line(exc)}", size), _size_skipped(size)]
            continue
        several = len(outputs) > 1
        for output, out in outputs:
            named = output if several else None
            actual = tuple(int(s) for s in out.shape)
            finite = bool(np.isfinite(out).all())
            results.append(
                CheckResult(
                    "runs",
                    PASS if finite else FAIL,
                    "output finite" if finite else "the output holds NaN or infinity",
                    size,
                    actual_shape=actual,
                    output=named,
                )
            )
            expected = expectation.shape(batch, size, named)
            results.append(replace(_output_size(size, actual, expected, expectation), output=named))
    return results


def _named_arrays(value: Any) -> list[tuple[str | None, np.ndarray]]:
    """A runner's output as [(name, array)]: a dict by output name, or one array (named None)."""
    if isinstance(value, dict):
        return [(str(name), np.asarray(out)) for name, out in value.items()]
    return [(None, np.asarray(value))]


def _reference_output(
    runner: Any, dtype: str, input_shape: tuple[int, ...], meta: dict[str, str], report: CheckReport,
    atol: float, rtol: float | None, engine: str = "onnxruntime",
) -> list[CheckResult]:  # fmt: skip
    """The model on the probe input against the original's output recorded at export, one result per output."""
    name = "reference output"
    if PROBE_OUTPUT_KEY not in meta:
        return [CheckResult(name, SKIP, f"no {PROBE_OUTPUT_KEY} metadata: the original's output was not recorded")]
    # The recorded output is float32: a float64 model is compared no tighter than float32 rounds it.
    report.rtol = max(RTOL_BY_DTYPE_NAME.get(dtype, DEFAULT_RTOL), RECORDED_RTOL) if rtol is None else rtol
    report.atol, report.dtype = atol, dtype
    size = spatial_size(input_shape)
    try:
        # in float64: the runner rounds it to the model's dtype, as the export rounded it for the original
        outputs = _named_arrays(runner(probe_array(input_shape, np.float64)))
    except Exception as exc:  # noqa: BLE001 - a failed run fails this check, with the reason
        return [CheckResult(name, FAIL, f"{engine} failed: {_first_line(exc)}", size)]
    several = len(outputs) > 1
    return [
        _compare_with_recorded(out, meta, *probe_keys(i, output), size, report, atol, output if several else None)
        for i, (output, out) in enumerate(outputs)
    ]


def _compare_with_recorded(
    out: np.ndarray, meta: dict[str, str], shape_key: str, output_key: str, size: tuple[int, ...],
    report: CheckReport, atol: float, output: str | None,
) -> CheckResult:  # fmt: skip
    """One output on the probe input against the values recorded under ``output_key``."""
    name = "reference output"
    if output_key not in meta or shape_key not in meta:
        return CheckResult(
            name, SKIP, f"no {output_key} metadata: the original's output was not recorded", output=output
        )
    try:
        shape, recorded = recorded_probe(meta, shape_key, output_key)
    except ValueError:
        return CheckResult(name, FAIL, f"{output_key} is not what fcconv writes", output=output)
    actual_shape = tuple(int(d) for d in out.shape)
    if actual_shape != shape:
        got = "×".join(map(str, actual_shape))
        message = f"output {got}, recorded {'×'.join(map(str, shape))}"
        return CheckResult(name, FAIL, message, size, shape, actual_shape, output=output)
    c = compare_arrays(recorded, out.reshape(-1)[: recorded.size], report.rtol, atol)
    verdict = f"max abs {c.max_abs:.1e}, max rel {c.max_rel:.1e} {'<=' if c.passed else '>'} {report.rtol:g}"
    message = f"{verdict} on the fixed probe input ({recorded.size} values recorded at export)"
    return CheckResult(
        name, PASS if c.passed else FAIL, message, size, shape, actual_shape, c.max_abs, c.max_rel, c.tolerance, output
    )


def _output_size(
    size: tuple[int, ...],
    actual: tuple[int, ...],
    expected: tuple[int | None, ...] | None,
    expectation: _Expectation,
) -> CheckResult:
    if expected is None:
        return CheckResult("output size", SKIP, expectation.unknown, size, None, actual)
    matches = len(expected) == len(actual) and all(e is None or e == a for e, a in zip(expected, actual))
    shown = "×".join("?" if e is None else str(e) for e in expected)
    if expectation.grid is not None:
        how = (
            f"total stride {'×'.join(map(str, expectation.grid.total_stride))}, "
            f"receptive field {'×'.join(map(str, expectation.grid.receptive_field))}"
        )
    else:
        how = "pooled output"
    if matches:
        return CheckResult("output size", PASS, f"as predicted: {how}", size, expected, actual)
    got = "×".join(map(str, actual))
    return CheckResult("output size", FAIL, f"output {got}, predicted {shown} ({how})", size, expected, actual)


def _size_skipped(size: tuple[int, ...]) -> CheckResult:
    return CheckResult("output size", SKIP, "the model did not run at this size", size)
