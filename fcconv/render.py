"""Rich tables and lines for the command line; the numbers come from the library's dataclasses.

Each function returns what to print (a table, or lines of text), never prints it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # for the annotations only: rendering imports neither torch nor onnx
    from fcconv.check_result import CheckReport
    from fcconv.conversion import FactoredLayer
    from fcconv.heatmap import Peak, ScoreMap
    from fcconv.rewrite import Conversion
    from fcconv.verify import VerificationReport

ONNX_LINEAR = "Gemm or MatMul"  # what a Linear layer is in an ONNX graph


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
    """What ``inspect`` says besides the tables: outputs, the flatten's permutation, carried layers, cut points, capture.

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
    captured_by = getattr(conversion, "captured_by", None)
    if captured_by:
        lines.append(f"  captured by {captured_by}")
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


def low_rank_table(layers: list[FactoredLayer], deviation: list[dict[str, Any]]) -> Table:
    """``--rank``: each factored layer's rank, energy kept, weights and multiply-adds, then the deviation of the
    approximation from the original at each verification size."""
    before, after = sum(f.parameters for f in layers), sum(f.factored_parameters for f in layers)
    macs, factored_macs = sum(f.macs for f in layers), sum(f.factored_macs for f in layers)
    table = Table(
        title=f"Low-rank head, an approximation: {before:,} → {after:,} weights ({after / before:.1%}), "
        f"{macs:,} → {factored_macs:,} multiply-adds per position ({factored_macs / macs:.1%})",
        title_justify="left",
    )
    for column in ("layer", "rank", "energy kept", "weights", "multiply-adds"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for f in layers:
        table.add_row(
            escape(f.name), f"{f.rank} of {f.full_rank}", f"{f.energy:.2%}",
            f"{f.parameters:,} → {f.factored_parameters:,}", f"{f.macs:,} → {f.factored_macs:,}",
        )  # fmt: skip
    for row in deviation:
        agreement = row["top1_agreement"]
        same = f", same top class at {agreement:.1%} of positions" if agreement is not None else ""
        table.add_row(
            f"vs original at {_dims(row['input_size'])}", "", "", f"max abs {_sci(row['max_abs'])}",
            f"max rel {_sci(row['max_rel'])}{same}",
        )  # fmt: skip
    return table


def atrous_table(plan: Any) -> Table:
    """``--stride``: the output stride, the model's own, and each layer that lost its stride or was dilated."""
    unit = {1: "samples", 2: "pixels", 3: "voxels"}.get(len(plan.stride), "cells")
    table = Table(
        title=f"À trous: one score vector every {_dims(plan.stride)} {unit} (the model's own stride: "
        f"{_dims(plan.total)}); the model's own map is the subgrid of one position in {_dims(plan.dilation)}",
        title_justify="left",
    )
    for column in ("layer", "change", "before", "after"):
        table.add_column(column)
    for layer in plan.layers:
        table.add_row(escape(layer.name), layer.kind, escape(layer.before), escape(layer.after))
    if not plan.layers:
        table.add_row("(none)", f"the stride asked for is the model's own, {_dims(plan.total)}", "", "")
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
    native = f"native input {_dims(report.input_shape)}"
    if report.input_shape_source == "declared":  # a model without metadata: say that its graph gave the size
        native += ", as its input declares"
    table = Table(title=f"Check of {report.model} ({native})", title_justify="left")
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


def trunk_lines(conversion: Any, *, inspecting: bool = False, linear: str = "Linear layer") -> list[Any]:
    """What the rewrite found or changed outside the head: per-position Linear layers, size-generic functions.

    ``linear`` names the head's fully connected layers as the model spells them.
    """
    items: list[Any] = []
    if conversion.fully_convolutional:
        items.append(
            f"already fully convolutional: the head holds no {linear}, so only its flatten goes; "
            + ("it is exported" if inspecting else "exported")
            + " with free height and width"
        )
    if getattr(conversion, "trunk_layers", None):
        items.append(trunk_table(conversion))
        if any(layer.after.startswith("kept") for layer in conversion.trunk_layers):
            items.append(
                "  these act on each position already and do not stop the conversion; "
                "--pointwise makes them 1×1 convolutions"
            )
    items.extend(f"  trunk: {note}" for note in conversion.notes)
    return items


def onnx_head_lines(conversion: Any) -> list[str]:
    """The ONNX head beyond the table: the layout, each output's branch, the nodes carried per position, and what
    ``--until`` accepts."""
    lines = []
    if conversion.layout == "nhwc":
        lines.append("  layout: channels-last, kept: N×H×W×C in, each output (N, h, w, K)")
    for output in conversion.outputs:
        lines.append(f"  output {output.name} ({output.classes}): {' → '.join(output.nodes) or 'no head nodes'}")
    if conversion.carried:
        lines.append(f"  carried over to each position: {', '.join(conversion.carried)}")
    if conversion.geometry.logits:
        lines.append("  --logits: the outputs hold the raw scores (trailing softmax, log-softmax or sigmoid dropped)")
    if conversion.geometry.until:
        lines.append(f"  --until {conversion.geometry.until}: the output is that tensor's dense feature map")
    if conversion.until_names:
        lines.append(f"  --until accepts: {', '.join(conversion.until_names)}")
    return lines


def rewritten_lines(conversion: Any, title: str, *, onnx: bool, pool: str | None) -> list[Any]:
    """What ``convert`` shows once the head is rewritten: the table, the trunk, what was removed or appended."""
    items: list[Any] = [rewrite_table(conversion, title=title)] if conversion.layers else []
    items += trunk_lines(conversion, linear=ONNX_LINEAR if onnx else "Linear layer")
    items += [f"  removed: {item}" for item in conversion.removed]
    if onnx and (conversion.layout == "nhwc" or len(conversion.outputs) > 1):
        items += onnx_head_lines(conversion)
    if pool is not None:
        items.append(f"  appended: global {pool} pooling of the score map (output N×K at any size)")
    return items


def inspect_lines(conversion: Any, *, onnx: bool, pool: str | None) -> list[Any]:
    """What ``inspect`` shows: the head's table, the trunk, what a conversion removes, where each position reads."""
    items: list[Any] = [inspect_table(conversion)] if conversion.layers else []
    if getattr(conversion, "atrous", None) is not None:
        items.append(atrous_table(conversion.atrous))
    items += trunk_lines(conversion, inspecting=True, linear=ONNX_LINEAR if onnx else "Linear layer")
    items += [f"  removed on conversion: {item}" for item in conversion.removed]
    if onnx:
        items += onnx_head_lines(conversion)
    geometry = conversion.geometry
    reads = (
        "the whole feature map (global pooling kept)"
        if geometry.window is None
        else (
            f"a {_dims(geometry.window)} window of the {_dims(geometry.feature_shape)} "
            f"feature map, every {_dims(geometry.stride)} cells"
        )
    )
    items.append(f"  each output position reads {reads}")
    added = getattr(geometry, "added_axes", ())
    if added and pool is None:
        axes = " and ".join(str(2 + axis) for axis in added)
        items.append(
            f"  axis {axes} of the map (not an axis of the channel-free input) is squeezed from the output: "
            "N×K×positions along the input's length"
        )
    if pool is not None:
        items.append(f"  the score map is then {pool}-pooled over its positions: the output is N×K")
    return items


def placement_line(score_map: ScoreMap) -> str:
    """Where the map's positions lie on the picture, in one or two lines."""
    placement = score_map.placement
    rows, columns = score_map.probabilities.shape[1:]
    if not placement.sliding:
        return (
            f"map {rows}×{columns}: the model's map does not step like a sliding window,\n"
            f"  so its positions are drawn spread evenly, {placement.stride[1]:.3g}×{placement.stride[0]:.3g} pixels each"
        )
    (stride_y, stride_x), (window_y, window_x) = (map(int, placement.stride), map(int, placement.window))
    return (
        f"map {rows}×{columns}: one position per {window_x}×{window_y} window, every {stride_x}×{stride_y} pixels;\n"
        f"  position (i, j) reads rows {stride_y}i to {stride_y}i+{window_y - 1}, "
        f"columns {stride_x}j to {stride_x}j+{window_x - 1}"
    )


def dense_model_line(description: str, check: VerificationReport | None) -> str:
    """The heatmap's model in one line, with the error of the in-memory conversion at the native size."""
    if check is None:
        return description
    first = check.checks[0]
    return f"{description}; checked at the native {_dims(first.input_size)}: max rel {first.max_rel:.1e}"
