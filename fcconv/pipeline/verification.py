"""``verify_file`` and ``check_files``: an export compared with its original, or checked on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import check_pool, check_report_paths, parse_shape, parse_sizes
from fcconv.pipeline.events import Checked, Progress, Reporter
from fcconv.pipeline.input_shape import input_shape_explained
from fcconv.pipeline.onnx_input import is_onnx, onnx_references, refuse_for_onnx, rewrite_onnx_file
from fcconv.pipeline.results import VerifyResult
from fcconv.pipeline.steps import compare, load_checkpoint, references, release_memory, truncated


def verify_file(
    model: str | Path,
    reference: str | Path,
    *,
    arch: str | None = None,
    input_shape: str | None = None,
    dense: bool | None = None,
    pool: str | None = None,
    logits: bool | None = None,
    until: str | None = None,
    sizes: str | list[tuple[int, ...]] | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    device: str = "cpu",
    dtype: str | None = None,
    trust: bool = False,
    json_report: str | Path | None = None,
    junit_report: str | Path | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Compare ``model`` (what ``convert`` wrote: .onnx, .pt2 or .safetensors) with the original ``reference``,
    as ``fcconv verify`` does.

    How the model was converted (``dense``, ``pool``, ``logits``, ``until``, the input shape) defaults to what its
    metadata records. The reports are written on a pass and on a fail; the result's ``passed`` is the
    command's exit 0 or 1. Raises :class:`~fcconv.errors.BadInputError` (exit 2).
    """
    from fcconv.files import is_program_file, is_weights_file
    from fcconv.report import verification_document, write_report
    from fcconv.runtime import OnnxRunner
    from fcconv.torch_export import ProgramModel, read_weights_metadata

    sizes = parse_sizes(sizes) if isinstance(sizes, str) else sizes
    model, reference, report = Path(model), Path(reference), Reporter(progress)
    json_report, junit_report = (None if p is None else Path(p) for p in (json_report, junit_report))
    check_report_paths([model, reference], json_report, junit_report)
    weights_only = is_weights_file(model)
    if weights_only:
        exported, meta = None, read_weights_metadata(model)  # the module is rebuilt from the reference below
    else:
        exported = ProgramModel(model, trust=trust) if is_program_file(model) else OnnxRunner(model)
        meta = exported.metadata
    given = input_shape
    if input_shape is None and "fcconv.input_shape" in meta:
        input_shape = meta["fcconv.input_shape"]
    dense = meta.get("fcconv.dense", "false") == "true" if dense is None else dense
    pool = meta.get("fcconv.pool", "none") if pool is None else pool
    pool = None if pool == "none" else check_pool(pool)
    logits = meta.get("fcconv.logits", "false") == "true" if logits is None else logits
    until = (meta.get("fcconv.until") or None) if until is None else until
    if is_onnx(reference):
        if not isinstance(exported, OnnxRunner):
            raise BadInputError(f"{model} was written for PyTorch: its reference is a PyTorch checkpoint, not ONNX")
        refuse_for_onnx(arch=arch, device=device != "cpu", dtype=dtype, trust=trust)
        classifier, conversion = rewrite_onnx_file(reference, input_shape, report, logits, until, dense, pool, model)
        made = onnx_references(classifier, conversion, sizes, rtol, atol, report)
        native_shape = classifier.input_shape
        from fcconv.onnx_verify import converted_runner

        verification = compare(converted_runner(model, meta.get("fcconv.layout", "nchw")), made, report)
    else:
        from fcconv.low_rank import recorded_truncation
        from fcconv.metadata import LOW_RANK_KEY, STRIDE_KEY

        loaded = load_checkpoint(reference, arch, input_shape, trust, dtype, report)
        as_loaded = loaded.module
        # an export made with --rank is compared with the original whose factored layers are truncated alike
        with input_shape_explained(loaded, given), recorded_truncation(as_loaded, meta.get(LOW_RANK_KEY)):
            loaded = truncated(loaded, logits, until)
            stride = tuple(int(s) for s in meta[STRIDE_KEY].split(",")) if meta.get(STRIDE_KEY) else None
            made = references(loaded, dense, sizes, rtol, atol, device, report, pool=pool, stride=stride)
        native_shape = loaded.input_shape
        if weights_only:
            recorded = {**meta, "fcconv.dense": str(dense).lower(), "fcconv.pool": pool or "none"}
            exported = _rebuilt(as_loaded, native_shape, recorded, logits, until, model, reference, report)
            if isinstance(exported, str):
                return VerifyResult(model, reference, mismatch=exported)
        del loaded, as_loaded  # the model compared holds its own weights
        with report.stage("release"):
            release_memory()
        verification = compare(exported, made, report)
    write_report(verification_document(verification, model, reference, native_shape), json_report, junit_report)
    return VerifyResult(model, reference, verification)


def _rebuilt(as_loaded, native_shape, recorded, logits, until, model: Path, reference: Path, report) -> Any:
    """The converted module rebuilt from the original's layers and the .safetensors file; the reason as a string
    when the file's weights are another model's (a mismatch, not bad input)."""
    from fcconv.metadata import truncation_metadata
    from fcconv.torch_export import rebuild

    recorded = {**recorded, **truncation_metadata(logits, until)}
    with report.stage("rebuild", f"Rebuilding the converted module from {reference.name} and {model.name}…"):
        try:
            # the references are made: the original's layers can take the file's weights
            return rebuild(as_loaded, native_shape, recorded, model, consume_original=True)
        except BadInputError as exc:
            return str(exc)


def _kind(path: Path) -> str:
    """``onnx``, ``program`` or ``weights``: what ``check`` does with ``path``. A ``.onnx`` file is told by its
    name, so that checking it never imports torch."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    from fcconv.files import is_program_file, is_weights_file

    return "weights" if is_weights_file(path) else "program" if is_program_file(path) else "onnx"


def check_files(
    models: list[str | Path],
    *,
    input_shape: str | None = None,
    sizes: str | list[tuple[int, ...]] | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    reference: str | Path | None = None,
    arch: str | None = None,
    trust: bool = False,
    json_report: str | Path | None = None,
    junit_report: str | Path | None = None,
    progress: Progress | None = None,
) -> list[Any]:
    """Check exported models without the original, as ``fcconv check`` does; returns one
    :class:`~fcconv.check.CheckReport` per model (the command exits 1 when one has not ``passed``).

    ONNX files need neither torch nor the original. A .safetensors file is rebuilt from ``reference``
    (and ``arch``) to be run. The reports are written on a pass and on a fail. Raises
    :class:`~fcconv.errors.BadInputError` (exit 2).
    """
    from fcconv.report import check_document, write_report

    paths, report = [Path(m) for m in models], Reporter(progress)
    reference = None if reference is None else Path(reference)
    json_report, junit_report = (None if p is None else Path(p) for p in (json_report, junit_report))
    shape = parse_shape(input_shape)
    sizes = parse_sizes(sizes) if isinstance(sizes, str) else sizes
    check_report_paths([*paths, *([reference] if reference else [])], json_report, junit_report)
    kinds = [_kind(path) for path in paths]
    if (reference or arch) and "weights" not in kinds:
        raise BadInputError("--reference and --arch rebuild a .safetensors file; none was given")
    if arch and not reference:
        raise BadInputError("--arch names the architecture of --reference; give --reference too")
    original = load_checkpoint(reference, arch, input_shape, trust, None, report) if reference else None
    reports = []
    for path, kind in zip(paths, kinds):
        with report.stage("check", f"Checking {path}…") as advance:
            options = {"sizes": sizes, "rtol": rtol, "atol": atol, "on_step": lambda text: advance(0, text=text)}
            if kind == "weights":
                from fcconv.check_pytorch import check_weights

                checked = check_weights(path, shape, rebuilt_from=original, **options)
            elif kind == "program":
                from fcconv.check_pytorch import check_program

                checked = check_program(path, shape, trust=trust, **options)
            else:
                from fcconv.check import check_onnx

                checked = check_onnx(path, shape, **options)
        report(Checked(checked))
        reports.append(checked)
    write_report(check_document(reports), json_report, junit_report)
    return reports
