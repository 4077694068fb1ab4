"""Rich tables for the command line; the numbers come from the library's dataclasses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from fcconv.check import CheckReport

if TYPE_CHECKING:  # torch-side types, named in annotations only: rendering a check needs no torch
    from fcconv.heatmap import Peak, ScoreMap
    from fcconv.rewrite import Conversion
    from fcconv.verify import VerificationReport


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def rewrite_table(conversion: Conversion, title: str = "Rewritten layers") -> Table:
    """Layer, before, after, kernel and parameters of every rewritten Linear."""
    table = Table(title=title, title_justify="left")
    for column in ("layer", "before", "after", "kernel"):
        table.add_column(column)
    table.add_column("parameters", justify="right")
    for layer in conversion.layers:
        after = layer.after + (f"  [dim]{layer.note}[/dim]" if layer.note else "")
        table.add_row(layer.name, layer.before, after, _dims(layer.kernel), f"{layer.parameters:,}")
    return table


def inspect_table(conversion: Conversion) -> Table:
    """Each Linear of the head, the map that feeds it, its convolution and its share of the parameters."""
    total = max(conversion.total_parameters, 1)
    table = Table(title="Fully connected head", title_justify="left")
    table.add_column("layer")
    table.add_column("feature map in")
    table.add_column("fully connected")
    table.add_column("convolution")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for layer in conversion.layers:
        table.add_row(
            layer.name,
            _dims(layer.in_map),
            layer.before,
            f"{layer.after}, kernel {_dims(layer.kernel)}",
            f"{layer.parameters:,}",
            f"{100 * layer.parameters / total:.1f}%",
        )
    share = 100 * conversion.head_parameters / total
    table.caption = f"head: {conversion.head_parameters:,} of {conversion.total_parameters:,} parameters ({share:.1f}%)"
    return table


def head_lines(conversion: Conversion) -> list[str]:
    """What ``inspect`` says besides the tables: outputs, the flatten's permutation, carried layers, cut points.

    Read with ``getattr`` so that a conversion of an ONNX graph, which records fewer of these, prints what it has.
    """
    lines = []
    branches = getattr(conversion, "branches", [])
    if len(branches) > 1 or any(layers for _, layers in branches):
        lines.append(f"  outputs ({len(branches)}):")
        lines += [f"    {name} ← {' → '.join(layers) or '(no head layer)'}" for name, layers in branches]
    permutation = getattr(conversion, "flatten_permutation", None)
    if permutation is not None:
        first = conversion.layers[0].name if conversion.layers else "the first Linear"
        lines.append(
            f"  the flatten read the map permuted by ({', '.join(map(str, permutation))}); "
            f"{first}'s kernel is re-ordered to read it in (C, *S) order, and the permutation is gone"
        )
    for carried in getattr(conversion, "carried", []):
        lines.append(f"  carried per position: {carried}")
    geometry = conversion.geometry
    if getattr(geometry, "logits", False):
        lines.append("  --logits: the outputs hold the raw scores (trailing softmax, log-softmax or sigmoid dropped)")
    if getattr(geometry, "until", None):
        lines.append(f"  --until {geometry.until}: the output is that layer's dense feature map")
    cut_points = getattr(conversion, "cut_points", [])
    if cut_points:
        lines.append(f"  --until accepts: {', '.join(cut_points)}")
    return lines


def trunk_table(conversion: Conversion) -> Table:
    """The Linear layers of the trunk that act on each position: squeeze-and-excitation gates, channels-last MLPs."""
    table = Table(title="Per-position Linear layers in the trunk", title_justify="left")
    for column in ("layer", "feature map in", "fully connected", "becomes", "how"):
        table.add_column(column)
    table.add_column("parameters", justify="right")
    for layer in conversion.trunk_layers:
        table.add_row(layer.name, _dims(layer.in_map), layer.before, layer.after, layer.note, f"{layer.parameters:,}")
    return table


def _sci(value: float) -> str:
    return f"{value:.1e}"


def verification_table(report: VerificationReport) -> Table:
    """One row per input size and reference: errors, tolerance, worst element and verdict."""
    engine = f", run in {report.engine}" if report.engine else ""
    table = Table(
        title=f"Verification (rtol {report.rtol:g}, atol {report.atol:g}, {report.dtype}{engine})", title_justify="left"
    )
    several = len({check.output for check in report.checks}) > 1
    for column in ("input", "reference", *(("output",) if several else ()), "shape"):
        table.add_column(column)
    for column in ("max abs", "mean abs", "max rel", "mean rel"):
        table.add_column(column, justify="right")
    table.add_column("worst at")
    table.add_column("result")
    for check in report.checks:
        verdict = "[green]ok[/green]" if check.passed else f"[red]FAIL[/red] {escape(check.message)}".rstrip()
        table.add_row(
            _dims(check.input_size),
            check.reference,
            *((escape(check.output),) if several else ()),
            _dims(check.output_shape),
            _sci(check.max_abs),
            _sci(check.mean_abs),
            _sci(check.max_rel),
            _sci(check.mean_rel),
            str(check.worst) if check.worst else "-",
            verdict,
        )
    return table


def peaks_table(score_map: ScoreMap, peaks: list[Peak]) -> Table:
    """Each drawn class: where it is most probable (map position, window, window centre) and how probable."""
    table = Table(title="Classes drawn", title_justify="left")
    table.add_column("class")
    table.add_column("peak", justify="right")
    table.add_column("at position")
    table.add_column("window (x, y)")
    table.add_column("centre (x, y)")
    for peak in peaks:
        top, left, bottom, right = score_map.placement.window_at(*peak.position)
        table.add_row(
            peak.name,
            f"{peak.probability:.3f}",
            f"({peak.position[0]}, {peak.position[1]})",
            f"{left:g}–{right - 1:g}, {top:g}–{bottom - 1:g}",
            f"{peak.centre[1]:g}, {peak.centre[0]:g}",
        )
    return table


def check_table(report: CheckReport) -> Table:
    """One row per check of ``fcconv check`` (per input size for the runs): shapes, verdict and why."""
    table = Table(title=f"Check of {report.model} (native input {_dims(report.input_shape)})", title_justify="left")
    several = any(result.output for result in report.results)
    for column in ("check", "input", *(("output",) if several else ()), "expected", "shape", "result", "details"):
        table.add_column(column)
    verdicts = {"pass": "[green]ok[/green]", "fail": "[red]FAIL[/red]", "skip": "[yellow]skipped[/yellow]"}
    for result in report.results:
        expected = result.expected_shape
        table.add_row(
            result.check,
            _dims(result.input_size) if result.input_size else "",
            *((escape(result.output or ""),) if several else ()),
            "×".join("?" if d is None else str(d) for d in expected) if expected else "",
            _dims(result.actual_shape) if result.actual_shape else "",
            verdicts[result.verdict],
            escape(result.message),
        )
    return table
