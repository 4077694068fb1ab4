"""Outputs written where nothing half-done is ever seen: staged beside their target, moved into place whole.

Every file fcconv writes (exports, their external data, reports, heatmaps) is written under a
staging name in the target's folder and renamed onto the target only once it is complete and
verified; a failure, Ctrl-C, SIGTERM or SIGHUP removes it. A run killed outright (SIGKILL)
cannot clean up, so each run first removes what such runs left staged in its folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows has none: staging is then never taken for abandoned
    fcntl = None

__all__ = [
    "Terminated",
    "remove_abandoned_staging",
    "scratch_folder",
    "signals_held",
    "staged_onnx",
    "staged_path",
    "staged_paths",
    "terminations_raised",
]


# A staging file or folder is named .TARGET.fcconv-PID-RANDOM.staging: the process that owns it, and a mark
# that no other program's file carries. The owner holds a lock on it for as long as it lives.
STAGING_NAME = re.compile(r"\..+\.fcconv-(?P<pid>[1-9][0-9]{0,8})-[a-z0-9_]+\.staging")


def _staging_affixes(path: Path) -> dict[str, Any]:
    return {"prefix": f".{path.name}.fcconv-{os.getpid()}-", "suffix": ".staging", "dir": path.parent}


def _lock(fd: int) -> None:
    """Lock the staging file or folder open as ``fd`` until it is closed, as it is when its process ends, however.

    The lock tells a later run that the staging's owner still lives.
    """
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def remove_abandoned_staging(folder: str | Path) -> list[Path]:
    """Remove what runs killed outright (SIGKILL, a power cut) left staged in ``folder``; the paths removed.

    Only fcconv's staging names are considered, and one is removed only when the process its name
    carries is gone and its lock is free: the staging of a live run, here or in another PID namespace
    sharing the folder, is never touched. Without file locks (no ``fcntl``) nothing is removed.
    """
    removed = []
    if fcntl is None:
        return removed
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in list(entries):
            match = STAGING_NAME.fullmatch(entry.name)
            if match is None or entry.is_symlink() or _process_exists(int(match["pid"])):
                continue
            with contextlib.suppress(OSError):  # unreadable, locked or gone meanwhile: left as it is
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
                finally:
                    os.close(fd)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def staged_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """A temporary path beside each of ``paths``, all renamed onto them when the block succeeds, removed otherwise.

    The renames run with termination signals held back (:func:`signals_held`), so that all of the
    files are written or none. What killed runs left staged beside each path is removed first
    (:func:`remove_abandoned_staging`).
    """
    paths = [Path(path) for path in paths]
    umask = os.umask(0)
    os.umask(umask)
    staged: list[tuple[int, str]] = []
    try:
        for path in paths:
            remove_abandoned_staging(path.parent)
            with signals_held():  # a signal between making the file and recording it here would leave it behind
                fd, tmp = tempfile.mkstemp(**_staging_affixes(path))
                staged.append((fd, tmp))
            _lock(fd)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets the usual permissions
        with _naming({tmp: path for (_, tmp), path in zip(staged, paths)}):
            yield [Path(tmp) for _, tmp in staged]
        with signals_held():
            for (_, tmp), path in zip(staged, paths):
                os.replace(tmp, path)
    finally:
        for fd, tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.close(fd)


@contextlib.contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds and removed otherwise
    (:func:`staged_paths`)."""
    with staged_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def _naming(targets: Mapping[str | Path, Path]) -> Iterator[None]:
    """Errors raised in the block name each target where they name its staged file (``targets`` maps staged to
    target): a message names the file the user asked for, never a hidden staging path."""

    def renamed(text: Any) -> Any:
        if isinstance(text, str):
            for staged, target in targets.items():
                text = text.replace(str(staged), str(target))
        return text

    try:
        yield
    except Exception as exc:
        exc.args = tuple(renamed(arg) for arg in exc.args)
        if isinstance(exc, OSError):  # its text is made from these, not from args
            exc.filename, exc.filename2 = renamed(exc.filename), renamed(exc.filename2)
        raise


@contextlib.contextmanager
def staged_onnx(path: str | Path) -> Iterator[Path]:
    """A path for an ONNX file, in a temporary folder beside ``path``, moved onto ``path`` when the block succeeds.

    An ONNX file and its external data (``NAME.onnx.data``) are written, read back
    and verified under their final names inside the folder; only then are they moved
    into place, with termination signals held back until both are (:func:`signals_held`).
    On failure nothing is left behind. What killed runs left staged beside ``path``
    is removed first (:func:`remove_abandoned_staging`).
    """
    path = Path(path)
    with scratch_folder(path) as folder:
        with _naming({folder / path.name: path}):
            yield folder / path.name
        with signals_held():
            for item in sorted(folder.iterdir()):
                os.replace(item, path.parent / item.name)


@contextlib.contextmanager
def scratch_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path``, named and locked as staging is, removed with what it holds when the block
    ends, however it ends (and by a later run where this one is killed outright). What killed runs left staged
    beside ``path`` is removed first (:func:`remove_abandoned_staging`)."""
    path = Path(path)
    remove_abandoned_staging(path.parent)
    with contextlib.ExitStack() as stack:
        with signals_held():  # a signal between making the folder and entering its block would leave it behind
            folder = stack.enter_context(tempfile.TemporaryDirectory(**_staging_affixes(path)))
        fd = os.open(folder, os.O_RDONLY)
        try:
            _lock(fd)
            yield Path(folder)
        finally:
            os.close(fd)


TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the block runs, then deliver them to the handlers they had.

    Moving an export and its data file into place takes two renames; a signal handled between them
    would leave the new file beside the old one's data. Signals that are ignored stay ignored. Python
    runs signal handlers in the main thread only, so elsewhere the block runs as it is. A termination
    whose exception a finaliser dropped (:func:`terminations_raised`) is raised before the block runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _raise_swallowed_termination()
    held: list[int] = []
    previous = {}
    for signum in TERMINATION_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:  # None: set outside Python, cannot be put back
            previous[signum] = signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the command is, so that it unwinds as Ctrl-C does: its staging removed.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way takes it for a failure.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The termination signals that arrived while terminations_raised() was in force. Python runs a signal's handler
# wherever the main thread is, and an exception raised inside a finaliser (an object's __del__, a weakref
# callback) is printed and dropped: kept here, such a signal is raised again before anything is committed.
_terminations_arrived: list[int] = []


def _raise_swallowed_termination() -> None:
    if _terminations_arrived:
        raise Terminated(_terminations_arrived[0])


@contextlib.contextmanager
def terminations_raised() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` instead of ending the process at once.

    Only signals left at their default action are taken over (a SIGHUP that ``nohup`` ignores stays
    ignored), and their handlers are put back afterwards. Once one has arrived both are ignored, so that
    a second one cannot cut the clean-up short. One that arrived inside a finaliser, where Python drops
    what a handler raises, is raised again when the next output is moved into place
    (:func:`signals_held`) and when the block ends: a run told to stop never commits or succeeds.
    """
    if threading.current_thread() is not threading.main_thread():  # Python handles signals in the main thread only
        yield
        return
    taken = [s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_DFL]

    def terminate(signum: int, frame: Any) -> None:
        for s in taken:
            signal.signal(s, signal.SIG_IGN)
        _terminations_arrived.append(signum)
        raise Terminated(signum)

    unraisable_hook = sys.unraisablehook

    def drop_terminated(unraisable: Any) -> None:  # it is raised again; its dropped copy is not news to the user
        if not isinstance(unraisable.exc_value, Terminated):
            unraisable_hook(unraisable)

    sys.unraisablehook = drop_terminated
    for s in taken:
        signal.signal(s, terminate)
    try:
        yield
        _raise_swallowed_termination()
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_DFL)
        sys.unraisablehook = unraisable_hook
        _terminations_arrived.clear()
