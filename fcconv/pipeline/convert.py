"""``convert_file``: the staged, verified conversion of a checkpoint (or ONNX classifier) to ONNX, .pt2 or
.safetensors.

Order matters for peak memory: the original runs on the verification inputs while the
file is staged, then the PyTorch models are freed before the written file is read back
and compared; the file moves into place only when it matches.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import PYTORCH_SUFFIXES, check_pool, convert_target, parse_sizes
from fcconv.pipeline.events import HeadRewritten, Progress, Reporter, TrunkAtrous
from fcconv.pipeline.input_shape import input_shape_explained
from fcconv.pipeline.onnx_input import convert_onnx_file, is_onnx, refuse_for_onnx
from fcconv.pipeline.results import ConversionResult
from fcconv.pipeline.steps import (
    Mismatch,
    committed,
    compare,
    load_checkpoint,
    references_and_probe,
    release_memory,
)


def convert_file(
    model: str | Path,
    output: str | Path | None = None,
    *,
    arch: str | None = None,
    input_shape: str | None = None,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
    head_format: str = "conv",
    onnx_exporter: str = "auto",
    rank: str | float | None = None,
    stride: str | int | None = None,
    external_data: bool = False,
    sizes: str | list[tuple[int, ...]] | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    device: str = "cpu",
    dtype: str | None = None,
    trust: bool = False,
    progress: Progress | None = None,
) -> ConversionResult:
    """Rewrite ``model``'s fully connected head as convolutions, write ``output`` and verify it, as
    ``fcconv convert`` does.

    ``output`` is NAME.onnx (default NAME.fcn.onnx beside the model), NAME.pt2 (a torch.export program) or
    NAME.safetensors (the converted state_dict). ``onnx_exporter`` picks torch.onnx's exporter for ONNX output
    (:data:`fcconv.export.EXPORTERS`). ``rank`` (an integer, or a fraction of the energy) makes each fully
    connected layer two convolutions from its truncated SVD (:mod:`fcconv.low_rank`): an approximation, verified
    against the original with those weights truncated, its deviation from the original reported (the result's
    ``low_rank``). ``stride`` (a divisor of the model's total stride, one or one per axis) rewrites the trunk à
    trous (:mod:`fcconv.atrous`): one score vector every ``stride`` pixels, verified against the original's own
    layers read à trous. The file is written only when it matches the original: the result's ``written`` is False on
    a mismatch (the command's exit 1), and nothing is left behind.
    Raises :class:`~fcconv.errors.BadInputError` (exit 2) or :class:`~fcconv.errors.NotConvertibleError` (exit 3).
    ``progress`` receives :mod:`fcconv.pipeline.events` as the stages run.
    """
    from fcconv.export import EXPORTERS, HEAD_FORMATS

    model, report = Path(model), Reporter(progress)
    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"--head-format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    if onnx_exporter not in EXPORTERS:
        raise BadInputError(f"--onnx-exporter {onnx_exporter!r} is not one of {', '.join(EXPORTERS)}")
    check_pool(pool)
    from fcconv.low_rank import parse_rank

    rank = parse_rank(rank)
    from fcconv.atrous import parse_stride

    stride = None if stride is None else parse_stride(stride)
    if stride is not None and rank is not None:
        raise BadInputError("--stride cannot be combined with --rank: the factored head has no dilated form yet")
    sizes = parse_sizes(sizes) if isinstance(sizes, str) else sizes
    onnx_only = {"--head-format": head_format != "conv", "--onnx-exporter": onnx_exporter != "auto"}
    target = convert_target(model, None if output is None else Path(output), onnx_only, external_data)
    pytorch_out = target.suffix.lower() in PYTORCH_SUFFIXES
    if is_onnx(model):
        if pytorch_out:
            raise BadInputError(f"-o {target}: an ONNX classifier is converted to ONNX only; name the output NAME.onnx")
        refuse_for_onnx(
            arch=arch, pointwise=pointwise, head_format=head_format != "conv", onnx_exporter=onnx_exporter != "auto",
            device=device != "cpu", dtype=dtype, trust=trust, rank=rank is not None, stride=stride is not None,
        )  # fmt: skip
        return convert_onnx_file(
            model, target, input_shape, sizes, rtol, atol, external_data, logits, until, report, dense, pool
        )
    if rank is not None and target.suffix.lower() == ".safetensors":
        raise BadInputError(
            f"-o {target}: --rank writes ONNX or .pt2; a .safetensors state_dict is read back into the original's "
            "layers, which have no place for the factors"
        )
    if stride is not None and target.suffix.lower() == ".safetensors":
        raise BadInputError(
            f"-o {target}: --stride writes ONNX or .pt2; a .safetensors state_dict holds weights, not the strides "
            "and dilations of the rewritten layers"
        )
    rewriting = (arch, input_shape, dense, pool, pointwise, logits, until, dtype, trust, sizes, rank, stride)
    models = _rewritten(model, *rewriting, report)
    loaded = models["loaded"]
    with report.stage("hash", f"Reading {model.name} (its SHA-256 for the export's metadata)", 0, "bytes") as advance:
        from fcconv.files import file_sha256

        source_sha256 = file_sha256(loaded.path, on_progress=lambda done, size: advance(done, total=size))
    from fcconv.metadata import card_metadata, low_rank_metadata, stride_metadata

    metadata = {
        "fcconv.source_sha256": source_sha256,
        "fcconv.pointwise": str(pointwise).lower(),
        **({"fcconv.arch": loaded.arch} if pytorch_out else {}),
        **card_metadata(loaded.card),
        **low_rank_metadata(models["conversion"].factored),
        **stride_metadata(models["conversion"].atrous),
    }
    del loaded
    verifying = {"sizes": models.pop("sizes"), "rtol": rtol, "atol": atol, "device": device}
    if pytorch_out:
        return _convert_to_pytorch(models, target, metadata, verifying, report)
    exporting = {"head_format": head_format, "exporter": onnx_exporter, "external_data": external_data}
    return _convert_to_onnx(models, target, metadata, exporting, {**verifying, "dense": dense}, report)


def _rewritten(
    model, arch, input_shape, dense, pool, pointwise, logits, until, dtype, trust, sizes, rank, stride, report
) -> dict:
    """Load and rewrite ``model``; returns the models (``loaded``, ``as_loaded``, ``conversion``) in a dict the
    callee empties, so that it can free them before the written file is read back, and the verification ``sizes``."""
    from fcconv.rewrite import rewrite
    from fcconv.verify import refuse_sizes_beyond_memory, verification_sizes

    loaded = load_checkpoint(model, arch, input_shape, trust, dtype, report)
    with report.stage("rewrite", "Rewriting the head…"), input_shape_explained(loaded, input_shape):
        conversion = rewrite(
            loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until,
            stride=stride,
        )  # fmt: skip
    # with logits or until the model converted, and verified against, is the original ended there
    as_loaded, loaded.module = loaded.module, conversion.source
    if rank is not None:
        from fcconv.low_rank import factor_head

        with report.stage("factor", "Factoring the fully connected layers (SVD in float64)…"):
            factor_head(conversion, rank)
    # the export runs the model at the native size: refuse sizes that cannot be verified before it
    sizes = sizes or verification_sizes(conversion, loaded.input_shape, loaded.module)
    refuse_sizes_beyond_memory(conversion, loaded.input_shape, sizes, loaded.dtype)
    report(HeadRewritten(conversion, f"{model.name} ({loaded.arch}): rewritten layers", pool=pool))
    if conversion.atrous is not None:
        report(TrunkAtrous(conversion.atrous))
    return {"loaded": loaded, "as_loaded": as_loaded, "conversion": conversion, "sizes": sizes}


def _convert_to_onnx(
    models: dict, target: Path, metadata: dict, exporting: dict, verifying: dict, report: Reporter
) -> ConversionResult:
    """The conversion written as ONNX (``exporting``: the head format, the exporter and whether the weights stay
    external), staged with the weights in external data (which onnxruntime maps rather than copies), verified,
    then inlined unless ``exporting["external_data"]``."""
    from fcconv.export import export_onnx, inline_external_data
    from fcconv.external_data import external_data_path
    from fcconv.metadata import append_metadata, fcconv_metadata, probe_metadata
    from fcconv.staging import staged_onnx

    loaded, conversion = models.pop("loaded"), models.pop("conversion")
    del models["as_loaded"]
    try:
        with committed(staged_onnx(target), report) as staged:
            with report.stage("export", f"Exporting {target.name}", 0, "bytes") as advance, _exporter_fallback(report):
                export_onnx(
                    conversion.module, staged, loaded.input_shape, head_format=exporting["head_format"],
                    exporter=exporting["exporter"], metadata={**fcconv_metadata(), **metadata}, external_data=True,
                    on_progress=lambda done, total: advance(done, total=total),
                )  # fmt: skip
            made, probe, low_rank = references_and_probe(loaded, conversion, report, **verifying)
            append_metadata(staged, probe_metadata(probe))
            # The export holds its own copy of the weights: free the PyTorch models before it is loaded.
            del loaded, conversion
            with report.stage("release"):
                release_memory()
            verification = compare(staged, made, report)
            if not verification.passed:
                raise Mismatch
            if not exporting["external_data"]:
                inline_external_data(staged)
            data_file = external_data_path(staged).exists()
    except Mismatch:
        return ConversionResult(target, verification, written=False, low_rank=low_rank)
    data_path = external_data_path(target) if data_file else None
    return ConversionResult(target, verification, written=True, data_file=data_path, low_rank=low_rank)


@contextlib.contextmanager
def _exporter_fallback(report: Reporter) -> Iterator[None]:
    """Report the export's fallback to the TorchScript exporter (a :class:`~fcconv.errors.FcconvWarning`) as the
    pipeline's own warning, which the command shows; other warnings go on as they came."""
    from fcconv.errors import FcconvWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FcconvWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, FcconvWarning):
            report.warn(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _convert_to_pytorch(models: dict, target: Path, metadata: dict, verifying: dict, report: Reporter) -> Any:
    """``-o NAME.pt2`` or ``-o NAME.safetensors``: written beside the target, read back, verified, moved.

    The program is the converted module exported with free batch and spatial axes;
    the safetensors file its state_dict, verified by rebuilding the module from the
    original and loading the file into it, as a reader of the file does. ``models``
    holds ``loaded`` (``loaded.module`` the model converted), ``as_loaded`` (the model
    before ``logits``/``until`` ended it) and ``conversion``; it is emptied here,
    so that the models are freed before a program is read back beside them.
    """
    from fcconv.grid import probe_output_grid
    from fcconv.metadata import fcconv_metadata, output_channels_metadata, probe_metadata
    from fcconv.outputs import named_outputs
    from fcconv.staging import staged_onnx
    from fcconv.torch_export import ProgramModel, export_program, rebuild, save_program, save_weights

    loaded, as_loaded, conversion = models.pop("loaded"), models.pop("as_loaded"), models.pop("conversion")
    program = target.suffix.lower() == ".pt2"
    geometry = conversion.geometry
    if program:
        with report.stage("export", f"Exporting {target.name} with torch.export…"):
            exported = export_program(conversion.module, loaded.input_shape)
    made, probe, low_rank = references_and_probe(loaded, conversion, report, dense=geometry.dense, **verifying)
    grid = probe_output_grid(conversion.module, loaded.input_shape) if geometry.mode == "map" else None
    meta = {
        **fcconv_metadata(geometry, grid=grid),
        **output_channels_metadata({name: int(value.shape[1]) for name, value in named_outputs(probe)}),
        "fcconv.format": "pt2" if program else "state_dict",
        **metadata,
        **probe_metadata(probe),
    }
    try:
        with committed(staged_onnx(target), report) as staged:
            with report.stage("write", f"Writing {target.name}…"):
                if program:
                    save_program(exported, staged, meta)
                    del exported
                else:
                    save_weights(conversion.module, staged, meta)
            if program:
                del loaded, as_loaded, conversion  # the program holds its own copy of the weights
                with report.stage("release"):
                    release_memory()
                written = ProgramModel(staged)
            else:  # the references are made: the original's layers can take the file's weights
                written = rebuild(as_loaded, loaded.input_shape, meta, staged, consume_original=True)
                del loaded, as_loaded, conversion
                with report.stage("release"):
                    release_memory()
            verification = compare(written, made, report)
            if not verification.passed:
                raise Mismatch
    except Mismatch:
        return ConversionResult(target, verification, written=False, low_rank=low_rank)
    return ConversionResult(target, verification, written=True, low_rank=low_rank)
