"""The conversion of a classifier exported to ONNX: its graph is rewritten, written and verified in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import parse_shape
from fcconv.pipeline.events import HeadRewritten, Reporter
from fcconv.pipeline.results import ConversionResult
from fcconv.pipeline.steps import Mismatch, committed, compare, release_memory


def is_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX model (by suffix or content); onnx is imported only when asked."""
    from fcconv.files import is_onnx_file

    return is_onnx_file(path)


def refuse_for_onnx(**given: Any) -> None:
    """Refuse the options that only mean something for a PyTorch model, naming the first one given."""
    for flag, value in given.items():
        if value:
            raise BadInputError(f"--{flag.replace('_', '-')} does not apply to an ONNX model")


def rewrite_onnx_file(
    path: Path, input_shape: str | None, report: Reporter, logits: bool = False, until: str | None = None,
    dense: bool = False, pool: str | None = None, target: Path | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """Read an ONNX classifier, cut it as ``logits``/``until`` ask, and rewrite its head (``dense``, ``pool``);
    returns the (cut) classifier and its conversion, whose ``warnings`` (also reported) name pads an exporter
    may have computed for one size; their advice names ``target``, the export."""
    from fcconv.onnx_graph.padding import baked_padding_warnings
    from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx, truncate_onnx_classifier

    shape = parse_shape(input_shape)
    with report.stage("load", f"Loading {path}…"):
        classifier = load_onnx_classifier(path, shape)
        classifier = truncate_onnx_classifier(classifier, logits=logits, until=until)
    with report.stage("rewrite", "Rewriting the head…"):
        conversion = rewrite_onnx(classifier, dense=dense, pool=pool)
    conversion.warnings = baked_padding_warnings(classifier, target.name if target is not None else "OUT.onnx")
    for warning in conversion.warnings:
        report.warn(warning)
    return classifier, conversion


def onnx_references(classifier: Any, conversion: Any, sizes, rtol, atol, report: Reporter) -> Any:
    """The input ONNX model's outputs on the verification inputs."""
    from fcconv.onnx_verify import onnx_reference_outputs
    from fcconv.verify import default_sizes

    sizes = sizes or default_sizes(classifier.input_shape)
    with report.per_size("references", "Running the original", "Running the original", len(sizes)) as on_size:
        return onnx_reference_outputs(classifier, conversion, sizes=sizes, rtol=rtol, atol=atol, on_size=on_size)


def convert_onnx_file(
    model: Path, target: Path, input_shape, sizes, rtol, atol, external_data: bool, logits: bool, until: str | None,
    report: Reporter, dense: bool = False, pool: str | None = None,
) -> ConversionResult:  # fmt: skip
    """``convert`` for a classifier exported to ONNX: the graph is rewritten, written and verified in onnxruntime."""
    from fcconv.external_data import external_data_path
    from fcconv.metadata import append_metadata, probe_metadata
    from fcconv.onnx_rewrite import write_onnx
    from fcconv.onnx_verify import converted_runner, onnx_probe_output
    from fcconv.staging import staged_onnx

    classifier, conversion = rewrite_onnx_file(model, input_shape, report, logits, until, dense, pool, target)
    warnings = conversion.warnings
    title = f"{model.name} (ONNX, opset {classifier.opset}): rewritten layers"
    report(HeadRewritten(conversion, title, onnx=True, pool=pool))
    try:
        with committed(staged_onnx(target), report) as staged:
            with report.stage("export", f"Writing {target.name}…"):
                write_onnx(conversion, staged, source=model, external_data=external_data or None)
            data_file = external_data_path(staged).exists()
            references = onnx_references(classifier, conversion, sizes, rtol, atol, report)
            append_metadata(staged, probe_metadata(onnx_probe_output(classifier, conversion)))
            layout = conversion.layout
            del classifier, conversion
            with report.stage("release"):
                release_memory()
            verification = compare(converted_runner(staged, layout), references, report)
            if not verification.passed:
                raise Mismatch
    except Mismatch:
        return ConversionResult(target, verification, written=False, warnings=warnings)
    data_path = external_data_path(target) if data_file else None
    return ConversionResult(target, verification, written=True, data_file=data_path, warnings=warnings)
