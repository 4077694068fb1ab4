"""The ``fcconv`` command: a thin layer over the library that parses flags and renders results."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fcconv._version import __version__
from fcconv.errors import BadInputError, FcconvError
from fcconv.staging import Terminated, terminations_raised

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a trained classifier's fully connected head into convolutions, verify it, export ONNX.",
)
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_NOT_CONVERTIBLE = 0, 1, 2, 3
ONNX_LINEAR = "Gemm or MatMul"  # what a Linear layer is in an ONNX graph
TORCH_EXTRA = {"torch", "torchvision", "safetensors", "matplotlib"}  # what `pip install 'fcconv[torch]'` adds

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
LogitsOption = Annotated[
    bool,
    typer.Option(
        "--logits",
        help="Drop the softmax, log-softmax or sigmoid each output ends in: the map holds the raw scores.",
    ),
]
UntilOption = Annotated[
    Optional[str],
    typer.Option(
        "--until",
        metavar="LAYER",
        help="End the model at this layer of the head (e.g. classifier.4): the output is its dense feature map. "
        "inspect lists the layers it accepts.",
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
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No tables, spinners or progress bars: only the result line and errors."),
]
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
JsonOption = Annotated[
    Optional[Path],
    typer.Option("--json", help="Also write the report as JSON (schema fcconv.report/1), on a pass or a fail."),
]
JunitOption = Annotated[
    Optional[Path], typer.Option("--junit", help="Also write the report as JUnit XML, on a pass or a fail.")
]


class _Screen:
    """Everything a command prints besides its one-line result: tables, notes, spinners, progress bars.

    ``--quiet`` turns all of it off; results and errors are printed regardless.
    """

    quiet = False

    def show(self, *items: Any, **options: Any) -> None:
        if not self.quiet:
            console.print(*items, **options)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner with ``text``; yields a function that changes the text."""
        if self.quiet:
            yield lambda _text: None
            return
        with console.status(text) as spinner:
            yield lambda new_text: spinner.update(new_text)

    @contextlib.contextmanager
    def progress(self, text: str, total: float, *, unit: str = "steps") -> Iterator[Callable[..., None]]:
        """A progress bar over ``total`` steps (or bytes, ``unit="bytes"``); yields ``advance(done, text=None)``.

        The bar is transient: it shows while the work runs and leaves the screen when it ends;
        where the output is not a terminal (a log, a pipe) there is no bar.
        """
        if self.quiet or not console.is_terminal:
            yield lambda done, text=None, total=None: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = (TextColumn("{task.description}"), BarColumn(), amount, TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(text, total=total)

            def advance(done: float, text: str | None = None, total: float | None = None) -> None:
                changes = {"description": text, "total": total}
                bar.update(task, completed=done, **{k: v for k, v in changes.items() if v is not None})

            yield advance


screen = _Screen()


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and the documented exit code.

    Library warnings are not shown (the command reports what matters itself) unless
    ``--debug``, which also lets the traceback of an error through. Ctrl-C, SIGTERM and
    SIGHUP stop the command as an error does, nothing written, with 128 + the signal's
    number as the exit code (130, 143, 129), as a shell reports a process those signals end.
    """

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        screen.quiet = bool(kwargs.get("quiet", False))
        try:
            with warnings.catch_warnings(), terminations_raised():
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
        except Terminated as exc:
            name = signal.Signals(exc.signum).name
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                error_console.print(f"fcconv: stopped by {name}", markup=False)
            raise typer.Exit(128 + exc.signum) from None
        except (typer.Exit, typer.Abort):
            raise
        except SystemExit as exc:  # the model's own code (an --arch callable, its forward) called sys.exit
            if debug:
                raise
            error_console.print(
                f"fcconv: error: the model's code tried to end the process (sys.exit({exc.code!r})); "
                "nothing was written",
                markup=False,
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
            if debug:
                raise
            if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in TORCH_EXTRA:
                # `pip install fcconv` runs `fcconv check` on ONNX files; the rest needs the torch extra
                error_console.print(
                    f"fcconv: error: fcconv {command.__name__} needs PyTorch: pip install 'fcconv[torch]'",
                    markup=False,
                )
                raise typer.Exit(EXIT_BAD_INPUT) from None
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
    from fcconv.sizes import check_tensor_size

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
        check_tensor_size(size, f"--sizes {text!r}: {item!r}")  # too large whatever the channel count
        sizes.append(size)
    return sizes


def _load(path: Path, arch: str | None, input_shape: str | None, trust: bool, dtype: str | None = None):
    import torch

    from fcconv.load import load_model, parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape else None
    if dtype == "bfloat16":
        raise BadInputError("--dtype bfloat16: ONNX has no bfloat16 convolution; use float32 or float16")
    with screen.status(f"Loading {path}…") as update:
        if arch is None:
            update(f"Loading {path} and matching it against torchvision's classifiers…")
        loaded = load_model(path, arch, shape, trust=trust, dtype=dtype)
    if loaded.detected:
        screen.show(f"architecture: {loaded.arch} (detected from the state_dict's keys and shapes)", markup=False)
    if loaded.dtype == torch.bfloat16:
        loaded.module.to(torch.float32)
        screen.show(
            "bfloat16 weights: converting in float32, where each of them is exact (ONNX has no bfloat16 convolution)",
            markup=False,
        )
    return loaded


def _check_pool(pool: str | None) -> str | None:
    if pool is not None and pool not in ("avg", "max"):
        raise BadInputError(f"--pool {pool!r} is not avg or max")
    return pool


def _print_trunk(conversion, *, inspecting: bool = False, linear: str = "Linear layer") -> None:
    """What the rewrite found or changed outside the head: per-position Linear layers, size-generic functions.

    ``linear`` names the head's fully connected layers as the model spells them.
    """
    from fcconv.render import trunk_table

    if conversion.fully_convolutional:
        screen.show(
            f"already fully convolutional: the head holds no {linear}, so only its flatten goes; "
            + ("it is exported" if inspecting else "exported")
            + " with free height and width",
            markup=False,
        )
    if getattr(conversion, "trunk_layers", None):
        screen.show(trunk_table(conversion))
        if any(layer.after.startswith("kept") for layer in conversion.trunk_layers):
            screen.show(
                "  these act on each position already and do not stop the conversion; "
                "--pointwise makes them 1×1 convolutions",
                markup=False,
            )
    for note in conversion.notes:
        screen.show(f"  trunk: {note}", markup=False)


@contextlib.contextmanager
def _per_size(title: str, step: str, total: int) -> Iterator[Callable[[tuple[int, ...]], None]]:
    """A progress bar of one step per input size; yields the ``on_size`` callback the library calls."""
    with screen.progress(title, total) as advance:
        done: list[tuple[int, ...]] = []

        def on_size(size: tuple[int, ...]) -> None:
            advance(len(done), f"{step} at {'×'.join(map(str, size))}")
            done.append(size)

        yield on_size
        advance(total)


def _references(loaded, dense, sizes, rtol, atol, device, conversion=None, pool=None):
    """The original's outputs on the verification inputs, with a progress bar."""
    from fcconv.verify import default_sizes, reference_outputs

    sizes = sizes or default_sizes(loaded.input_shape)
    with _per_size("Running the original", "Running the original", len(sizes)) as on_size:
        return reference_outputs(
            loaded.module, loaded.input_shape, sizes=sizes, dense=dense, pool=pool, rtol=rtol, atol=atol, device=device,
            conversion=conversion, on_size=on_size,
        )  # fmt: skip


def _probe_output(conversion, input_shape, references):
    """The original's reading of :func:`~fcconv.verify.probe_input`, recorded in the export for ``fcconv check``."""
    import torch

    from fcconv.verify import full_float32_precision, probe_input, sliding_window_reference

    probe = probe_input(input_shape, references.dtype).to(references.device)
    with torch.inference_mode(), full_float32_precision():
        return sliding_window_reference(conversion, probe)


def _compare_and_show(exported, references):
    """Run ``exported`` on the reference inputs with a progress line, print the table, return the report."""
    from fcconv.render import verification_table
    from fcconv.verify import compare_outputs

    with _per_size("Verifying against the original", "Verifying", len(references.cases)) as on_size:
        report = compare_outputs(exported, references, on_size=on_size)
    screen.show(verification_table(report))
    return report


def _check_report_paths(inputs: list[Path], *reports: Path | None) -> None:
    """Refuse report files that could not be written, or would overwrite an input, before any work is done."""
    given = [r for r in reports if r is not None]
    if len({r.resolve() for r in given}) < len(given):
        raise BadInputError("--json and --junit name the same file")
    for report in given:
        option = "--json" if report is reports[0] else "--junit"
        if report.is_dir():
            raise BadInputError(f"{option} {report}: is a directory")
        if not report.parent.is_dir():
            raise BadInputError(f"{option} {report}: directory {report.parent} does not exist")
        if not os.access(report.parent, os.W_OK):
            raise BadInputError(f"{option} {report}: directory {report.parent} is not writable")
        if any(report.resolve() == path.resolve() for path in inputs):
            raise BadInputError(f"{option} {report} would overwrite an input")


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX model (by suffix or content); onnx is imported only when asked."""
    from fcconv.files import is_onnx_file

    return is_onnx_file(path)


def _refuse_for_onnx(**given: Any) -> None:
    """Refuse the options that only mean something for a PyTorch model, naming the first one given."""
    for flag, value in given.items():
        if value:
            raise BadInputError(f"--{flag.replace('_', '-')} does not apply to an ONNX model")


def _rewrite_onnx_file(path: Path, input_shape: str | None, logits: bool = False, until: str | None = None):
    """Read an ONNX classifier, cut it as ``--logits``/``--until`` ask, and rewrite its head, with progress lines;
    returns the (cut) classifier and its conversion."""
    from fcconv.load import parse_input_shape
    from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx, truncate_onnx_classifier

    shape = parse_input_shape(input_shape) if input_shape else None
    with screen.status(f"Loading {path}…"):
        classifier = load_onnx_classifier(path, shape)
        classifier = truncate_onnx_classifier(classifier, logits=logits, until=until)
    with screen.status("Rewriting the head…"):
        conversion = rewrite_onnx(classifier)
    return classifier, conversion


def _onnx_references(classifier, conversion, sizes, rtol, atol):
    """The input ONNX model's outputs on the verification inputs, with a progress bar."""
    from fcconv.onnx_verify import onnx_reference_outputs
    from fcconv.verify import default_sizes

    sizes = sizes or default_sizes(classifier.input_shape)
    with _per_size("Running the original", "Running the original", len(sizes)) as on_size:
        return onnx_reference_outputs(
            classifier, conversion, sizes=sizes, rtol=rtol, atol=atol, on_size=on_size
        )  # fmt: skip


def _onnx_probe_output(classifier):
    """The input ONNX model's outputs on :func:`~fcconv.verify.probe_input`, each as the converted map's
    (1, K, 1, ...), channels-first whatever the layout."""
    from fcconv.outputs import like, named_outputs
    from fcconv.runtime import OnnxRunner
    from fcconv.verify import probe_input

    runner = OnnxRunner(classifier.model, nhwc_input=classifier.layout == "nhwc")
    out = runner(probe_input(classifier.input_shape, runner.dtype))
    spatial = (1,) * (len(classifier.input_shape) - 1)
    return like(out, [value.reshape(*value.shape, *spatial) for _, value in named_outputs(out)])


def _show_onnx_head(conversion, show: Callable[..., None]) -> None:
    """The ONNX head beyond the table: the layout, each output's branch, the nodes carried per position, and what
    ``--until`` accepts."""
    if conversion.layout == "nhwc":
        show("  layout: channels-last, kept: N×H×W×C in, each output (N, h, w, K)", markup=False)
    for output in conversion.outputs:
        show(f"  output {output.name} ({output.classes}): {' → '.join(output.nodes) or 'no head nodes'}", markup=False)
    if conversion.carried:
        show(f"  carried over to each position: {', '.join(conversion.carried)}", markup=False)
    if conversion.geometry.logits:
        show("  --logits: the outputs hold the raw scores (trailing softmax, log-softmax or sigmoid dropped)")
    if conversion.geometry.until:
        show(f"  --until {conversion.geometry.until}: the output is that tensor's dense feature map", markup=False)
    if conversion.until_names:
        show(f"  --until accepts: {', '.join(conversion.until_names)}", markup=False)


def _convert_onnx(
    model: Path, target: Path, input_shape, sizes, rtol, atol, external_data: bool, logits: bool, until: str | None
) -> None:
    """``convert`` for a classifier exported to ONNX: the graph is rewritten, written and verified in onnxruntime."""
    from fcconv.external_data import external_data_path
    from fcconv.metadata import append_metadata, probe_metadata
    from fcconv.onnx_rewrite import write_onnx
    from fcconv.render import rewrite_table
    from fcconv.staging import staged_onnx

    classifier, conversion = _rewrite_onnx_file(model, input_shape, logits, until)
    if conversion.layers:
        title = f"{model.name} (ONNX, opset {classifier.opset}): rewritten layers"
        screen.show(rewrite_table(conversion, title=title))
    _print_trunk(conversion, linear=ONNX_LINEAR)
    for item in conversion.removed:
        screen.show(f"  removed: {item}", markup=False)
    if conversion.layout == "nhwc" or len(conversion.outputs) > 1:
        _show_onnx_head(conversion, screen.show)
    with staged_onnx(target) as staged:
        with screen.status(f"Writing {target.name}…"):
            write_onnx(conversion, staged, source=model, external_data=external_data or None)
        data_file = external_data_path(staged).exists()
        references = _onnx_references(classifier, conversion, sizes, rtol, atol)
        append_metadata(staged, probe_metadata(_onnx_probe_output(classifier)))
        layout = conversion.layout
        del classifier, conversion
        _release_memory()
        from fcconv.onnx_verify import converted_runner

        report = _compare_and_show(converted_runner(staged, layout), references)
        if not report.passed:
            error_console.print(f"fcconv: verification failed; {target} was not written", markup=False)
            raise typer.Exit(EXIT_MISMATCH)
    weights = f" (weights in {external_data_path(target).name})" if data_file else ""
    console.print(f"wrote {target}{weights}", markup=False, soft_wrap=True)


PYTORCH_SUFFIXES = {".pt2": "a torch.export program", ".safetensors": "the converted state_dict"}


def _convert_to_pytorch(models: dict, target: Path, metadata, sizes, rtol, atol, device) -> None:
    """``convert -o NAME.pt2`` or ``-o NAME.safetensors``: written beside the target, read back, verified, moved.

    The program is the converted module exported with free batch and spatial axes;
    the safetensors file its state_dict, verified by rebuilding the module from the
    original and loading the file into it, as a reader of the file does. ``models``
    holds ``loaded`` (``loaded.module`` the model converted), ``as_loaded`` (the model
    before ``--logits``/``--until`` ended it) and ``conversion``; it is emptied here,
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
        with screen.status(f"Exporting {target.name} with torch.export…"):
            exported = export_program(conversion.module, loaded.input_shape)
    references = _references(loaded, geometry.dense, sizes, rtol, atol, device, conversion)
    probe = _probe_output(conversion, loaded.input_shape, references)
    grid = probe_output_grid(conversion.module, loaded.input_shape) if geometry.mode == "map" else None
    meta = {
        **fcconv_metadata(geometry, grid=grid),
        **output_channels_metadata({name: int(value.shape[1]) for name, value in named_outputs(probe)}),
        "fcconv.format": "pt2" if program else "state_dict",
        **metadata,
        **probe_metadata(probe),
    }
    with staged_onnx(target) as staged:
        with screen.status(f"Writing {target.name}…"):
            if program:
                save_program(exported, staged, meta)
                del exported
            else:
                save_weights(conversion.module, staged, meta)
        if program:
            del loaded, as_loaded, conversion  # the program holds its own copy of the weights
            _release_memory()
            written = ProgramModel(staged)
        else:  # the references are made: the original's layers can take the file's weights
            written = rebuild(as_loaded, loaded.input_shape, meta, staged, consume_original=True)
            del loaded, as_loaded, conversion
            _release_memory()
        report = _compare_and_show(written, references)
        if not report.passed:
            error_console.print(f"fcconv: verification failed; {target} was not written", markup=False)
            raise typer.Exit(EXIT_MISMATCH)
    console.print(f"wrote {target}", markup=False, soft_wrap=True)


def _truncated(loaded, logits: bool, until: str | None):
    """``loaded`` with its module ended as ``--logits``/``--until`` say (the module itself when neither is given)."""
    from fcconv.rewrite import truncate

    if logits or until:
        loaded.module = truncate(loaded.module, loaded.input_shape, logits=logits, until=until)
    return loaded


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _default_output(path: Path) -> Path:
    if not path.name:  # '' (which arrives as '.') or a folder such as '/'
        raise BadInputError(f"{path}: is a directory, not a checkpoint")
    return path.with_name(f"{path.name.split('.')[0]}.fcn.onnx")


def _refuse_nameless(path: Path, option: str, example: str) -> None:
    """Refuse an output path that names no file: an empty one (which arrives as '.'), '..' or '/'."""
    if path.name in ("", ".."):
        raise BadInputError(
            f"{option} {str(path)!r} is empty or a folder, not a file name: give the file to write, such as {example}"
        )


@app.command()
@_handle_errors
def convert(
    model: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: a state_dict (.pt, .pth, .bin, .safetensors), an ExportedProgram (.pt2), a classifier "
            "exported to ONNX (.onnx) or, with --trust, a pickled module.",
            readable=False,
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "-o",
            "--output",
            help="File to write: NAME.onnx, NAME.pt2 (a torch.export program) or NAME.safetensors (the converted "
            "state_dict). [default: NAME.fcn.onnx beside MODEL]",
        ),
    ] = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    logits: LogitsOption = False,
    until: UntilOption = None,
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
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Rewrite MODEL's fully connected head as convolutions, export ONNX and verify the export.

    The file is written only when it matches the original (exit 0); on a mismatch
    nothing is written and the exit code is 1. ``-o NAME.pt2`` writes a torch.export
    program with free batch and spatial axes, ``-o NAME.safetensors`` the converted
    module's state_dict, each with the same metadata as the ONNX export. An ONNX classifier is rewritten on its
    graph and verified against itself in onnxruntime.
    """
    from fcconv.export import HEAD_FORMATS, export_onnx, inline_external_data
    from fcconv.external_data import external_data_path
    from fcconv.files import file_sha256
    from fcconv.heatmap import card_metadata
    from fcconv.metadata import append_metadata, fcconv_metadata, probe_metadata
    from fcconv.render import rewrite_table
    from fcconv.rewrite import rewrite
    from fcconv.staging import staged_onnx
    from fcconv.verify import default_sizes, refuse_sizes_beyond_memory

    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"--head-format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    _check_pool(pool)
    check_sizes = _parse_sizes(sizes)
    if output is not None:
        _refuse_nameless(output, "-o", _default_output(model).name)
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
    pytorch_out = target.suffix.lower() in PYTORCH_SUFFIXES
    if pytorch_out and (head_format != "conv" or external_data):
        flag = "--head-format" if head_format != "conv" else "--external-data"
        raise BadInputError(
            f"{flag} applies to ONNX output; -o {target} writes {PYTORCH_SUFFIXES[target.suffix.lower()]}"
        )
    if _is_onnx(model):
        if pytorch_out:
            raise BadInputError(f"-o {target}: an ONNX classifier is converted to ONNX only; name the output NAME.onnx")
        _refuse_for_onnx(
            arch=arch, dense=dense, pool=pool, pointwise=pointwise, head_format=head_format != "conv",
            device=device != "cpu", dtype=dtype, trust=trust,
        )  # fmt: skip
        _convert_onnx(model, target, input_shape, check_sizes, rtol, atol, external_data, logits, until)
        return
    loaded = _load(model, arch, input_shape, trust, dtype)
    with screen.status("Rewriting the head…"):
        conversion = rewrite(
            loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until
        )
    # with --logits or --until the model converted, and verified against, is the original ended there
    as_loaded, loaded.module = loaded.module, conversion.source
    # the export runs the model at the native size: refuse sizes that cannot be verified before it
    refuse_sizes_beyond_memory(
        conversion, loaded.input_shape, check_sizes or default_sizes(loaded.input_shape), loaded.dtype
    )
    if conversion.layers:
        screen.show(rewrite_table(conversion, title=f"{model.name} ({loaded.arch}): rewritten layers"))
    _print_trunk(conversion)
    for item in conversion.removed:
        screen.show(f"  removed: {item}", markup=False)
    if pool is not None:
        screen.show(f"  appended: global {pool} pooling of the score map (output N×K at any size)", markup=False)
    with screen.progress(f"Reading {model.name} (its SHA-256 for the export's metadata)", 0, unit="bytes") as advance:
        source_sha256 = file_sha256(loaded.path, on_progress=lambda done, size: advance(done, total=size))
    if pytorch_out:
        metadata = {
            "fcconv.source_sha256": source_sha256,
            "fcconv.pointwise": str(pointwise).lower(),
            "fcconv.arch": loaded.arch,
            **card_metadata(loaded.card),
        }
        # Handed over in a dict that the callee empties, so that it can free the models before reading the file back.
        models = {"loaded": loaded, "as_loaded": as_loaded, "conversion": conversion}
        del loaded, as_loaded, conversion
        _convert_to_pytorch(models, target, metadata, check_sizes, rtol, atol, device)
        return
    with staged_onnx(target) as staged:
        with screen.progress(f"Exporting {target.name}", 0, unit="bytes") as advance:
            # Staged with the weights in external data, which onnxruntime maps rather than copies.
            export_onnx(
                conversion.module,
                staged,
                loaded.input_shape,
                head_format=head_format,
                metadata={
                    **fcconv_metadata(),
                    "fcconv.source_sha256": source_sha256,
                    "fcconv.pointwise": str(pointwise).lower(),
                    **card_metadata(loaded.card),
                },
                external_data=True,
                on_progress=lambda done, total: advance(done, total=total),
            )
        references = _references(loaded, dense, check_sizes, rtol, atol, device, conversion)
        append_metadata(staged, probe_metadata(_probe_output(conversion, loaded.input_shape, references)))
        # The export holds its own copy of the weights: free the PyTorch models before it is loaded.
        del loaded, conversion, as_loaded
        _release_memory()
        report = _compare_and_show(staged, references)
        if not report.passed:
            error_console.print(f"fcconv: verification failed; {target} was not written", markup=False)
            raise typer.Exit(EXIT_MISMATCH)
        if not external_data:
            inline_external_data(staged)
        data_file = external_data_path(staged).exists()
    weights = f" (weights in {external_data_path(target).name})" if data_file else ""
    console.print(f"wrote {target}{weights}", markup=False, soft_wrap=True)


@app.command()
@_handle_errors
def verify(
    onnx_model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            help="What fcconv convert wrote: MODEL.onnx, MODEL.pt2 or MODEL.safetensors (rebuilt from the reference).",
            readable=False,
        ),
    ],
    reference: Annotated[
        Path,
        typer.Option(
            "--reference", help="The original checkpoint (or ONNX classifier) to compare against.", readable=False
        ),
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
    logits: Annotated[
        Optional[bool],
        typer.Option(
            "--logits/--no-logits", help="How the model was converted. [default: from its fcconv.logits metadata]"
        ),
    ] = None,
    until: Annotated[
        Optional[str],
        typer.Option(
            "--until", metavar="LAYER", help="How the model was converted. [default: from its fcconv.until metadata]"
        ),
    ] = None,
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
    from fcconv.files import is_program_file, is_weights_file
    from fcconv.metadata import truncation_metadata
    from fcconv.report import verification_document, write_report
    from fcconv.runtime import OnnxRunner
    from fcconv.torch_export import ProgramModel, read_weights_metadata, rebuild

    check_sizes = _parse_sizes(sizes)
    _check_report_paths([onnx_model, reference], json_report, junit_report)
    weights_only = is_weights_file(onnx_model)
    if weights_only:
        exported, meta = None, read_weights_metadata(onnx_model)  # the module is rebuilt from the reference below
    else:
        exported = ProgramModel(onnx_model, trust=trust) if is_program_file(onnx_model) else OnnxRunner(onnx_model)
        meta = exported.metadata
    if input_shape is None and "fcconv.input_shape" in meta:
        input_shape = meta["fcconv.input_shape"]
    given_dense, given_pool = dense, pool
    if dense is None:
        dense = meta.get("fcconv.dense", "false") == "true"
    if pool is None:
        pool = meta.get("fcconv.pool", "none")
    pool = None if pool == "none" else _check_pool(pool)
    if logits is None:
        logits = meta.get("fcconv.logits", "false") == "true"
    if until is None:
        until = meta.get("fcconv.until") or None
    if _is_onnx(reference):
        if not isinstance(exported, OnnxRunner):
            raise BadInputError(
                f"{onnx_model} was written for PyTorch: its reference is a PyTorch checkpoint, not ONNX"
            )
        _refuse_for_onnx(
            arch=arch, dense=given_dense, pool=given_pool not in (None, "none"), device=device != "cpu", dtype=dtype,
            trust=trust,
        )  # fmt: skip
        if dense or pool:
            how = "--dense" if dense else f"--pool {pool}"
            raise BadInputError(
                f"{onnx_model} was converted with {how} (its metadata says so), which an ONNX classifier is not: "
                f"it cannot have come from {reference}"
            )
        classifier, conversion = _rewrite_onnx_file(reference, input_shape, logits, until)
        references = _onnx_references(classifier, conversion, check_sizes, rtol, atol)
        native_shape = classifier.input_shape
        from fcconv.onnx_verify import converted_runner

        report = _compare_and_show(converted_runner(onnx_model, meta.get("fcconv.layout", "nchw")), references)
    else:
        loaded = _load(reference, arch, input_shape, trust, dtype)
        as_loaded = loaded.module
        loaded = _truncated(loaded, logits, until)
        references = _references(loaded, dense, check_sizes, rtol, atol, device, pool=pool)
        native_shape = loaded.input_shape
        if weights_only:
            recorded = {
                **meta, "fcconv.dense": str(dense).lower(), "fcconv.pool": pool or "none",
                **truncation_metadata(logits, until),
            }  # fmt: skip
            with screen.status(f"Rebuilding the converted module from {reference.name} and {onnx_model.name}…"):
                try:
                    # the references are made: the original's layers can take the file's weights
                    exported = rebuild(as_loaded, native_shape, recorded, onnx_model, consume_original=True)
                except BadInputError as exc:  # weights of another model: a mismatch, not bad input
                    error_console.print(f"fcconv: {one_line(str(exc))}", markup=False)
                    error_console.print(f"fcconv: {onnx_model} does not match {reference}", markup=False)
                    raise typer.Exit(EXIT_MISMATCH) from None
        del loaded, as_loaded  # the model compared holds its own weights
        _release_memory()
        report = _compare_and_show(exported, references)
    document = verification_document(report, onnx_model, reference, native_shape)
    write_report(document, json_report, junit_report)
    if not report.passed:
        error_console.print(f"fcconv: {onnx_model} does not match {reference}", markup=False)
        raise typer.Exit(EXIT_MISMATCH)
    console.print(f"{onnx_model} matches {reference}", markup=False, soft_wrap=True)


@app.command()
@_handle_errors
def check(
    onnx_models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="ONNX models (fcconv's exports or others), or .pt2 programs and .safetensors weights fcconv wrote.",
            readable=False,
        ),
    ],
    input_shape: Annotated[
        Optional[str],
        typer.Option(
            "--input-shape", help="Native input size C,H,W. [default: the model's fcconv.input_shape metadata]"
        ),
    ] = None,
    sizes: SizesOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    reference: Annotated[
        Optional[Path],
        typer.Option(
            "--reference",
            help="The original checkpoint: a .safetensors file is rebuilt from it and run. [default: digest only]",
            readable=False,
        ),
    ] = None,
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
    other models.

    A .pt2 program gets the checks that apply to it: free spatial axes (its range
    constraints), weights digest, the runs, output sizes and reference output. A
    .safetensors file gets the weights digest; the checks that run the model are
    skipped unless --reference (and --arch) rebuild the module to run them.
    """
    from fcconv.check import check_onnx
    from fcconv.files import is_program_file, is_weights_file
    from fcconv.render import check_table
    from fcconv.report import check_document, write_report
    from fcconv.sizes import parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape else None
    check_sizes = _parse_sizes(sizes)
    _check_report_paths([*onnx_models, *([reference] if reference else [])], json_report, junit_report)
    weights_files = [path for path in onnx_models if is_weights_file(path)]
    if (reference or arch) and not weights_files:
        raise BadInputError("--reference and --arch rebuild a .safetensors file; none was given")
    if arch and not reference:
        raise BadInputError("--arch names the architecture of --reference; give --reference too")
    original = _load(reference, arch, input_shape, trust) if reference else None
    reports = []
    for path in onnx_models:
        with screen.status(f"Checking {path}…") as update:
            options = {"sizes": check_sizes, "rtol": rtol, "atol": atol, "on_step": update}
            if path in weights_files:
                from fcconv.check_pytorch import check_weights  # torch: only for the files that need it

                report = check_weights(path, shape, rebuilt_from=original, **options)
            elif is_program_file(path):
                from fcconv.check_pytorch import check_program

                report = check_program(path, shape, trust=trust, **options)
            else:
                report = check_onnx(path, shape, **options)
        screen.show(check_table(report))
        reports.append(report)
    write_report(check_document(reports), json_report, junit_report)
    failed = [report for report in reports if not report.passed]
    for report in failed:
        names = sorted({r.check for r in report.failures}, key=[r.check for r in report.results].index)
        error_console.print(f"fcconv: {report.model} failed: {', '.join(names)}", markup=False)
    if failed:
        raise typer.Exit(EXIT_MISMATCH)
    for report in reports:
        skipped = sum(r.verdict == "skip" for r in report.results)
        note = f" ({skipped} checks skipped)" if skipped else ""
        console.print(f"{report.model} passed{note}", markup=False, soft_wrap=True)


@app.command()
@_handle_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="Checkpoint to inspect.", readable=False)],
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    dense: DenseOption = False,
    pool: PoolOption = None,
    pointwise: PointwiseOption = False,
    logits: LogitsOption = False,
    until: UntilOption = None,
    dtype: DtypeOption = None,
    trust: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Show the fully connected head: each Linear, the map that feeds it, its convolution and its parameter share.

    Also each output and the head layers on its path, a permutation the flatten read
    the map through, the per-feature layers carried to every position, and the layers
    --until accepts.
    """
    from fcconv.render import head_lines, inspect_table
    from fcconv.rewrite import analyze

    _check_pool(pool)
    if _is_onnx(model):
        _refuse_for_onnx(arch=arch, dense=dense, pool=pool, pointwise=pointwise, dtype=dtype, trust=trust)
        _, conversion = _rewrite_onnx_file(model, input_shape, logits, until)
        linear = ONNX_LINEAR
    else:
        loaded = _load(model, arch, input_shape, trust, dtype)
        conversion = analyze(
            loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until
        )
        linear = "Linear layer"
    if conversion.layers:
        console.print(inspect_table(conversion))
    _print_trunk(conversion, inspecting=True, linear=linear)
    for item in conversion.removed:
        console.print(f"  removed on conversion: {item}", markup=False)
    if linear == ONNX_LINEAR:
        _show_onnx_head(conversion, console.print)
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
    if linear != ONNX_LINEAR:
        for line in head_lines(conversion):
            console.print(line, markup=False, soft_wrap=True)


def _check_output(path: Path, suffix: str, option: str, inputs: tuple[Path, ...]) -> None:
    """Refuse an output path that would overwrite an input, is a folder, or lies in a folder that cannot be written."""
    if path.suffix.lower() != suffix:
        raise BadInputError(f"{option} {path}: the file is written as {suffix[1:].upper()}; name it NAME{suffix}")
    if path.is_dir():
        raise BadInputError(f"{option} {path}: is a directory")
    if path.exists() and any(path.resolve() == given.resolve() for given in inputs if given.exists()):
        raise BadInputError(f"{option} {path} would overwrite an input")
    if not path.parent.is_dir():
        raise BadInputError(f"{option} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BadInputError(f"{option} {path}: directory {path.parent} is not writable")


def _placement_line(score_map) -> str:
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


@app.command()
@_handle_errors
def heatmap(
    model: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint (converted in memory) or an ONNX file written by fcconv convert.", readable=False
        ),
    ],
    image: Annotated[
        Path, typer.Argument(help="The picture, any size at least the model's native one.", readable=False)
    ],
    output: Annotated[
        Optional[Path],
        typer.Option("-o", "--output", help="PNG to write. [default: IMAGE-NAME.heatmap.png beside IMAGE]"),
    ] = None,
    class_names: Annotated[
        Optional[list[str]],
        typer.Option("--class", help="Draw this class's map (repeat for several panels). [default: the --top classes]"),
    ] = None,
    top: Annotated[
        Optional[int],
        typer.Option(
            "--top", help="Draw the K classes most probable anywhere in the picture, one panel each. [default: 3]"
        ),
    ] = None,
    save_map: Annotated[
        Optional[Path],
        typer.Option("--save-map", help="Also write every class's probability map, K×h×w float32, as .npy."),
    ] = None,
    arch: ArchOption = None,
    input_shape: InputShapeOption = None,
    trust: TrustOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Draw where MODEL sees each class in IMAGE: its class probabilities at every window, laid over the picture.

    A checkpoint is converted in memory (densely: a global pooling before the head
    is dropped) and checked against the original at its native size; an ONNX file
    runs in onnxruntime as it is. The PNG shows one panel per class, the best
    window of each outlined, and a colour bar of the probabilities.
    """
    import numpy as np

    from fcconv.figure import heatmap_figure, write_png
    from fcconv.heatmap import load_dense_model, read_picture, score_map
    from fcconv.load import parse_input_shape
    from fcconv.render import peaks_table, verification_table
    from fcconv.staging import staged_paths

    if class_names and top is not None:
        raise BadInputError("--class and --top choose the panels two ways; give one of them")
    if top is not None and top < 1:
        raise BadInputError(f"--top {top}: give at least 1")
    if not image.name:  # '' (which arrives as '.') or a folder such as '/'
        raise BadInputError(f"{image}: is a directory, not a picture")
    target = output or image.with_name(f"{image.name.split('.')[0]}.heatmap.png")
    _check_output(target, ".png", "-o", (model, image))
    if save_map is not None:
        _check_output(save_map, ".npy", "--save-map", (model, image))
    picture = read_picture(image)  # an unreadable picture is reported before the model is loaded
    shape = parse_input_shape(input_shape) if input_shape else None
    with screen.status(f"Loading {model}…"):
        dense = load_dense_model(model, arch, shape, trust=trust)
    line = dense.description
    if dense.check is not None:
        check = dense.check.checks[0]
        line += f"; checked at the native {'×'.join(map(str, check.input_size))}: max rel {check.max_rel:.1e}"
        if not dense.check.passed:
            screen.show(verification_table(dense.check))
            error_console.print(
                f"fcconv: the in-memory conversion of {model} does not match it; nothing written", markup=False
            )
            raise typer.Exit(EXIT_MISMATCH)
    screen.show(line, markup=False)
    with screen.status(f"Running on {image.name}…"):
        scores = score_map(dense, picture)
    if class_names:
        peaks = [scores.peak(scores.class_index(name)) for name in class_names]
    else:
        count = 3 if top is None else top
        ranked = [name for name in scores.classes if name != scores.background_class]
        if count > len(ranked):
            raise BadInputError(f"--top {count}: the model has {len(ranked)} classes to rank")
        peaks = scores.top(count)
    height, width = scores.picture.shape[:2]
    screen.show(f"{image.name}: {width}×{height} pixels, {_placement_line(scores)}", markup=False)
    screen.show(peaks_table(scores, peaks))
    title = f"{image.name} ({width}×{height}) through {model.name}: class probabilities, {scores.probability_source}"
    figure = heatmap_figure(scores, peaks, title)
    with staged_paths(target, *([save_map] if save_map is not None else [])) as staged:  # both or neither
        write_png(figure, staged[0])
        if save_map is not None:
            with open(staged[1], "wb") as f:
                np.save(f, np.ascontiguousarray(scores.probabilities, dtype=np.float32))
    console.print(
        f"wrote {target}" + (f" and {save_map}" if save_map is not None else ""), markup=False, soft_wrap=True
    )


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
