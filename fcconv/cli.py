"""The ``fcconv`` command: a thin layer over the library that parses flags and renders results."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fcconv import __version__
from fcconv.errors import BadInputError, FcconvError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a trained classifier's fully connected head into convolutions, verify it, export ONNX.",
)
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_NOT_CONVERTIBLE = 0, 1, 2, 3

ArchOption = Annotated[
    Optional[str],
    typer.Option("--arch", help="torchvision model name (vgg16, resnet18) or package.module:callable."),
]
InputShapeOption = Annotated[
    Optional[str],
    typer.Option("--input-shape", help="Native input size C,H,W (or C,L / C,D,H,W). [default: 3,224,224]"),
]
DenseOption = Annotated[
    bool, typer.Option("--dense", help="Drop a global pooling before the head: return the per-position score map.")
]
PoolOption = Annotated[
    Optional[str],
    typer.Option(
        "--pool",
        help="avg or max: pool the score map over its positions, so the output is (N, K) at any input size.",
    ),
]
PointwiseOption = Annotated[
    bool,
    typer.Option(
        "--pointwise",
        help="Also turn the trunk's Linear layers that act on each position of a channels-last map (ConvNeXt, "
        "Swin) into 1×1 convolutions, removing the permutations around them where that is exact.",
    ),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Load a whole pickled module, or an ExportedProgram holding pickled objects (runs code from the file; "
        "trusted files only).",
    ),
]
DtypeOption = Annotated[
    Optional[str],
    typer.Option("--dtype", help="Convert in this dtype: float32, float16 or float64. [default: the checkpoint's]"),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
SizesOption = Annotated[
    Optional[str],
    typer.Option(
        "--sizes",
        help="Spatial sizes to check, e.g. 224x224,320x480 (1000,1301 in 1D; 16x112x112 in 3D). "
        "[default: native, 1.25-1.5×, 2×]",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where the PyTorch models run during verification: cpu or cuda (TF32 off).")
]
RtolOption = Annotated[
    Optional[float],
    typer.Option("--rtol", help="Allowed error relative to the output's largest magnitude. [default: 1e-4 in float32]"),
]
AtolOption = Annotated[float, typer.Option("--atol", help="Allowed absolute error, added to rtol × magnitude.")]


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and the documented exit code.

    Library warnings are not shown (the command reports what matters itself) unless
    ``--debug``, which also lets the traceback of an error through.
    """

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        except FcconvError as exc:
            if debug:
                raise
            error_console.print(f"fcconv: error: {one_line(str(exc))}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error_console.print("fcconv: interrupted", markup=False)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
            if debug:
                raise
            text = one_line(" ".join(str(exc).split()))[:300]
            error_console.print(
                f"fcconv: error: {type(exc).__name__}: {text} (run with --debug for the traceback)", markup=False
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so that it prints as one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _parse_sizes(text: str | None) -> list[tuple[int, ...]] | None:
    if not text:
        return None
    sizes = []
    for item in text.split(","):
        try:
            size = tuple(int(p) for p in item.lower().replace("×", "x").split("x"))
        except ValueError:
            raise BadInputError(f"--sizes {text!r}: {item!r} is not a size like 224x224") from None
        if not size or any(s <= 0 for s in size):
            raise BadInputError(f"--sizes {text!r}: {item!r} is not a positive size")
        sizes.append(size)
    return sizes


def _load(path: Path, arch: str | None, input_shape: str | None, trust: bool, dtype: str | None = None):
    import torch

    from fcconv.load import load_model, parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape else None
    if dtype == "bfloat16":
        raise BadInputError("--dtype bfloat16: ONNX has no bfloat16 convolution; use float32 or float16")
    with console.status(f"Loading {path}…") as status:
        if arch is None:
            status.update(f"Loading {path} and matching it against torchvision's classifiers…")
        loaded = load_model(path, arch, shape, trust=trust, dtype=dtype)
    if loaded.detected:
        console.print(f"architecture: {loaded.arch} (detected from the state_dict's keys and shapes)", markup=False)
    if loaded.dtype == torch.bfloat16:
        loaded.module.to(torch.float32)
        console.print(
            "bfloat16 weights: converting in float32, where each of them is exact (ONNX has no bfloat16 convolution)",
            markup=False,
        )
    return loaded


def _check_pool(pool: str | None) -> str | None:
    if pool is not None and pool not in ("avg", "max"):
        raise BadInputError(f"--pool {pool!r} is not avg or max")
    return pool


def _print_trunk(conversion, *, inspecting: bool = False) -> None:
    """What the rewrite found or changed outside the head: per-position Linear layers, size-generic functions."""
    from fcconv.render import trunk_table

    if conversion.fully_convolutional:
        console.print(
            "already fully convolutional: the head holds no Linear layer, so only its flatten goes; "
            + ("it is exported" if inspecting else "exported")
            + " with free height and width",
            markup=False,
        )
    if conversion.trunk_layers:
        console.print(trunk_table(conversion))
        if any(layer.after.startswith("kept") for layer in conversion.trunk_layers):
            console.print(
                "  these act on each position already and do not stop the conversion; "
                "--pointwise makes them 1×1 convolutions",
                markup=False,
            )
    for note in conversion.notes:
        console.print(f"  trunk: {note}", markup=False)


def _references(loaded, dense, sizes, rtol, atol, device, conversion=None, pool=None):
    """The original's outputs on the verification inputs, with a progress line."""
    from fcconv.verify import reference_outputs

    with console.status("Running the original…") as status:
        return reference_outputs(
            loaded.module, loaded.input_shape, sizes=sizes, dense=dense, pool=pool, rtol=rtol, atol=atol, device=device,
            conversion=conversion, on_size=lambda s: status.update(f"Running the original at {'×'.join(map(str, s))}…"),
        )  # fmt: skip


def _compare_and_show(exported, references):
    """Run ``exported`` on the reference inputs with a progress line, print the table, return the report."""
    from fcconv.render import verification_table
    from fcconv.verify import compare_outputs

    with console.status("Verifying against the original…") as status:
        report = compare_outputs(
            exported, references, on_size=lambda s: status.update(f"Verifying at {'×'.join(map(str, s))}…")
        )
    console.print(verification_table(report))
    return report


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _default_output(path: Path) -> Path:
    return path.with_name(f"{path.name.split('.')[0]}.fcn.onnx")


@app.command()
@_handle_errors
def convert(
    model: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: a state_dict (.pt, .pth, .bin, .safetensors), an ExportedProgram (.pt2) or, with "
            "--trust, a pickled module.",
            readable=False,
        ),
    ],
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="ONNX file to write. [default: NAME.fcn.onnx beside MODEL]")
    ] = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    head_format: Annotated[
        str,
        typer.Option(
            "--head-format",
            help="conv: the head as Conv nodes; gemm: as GEMMs over all windows (faster in onnxruntime at batch > 1).",
        ),
    ] = "conv",
    external_data: Annotated[
        bool,
        typer.Option(
            "--external-data",
            help="Write the weights to NAME.onnx.data beside the file. [default: only above protobuf's 2 GiB]",
        ),
    ] = False,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Rewrite MODEL's fully connected head as convolutions, export ONNX and verify the export.

    The ONNX file is written only when it matches the original (exit 0); on a mismatch
    nothing is written and the exit code is 1.
    """
    from fcconv.export import (
        HEAD_FORMATS,
        export_onnx,
        external_data_path,
        fcconv_metadata,
        staged_onnx,
    )
    from fcconv.render import rewrite_table
    from fcconv.rewrite import rewrite

    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"--head-format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    _check_pool(pool)
    check_sizes = _parse_sizes(sizes)
    target = output or _default_output(model)
    for written in (target, external_data_path(target)):
        if written.exists() and written.resolve() == model.resolve():
            raise BadInputError(f"-o {target} would overwrite the input")
    if target.is_dir():
        raise BadInputError(f"-o {target}: is a directory")
    if not target.parent.is_dir():
        raise BadInputError(f"-o {target}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise BadInputError(f"-o {target}: directory {target.parent} is not writable")
    loaded = _load(model, arch, input_shape, trust, dtype)
    with console.status("Rewriting the head…"):
        conversion = rewrite(loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise)
    if conversion.layers:
        console.print(rewrite_table(conversion, title=f"{model.name} ({loaded.arch}): rewritten layers"))
    _print_trunk(conversion)
    for item in conversion.removed:
        console.print(f"  removed: {item}", markup=False)
    if pool is not None:
        console.print(f"  appended: global {pool} pooling of the score map (output N×K at any size)", markup=False)
    with staged_onnx(target) as staged:
        with console.status(f"Exporting {target.name}…"):
            export_onnx(
                conversion.module,
                staged,
                loaded.input_shape,
                head_format=head_format,
                metadata={**fcconv_metadata(source=loaded.path), "fcconv.pointwise": str(pointwise).lower()},
                external_data=external_data or None,
            )
        data_file = external_data_path(staged).exists()
        references = _references(loaded, dense, check_sizes, rtol, atol, device, conversion)
        # The export holds its own copy of the weights: free the PyTorch models before it is loaded.
        del loaded, conversion
        _release_memory()
        report = _compare_and_show(staged, references)
        if not report.passed:
            error_console.print(f"fcconv: verification failed; {target} was not written", markup=False)
            raise typer.Exit(EXIT_MISMATCH)
    weights = f" (weights in {external_data_path(target).name})" if data_file else ""
    console.print(f"wrote {target}{weights}", markup=False)


@app.command()
@_handle_errors
def verify(
    onnx_model: Annotated[
        Path, typer.Argument(metavar="MODEL.onnx", help="An exported fully convolutional ONNX model.", readable=False)
    ],
    reference: Annotated[
        Path, typer.Option("--reference", help="The original checkpoint to compare against.", readable=False)
    ],
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: Annotated[
        Optional[bool],
        typer.Option("--dense/--no-dense", help="How the model was converted. [default: from its metadata]"),
    ] = None,
    pool: Annotated[
        Optional[str],
        typer.Option("--pool", help="avg, max or none: how the model was converted. [default: from its metadata]"),
    ] = None,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Re-check an exported model against the original: exit 0 when equivalent, 1 when not."""
    from fcconv.export import OnnxModel

    check_sizes = _parse_sizes(sizes)
    exported = OnnxModel(onnx_model)
    meta = exported.metadata
    if input_shape is None and "fcconv.input_shape" in meta:
        input_shape = meta["fcconv.input_shape"]
    if dense is None:
        dense = meta.get("fcconv.dense", "false") == "true"
    if pool is None:
        pool = meta.get("fcconv.pool", "none")
    pool = None if pool == "none" else _check_pool(pool)
    loaded = _load(reference, arch, input_shape, trust, dtype)
    report = _compare_and_show(exported, _references(loaded, dense, check_sizes, rtol, atol, device, pool=pool))
    if not report.passed:
        error_console.print(f"fcconv: {onnx_model} does not match {reference}", markup=False)
        raise typer.Exit(EXIT_MISMATCH)
    console.print(f"{onnx_model} matches {reference}", markup=False)


@app.command()
@_handle_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="Checkpoint to inspect.", readable=False)],
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Show the fully connected head: each Linear, the map that feeds it, its convolution and its parameter share."""
    from fcconv.render import inspect_table
    from fcconv.rewrite import analyze

    _check_pool(pool)
    loaded = _load(model, arch, input_shape, trust, dtype)
    conversion = analyze(loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise)
    if conversion.layers:
        console.print(inspect_table(conversion))
    _print_trunk(conversion, inspecting=True)
    for item in conversion.removed:
        console.print(f"  removed on conversion: {item}", markup=False)
    geometry = conversion.geometry
    reads = (
        "the whole feature map (global pooling kept)"
        if geometry.window is None
        else (
            f"a {'×'.join(map(str, geometry.window))} window of the {'×'.join(map(str, geometry.feature_shape))} "
            f"feature map, every {'×'.join(map(str, geometry.stride))} cells"
        )
    )
    console.print(f"  each output position reads {reads}", markup=False)
    if pool is not None:
        console.print(f"  the score map is then {pool}-pooled over its positions: the output is N×K", markup=False)


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
    except typer.TyperException as exc:  # bad option values, unknown options, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
        else:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            error_console.print(f"fcconv: error: {one_line(message)} (see fcconv --help)", markup=False)
        sys.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT))
    sys.exit(code if isinstance(code, int) else EXIT_OK)
