"""The ``fcconv`` command: each command parses its flags, calls the pipeline once and renders the result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fcconv import __version__
from fcconv.cli.options import (
    ArchOption,
    AtolOption,
    CheckpointArgument,
    ClassOption,
    DebugOption,
    DenseAsConvertedOption,
    DenseOption,
    DeviceOption,
    DtypeOption,
    ExportArgument,
    ExportsArgument,
    ExternalDataOption,
    HeadFormatOption,
    HeatmapModelArgument,
    ImageArgument,
    InputShapeOption,
    JsonOption,
    JunitOption,
    LogitsAsConvertedOption,
    LogitsOption,
    MapInputArgument,
    MapModelArgument,
    MapOutputOption,
    OnnxExporterOption,
    OriginalOption,
    OutputOption,
    PngOption,
    PointwiseOption,
    PoolAsConvertedOption,
    PoolOption,
    QuietOption,
    RankOption,
    RebuildFromOption,
    RecordedShapeOption,
    RtolOption,
    SaveMapOption,
    SchedulerOption,
    SizesOption,
    StrideOption,
    TileOption,
    TopOption,
    TrustOption,
    UntilAsConvertedOption,
    UntilOption,
    WorkersOption,
)
from fcconv.cli.render import (
    COMMAND_LINE_ERROR,
    EXIT_BAD_INPUT,
    Command,
    Group,
    console,
    error_console,
    fail,
    handle_errors,
    one_line,
    screen,
)
from fcconv.pipeline import check_files, convert_file, heatmap_file, inspect_file, map_file, verify_file
from fcconv.render import head_lines, inspect_lines, verification_table

app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Markdown: a docstring's paragraphs are re-flowed to the terminal and ``code`` is shown as code
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn a trained classifier's fully connected head into convolutions, verify it, export ONNX.",
)


@app.command(cls=Command)
@handle_errors
def convert(
    model: CheckpointArgument,
    output: OutputOption = None,
    head_format: HeadFormatOption = "conv",
    onnx_exporter: OnnxExporterOption = "auto",
    external_data: ExternalDataOption = False,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    rank: RankOption = None,
    stride: StrideOption = None,
    logits: LogitsOption = False,
    until: UntilOption = None,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    device: DeviceOption = "cpu",
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Rewrite MODEL's fully connected head as convolutions, export ONNX and verify the export.

    The file is written only when it matches the original (exit 0); on a mismatch
    nothing is written and the exit code is 1. `-o NAME.pt2` writes a torch.export
    program with free batch and spatial axes, `-o NAME.safetensors` the converted
    module's state_dict, each with the same metadata as the ONNX export. An ONNX
    classifier is rewritten on its graph and verified against itself in onnxruntime.
    """
    with screen.shown() as progress:
        result = convert_file(
            model, output, arch=arch, input_shape=input_shape, dense=dense, pool=pool, pointwise=pointwise,
            logits=logits, until=until, head_format=head_format, onnx_exporter=onnx_exporter, external_data=external_data,
            rank=rank, stride=stride, sizes=sizes, rtol=rtol, atol=atol, device=device, dtype=dtype, trust=trust, progress=progress,
        )  # fmt: skip
    if not result.written:
        fail(f"fcconv: verification failed; {result.target} was not written")
    weights = f" (weights in {result.data_file.name})" if result.data_file else ""
    console.print(f"wrote {result.target}{weights}", markup=False, soft_wrap=True)


@app.command(cls=Command)
@handle_errors
def verify(
    onnx_model: ExportArgument,
    reference: OriginalOption,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseAsConvertedOption = None,
    pool: PoolAsConvertedOption = None,
    logits: LogitsAsConvertedOption = None,
    until: UntilAsConvertedOption = None,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    json_report: JsonOption = None,
    junit_report: JunitOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Re-check an exported model against the original: exit 0 when equivalent, 1 when not.

    --json and --junit reports are written on a pass and on a fail, never on bad input (exit 2).
    """
    with screen.shown() as progress:
        result = verify_file(
            onnx_model, reference, arch=arch, input_shape=input_shape, dense=dense, pool=pool, logits=logits,
            until=until, sizes=sizes, rtol=rtol, atol=atol, device=device, dtype=dtype, trust=trust,
            json_report=json_report, junit_report=junit_report, progress=progress,
        )  # fmt: skip
    mismatch = [f"fcconv: {one_line(result.mismatch)}"] if result.mismatch else []
    if not result.passed:
        fail(*mismatch, f"fcconv: {onnx_model} does not match {reference}")
    console.print(f"{onnx_model} matches {reference}", markup=False, soft_wrap=True)


@app.command(cls=Command)
@handle_errors
def check(
    onnx_models: ExportsArgument,
    input_shape: RecordedShapeOption = None,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    reference: RebuildFromOption = None,
    arch: ArchOption = None,
    trust: TrustOption = False,
    json_report: JsonOption = None,
    junit_report: JunitOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Check exported ONNX models without the original: exit 0 when every check passes, 1 when one fails.

    Each model must pass onnx.checker with full shape inference, have free spatial
    axes, fold no spatial axis into features, still hold the weights it was exported
    with, run in onnxruntime at every size with the output size its total stride
    and receptive field predict, and give the original's output, which the export
    records, on a fixed input (--rtol, --atol). Checks that need fcconv's metadata are skipped on
    other models, whose native size is --input-shape or the fixed size their input declares.

    A .pt2 program gets the checks that apply to it: free spatial axes (its range
    constraints), weights digest, the runs, output sizes and reference output. A
    .safetensors file gets the weights digest; the checks that run the model are
    skipped unless --reference (and --arch) rebuild the module to run them.
    """
    with screen.shown() as progress:
        reports = check_files(
            onnx_models, input_shape=input_shape, sizes=sizes, rtol=rtol, atol=atol, reference=reference, arch=arch,
            trust=trust, json_report=json_report, junit_report=junit_report, progress=progress,
        )  # fmt: skip
    failed = [report for report in reports if not report.passed]
    for report in failed:
        names = sorted({r.check for r in report.failures}, key=[r.check for r in report.results].index)
        error_console.print(f"fcconv: {report.model} failed: {', '.join(names)}", markup=False)
    if failed:
        fail()
    for report in reports:
        skipped = sum(r.verdict == "skip" for r in report.results)
        note = f" ({skipped} checks skipped)" if skipped else ""
        console.print(f"{report.model} passed{note}", markup=False, soft_wrap=True)


@app.command(cls=Command)
@handle_errors
def inspect(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint to inspect.", readable=False)],
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    stride: StrideOption = None,
    logits: LogitsOption = False,
    until: UntilOption = None,
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Show the fully connected head: each Linear, the map that feeds it, its convolution and its parameter share.

    Also each output and the head layers on its path, a permutation the flatten read
    the map through, the per-feature layers carried to every position, and the layers
    --until accepts; with --stride, the layers the à-trous rewrite changes.
    """
    with screen.shown() as progress:
        result = inspect_file(
            model, arch=arch, input_shape=input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits,
            until=until, stride=stride, dtype=dtype, trust=trust, progress=progress,
        )  # fmt: skip
    for item in inspect_lines(result.conversion, onnx=result.onnx, pool=result.pool):
        console.print(item, markup=False) if isinstance(item, str) else console.print(item)
    for line in [] if result.onnx else head_lines(result.conversion):
        console.print(line, markup=False, soft_wrap=True)


@app.command(cls=Command)
@handle_errors
def heatmap(
    model: HeatmapModelArgument,
    image: ImageArgument,
    output: PngOption = None,
    class_names: ClassOption = None,
    top: TopOption = None,
    save_map: SaveMapOption = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    trust: TrustOption = False,
    stride: StrideOption = None,
    tile: TileOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Draw where MODEL sees each class in IMAGE: its class probabilities at every window, laid over the picture.

    A checkpoint is converted in memory (densely: a global pooling before the head
    is dropped) and checked against the original at its native size; an ONNX file
    runs in onnxruntime as it is. The PNG shows one panel per class, the best
    window of each outlined, and a colour bar of the probabilities. --stride S draws
    the finer map of a checkpoint converted à trous: one window every S pixels.
    A picture too large to run at once is scored in exact tiles, as fcconv map
    scores an input (--tile to choose their size).
    """
    with screen.shown() as progress:
        result = heatmap_file(
            model, image, output, class_names=class_names, top=top, save_map=save_map, arch=arch,
            input_shape=input_shape, trust=trust, stride=stride, tile=tile, progress=progress,
        )  # fmt: skip
    if not result.passed:
        screen.show(verification_table(result.check))
        fail(f"fcconv: the in-memory conversion of {model} does not match it; nothing written")
    console.print(f"wrote {' and '.join(map(str, result.written))}", markup=False, soft_wrap=True)


@app.command(cls=Command, name="map")
@handle_errors
def map_command(
    model: MapModelArgument,
    source: MapInputArgument,
    output: MapOutputOption,
    tile: TileOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    stride: StrideOption = None,
    trust: TrustOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Write MODEL's dense map of INPUT, an input of any size, exactly: tile by tile, as the tiles finish.

    The tiles overlap by what each map position reads (measured on the model, its
    padding included) and line up with the map's grid, so the map equals one pass over
    the whole input, in the memory of a few tiles. Where memory keeps a model's tiles far
    smaller than what they share (VGG16), it is cut into parts that map through files
    beside OUT. The map is staged beside OUT and moved onto it when complete. A checkpoint is converted first, densely (à trous with
    --stride), into a temporary folder, and verified as convert verifies.
    """
    with screen.shown() as progress:
        result = map_file(
            model, source, output, tile=tile, scheduler=scheduler, workers=workers, arch=arch, input_shape=input_shape,
            stride=stride, trust=trust, progress=progress,
        )  # fmt: skip
    if not result.written:
        fail(f"fcconv: the conversion of {model} does not match it; nothing written")
    console.print(f"wrote {result.target} ({'×'.join(map(str, result.shape))})", markup=False, soft_wrap=True)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"fcconv {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """fcconv: exact FC→conv surgery for trained classifiers."""


def run() -> None:
    """Entry point of the ``fcconv`` script: usage errors, too, are one line on stderr with exit code 2."""
    try:
        code = app(prog_name="fcconv", standalone_mode=False)
    except typer.Abort:
        error_console.print("fcconv: interrupted", markup=False)
        sys.exit(130)
    except COMMAND_LINE_ERROR as exc:  # bad option values, unknown options, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
        else:
            error_console.print(f"fcconv: error: {one_line(exc.format_message())} (see fcconv --help)", markup=False)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)
