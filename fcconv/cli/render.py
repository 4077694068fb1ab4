"""What the command shows: the pipeline's events as spinners, bars, tables and lines; errors as one line."""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from fcconv.errors import FcconvError
from fcconv.pipeline import Terminated, events, terminations_raised
from fcconv.render import (
    atrous_table,
    check_table,
    dense_model_line,
    low_rank_table,
    peaks_table,
    placement_line,
    rewritten_lines,
    verification_table,
)

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)
EXIT_MISMATCH, EXIT_BAD_INPUT = 1, 2
TORCH_EXTRA = {"torch", "torchvision", "safetensors", "matplotlib"}  # what `pip install 'fcconv[torch]'` adds

# What typer raises for a bad command line: click's ClickException, from click itself up to typer 0.25 and from
# the copy of click typer carries since 0.26. typer.BadParameter is one in every version, so the class is found
# among its bases (typer.TyperException, their common base in newer versions, is missing from older ones).
COMMAND_LINE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _flags_without_placeholder(params: list[Any]) -> None:
    """A flag takes no value: an empty metavar keeps typer (0.29) from showing ``<bool>`` beside it, which
    reads as a value to type (``--dense true`` is then refused)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class Command(TyperCommand):
    """A command whose help shows flags as flags."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_without_placeholder(self.get_params(ctx))
        super().format_help(ctx, formatter)


class Group(TyperGroup):
    """The ``fcconv`` group, whose help (``--version``, the completion options) shows flags as flags."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_without_placeholder(self.get_params(ctx))
        super().format_help(ctx, formatter)


class Screen:
    """Everything a command prints besides its one-line result: tables, notes, spinners, progress bars.

    ``--quiet`` turns all of it off; results and errors are printed regardless.
    """

    def __init__(self) -> None:
        self.quiet = False
        self.stages: dict[str, contextlib.ExitStack] = {}  # the spinners and bars of the stages running
        self.advances: dict[str, Callable[..., Any]] = {}

    def show(self, *items: Any, **options: Any) -> None:
        if not self.quiet:
            console.print(*items, **options)

    def show_all(self, items: list[Any]) -> None:
        """Tables as they are, lines of text without markup."""
        for item in items:
            self.show(item, markup=False) if isinstance(item, str) else self.show(item)

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
        """A progress bar over ``total`` steps (or bytes, ``unit="bytes"``); yields ``advance(done, total, text)``.

        The bar is transient: it shows while the work runs and leaves the screen when it ends;
        where the output is not a terminal (a log, a pipe) there is no bar.
        """
        if self.quiet or not console.is_terminal:
            yield lambda done, total=None, text=None: None
            return
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = (TextColumn("{task.description}"), BarColumn(), amount, TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(text, total=total)

            def advance(done: float, total: float | None = None, text: str | None = None) -> None:
                changes = {"description": text, "total": total}
                bar.update(task, completed=done, **{k: v for k, v in changes.items() if v is not None})

            yield advance

    def __call__(self, event: events.Event) -> None:
        """Show one of the pipeline's events (the ``progress`` callback of :mod:`fcconv.pipeline`)."""
        if isinstance(event, events.StageStarted) and event.text is not None:
            stack = self.stages[event.stage] = contextlib.ExitStack()
            if event.total is None:
                update = stack.enter_context(self.status(event.text))
                self.advances[event.stage] = lambda done, total=None, text=None: text and update(text)
            else:
                unit = "bytes" if event.unit == "bytes" else "steps"
                self.advances[event.stage] = stack.enter_context(self.progress(event.text, event.total, unit=unit))
        elif isinstance(event, events.StageAdvanced) and event.stage in self.advances:
            self.advances[event.stage](event.done, total=event.total, text=event.text)
        elif isinstance(event, events.StageFinished) and event.stage in self.stages:
            self.advances.pop(event.stage)
            self.stages.pop(event.stage).close()
        elif isinstance(event, events.Note):
            self.show(event.text, markup=False)
        elif isinstance(event, events.Warned):  # on stderr, also with --quiet: the user has something to check
            error_console.print(f"fcconv: warning: {one_line(event.text)}", markup=False)
        elif isinstance(event, events.HeadRewritten):
            self.show_all(rewritten_lines(event.conversion, event.title, onnx=event.onnx, pool=event.pool))
        elif isinstance(event, events.HeadFactored):
            self.show(low_rank_table(event.layers, event.deviation))
        elif isinstance(event, events.TrunkAtrous):
            self.show(atrous_table(event.plan))
        elif isinstance(event, events.Compared):
            self.show(verification_table(event.report))
        elif isinstance(event, events.Checked):
            self.show(check_table(event.report))
        elif isinstance(event, events.DenseModelReady) and (event.check is None or event.check.passed):
            self.show(dense_model_line(event.description, event.check), markup=False)
        elif isinstance(event, events.MapScored):
            height, width = event.scores.picture.shape[:2]
            self.show(f"{event.image.name}: {width}×{height} pixels, {placement_line(event.scores)}", markup=False)
            self.show(peaks_table(event.scores, event.peaks))

    @contextlib.contextmanager
    def shown(self) -> Iterator[Screen]:
        """``self`` as a progress callback for one pipeline call; what it left open is closed when the call ends."""
        try:
            yield self
        finally:
            for stack in reversed(self.stages.values()):
                stack.close()
            self.stages.clear()
            self.advances.clear()


screen = Screen()


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so that it prints as one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def fail(*lines: str, code: int = EXIT_MISMATCH) -> None:
    """Print ``lines`` on stderr and end the command with ``code``."""
    for line in lines:
        error_console.print(line, markup=False)
    raise typer.Exit(code)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
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
            fail(f"fcconv: error: {one_line(str(exc))}", code=exc.exit_code)
        except KeyboardInterrupt:
            fail("fcconv: interrupted", code=130)
        except Terminated as exc:
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                error_console.print(f"fcconv: stopped by {signal.Signals(exc.signum).name}", markup=False)
            raise typer.Exit(128 + exc.signum) from None
        except (typer.Exit, typer.Abort):
            raise
        except SystemExit as exc:  # the model's own code (an --arch callable, its forward) called sys.exit
            if debug:
                raise
            fail(
                f"fcconv: error: the model's code tried to end the process (sys.exit({exc.code!r})); nothing was written",
                code=EXIT_BAD_INPUT,
            )
        except Exception as exc:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
            if debug:
                raise
            if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in TORCH_EXTRA:
                # `pip install fcconv` runs `fcconv check` on ONNX files; the rest needs the torch extra
                fail(
                    f"fcconv: error: fcconv {command.__name__} needs PyTorch: pip install 'fcconv[torch]'",
                    code=EXIT_BAD_INPUT,
                )
            text = one_line(" ".join(str(exc).split()))[:300]
            fail(
                f"fcconv: error: {type(exc).__name__}: {text} (run with --debug for the traceback)", code=EXIT_BAD_INPUT
            )

    return wrapper
