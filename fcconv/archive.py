"""Zip archives read within bounds, and the members of a ``.pt2`` that ``torch.export.load`` would unpickle.

Checkpoints written by ``torch.save`` and programs written by ``torch.export.save`` are
zip archives. Both torch's reader and Python's ``zipfile`` size their buffers from the
sizes the archive declares, so an archive whose members declare far more than the file
could hold (a zip bomb: a few megabytes inflating to gigabytes) is refused before any
member is read, and every member fcconv reads itself is read up to its declared size only.

``torch.export.load`` falls back to full unpickling for some members (sample inputs that
are not plain tensors, weights and constants marked ``use_pickle``, legacy weight files,
opaque objects), which runs code from the file. :func:`check_exported_program` lists those
members the way torch's own loader finds them, through torch's own archive reader and its
own reading of the payload configs, and requires each to load with ``weights_only=True``
whatever its first bytes. ``tests/io/test_trust_boundary.py`` pins this list against what the
installed torch actually unpickles.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from fcconv.errors import BadInputError, reason

__all__ = [
    "check_archive_sizes",
    "check_exported_program",
    "is_exported_program",
    "load_exported_program",
    "members_torch_export_unpickles",
    "read_member",
    "weights_only_unpickling",
]

# torch writes its archives uncompressed, so their members declare about the file's own size;
# a recompressed archive of weights shrinks little. Members that together declare more than
# this many times the file's size (plus a little, for tiny files) are not a checkpoint.
MAX_EXPANSION = 32
EXPANSION_SLACK = 1 << 20

CODE_SUFFIXES = (".so", ".dll", ".dylib", ".py", ".pyc", ".cubin", ".ptx")

# The members of an archive from before torch 2.8, which torch.export.load still reads with full
# unpickling as a fallback whenever the current format fails to load with a RuntimeError.
OLD_FORMAT_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")


def check_archive_sizes(source: str | Path | IO[bytes], name: str | Path, size: int | None = None) -> None:
    """Refuse a zip archive whose members declare more bytes than is plausible for its size.

    ``source`` is the archive (a path or a binary file object) and ``name`` what to call it
    in the message; ``size`` its length in bytes (read from the file when not given). A
    stored member must declare the same size compressed and uncompressed, and no two
    members may share a name (two readers could pick different ones).
    """
    if size is None:
        size = os.stat(source).st_size if isinstance(source, (str, Path)) else _length(source)
    try:
        with zipfile.ZipFile(source) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise BadInputError(f"{name} is not a readable zip archive ({reason(exc)})") from None
    declared = 0
    seen: set[str] = set()
    for info in infos:
        if info.filename in seen:
            raise BadInputError(f"{name} holds two members named {info.filename}; it was not read")
        seen.add(info.filename)
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise BadInputError(
                f"{name}: member {info.filename} declares {info.file_size:,} bytes stored in {info.compress_size:,}; "
                "it was not read"
            )
        declared += info.file_size
    bound = MAX_EXPANSION * size + EXPANSION_SLACK
    if declared > bound:
        raise BadInputError(
            f"{name} is a {size:,}-byte archive whose members claim {declared:,} bytes, more than {MAX_EXPANSION} "
            "times its size: not a checkpoint (a zip bomb?); it was not read"
        )


def _length(stream: IO[bytes]) -> int:
    position = stream.tell()
    stream.seek(0, os.SEEK_END)
    length = stream.tell()
    stream.seek(position)
    return length


def read_member(archive: zipfile.ZipFile, member: str, limit: int | None = None) -> bytes:
    """The bytes of ``member``, never more than it declares (or than ``limit``, when given).

    zipfile stops inflating at the declared size and checks the CRC there, so a member
    that inflates past what it declares fails instead of filling memory.
    """
    info = archive.getinfo(member)
    with archive.open(info) as handle:
        return handle.read(info.file_size if limit is None else min(limit, info.file_size))


def is_exported_program(path: Path) -> bool:
    """A ``torch.export.save`` archive: a zip whose ``archive_format`` member says ``pt2``."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            marker = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "archive_format"), None)
            return marker is not None and read_member(archive, marker, limit=16).strip() == b"pt2"
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError):
        return False


def members_torch_export_unpickles(path: str | Path) -> list[tuple[str, str]]:
    """Every member ``torch.export.load`` may unpickle, as (record name, what it holds), found as torch finds them.

    Record names are as torch's archive reader gives them (without the archive's root
    folder), except the old-format members, which torch's fallback reads with Python's
    zipfile under their full names. Raises :class:`BadInputError` for members that
    torch would unpickle with plain ``pickle`` (opaque objects, TorchBind objects) or
    load as compiled code (AOTInductor packages): those are never plain tensors.
    """
    from torch.export.pt2_archive._package import PT2ArchiveReader

    found: list[tuple[str, str]] = []
    try:
        _add_current_format_pickles(PT2ArchiveReader(os.fspath(path)), path, found)
    except RuntimeError:
        pass  # torch.export.load falls back to the old format, below, keeping what it has unpickled so far
    with zipfile.ZipFile(path) as archive:
        found.extend((name, "old-format data") for name in archive.namelist() if name in OLD_FORMAT_PICKLES)
    return found


def _add_current_format_pickles(reader: Any, path: str | Path, found: list[tuple[str, str]]) -> None:
    """Add to ``found`` the members torch's ``load_pt2`` unpickles, in its order, read with its reader and configs."""
    from torch.export.pt2_archive import constants
    from torch.export.pt2_archive._package import _load_payload_config

    records = reader.get_file_names()
    code = next((r for r in records if r.startswith(constants.AOTINDUCTOR_DIR) or r.endswith(CODE_SUFFIXES)), None)
    if code is not None:
        raise BadInputError(
            f"{path} holds compiled or Python code ({code}); it was not loaded: pass --trust if you trust its source"
        )
    prefix, suffix = constants.MODELS_FILENAME_FORMAT.split("{}")
    models = [r[len(prefix) : -len(suffix)] for r in records if r.startswith(prefix) and r.endswith(suffix)]
    for model in models:
        found.append((constants.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), "sample inputs"))
        legacy = f"{constants.WEIGHTS_DIR}{model}.pt"
        if legacy in records:
            found.append((legacy, "weights"))
        else:
            config = constants.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model)
            if config in records:
                for fqn, entry in _load_payload_config(reader, config).config.items():
                    if entry.use_pickle:
                        found.append((os.path.join(constants.WEIGHTS_DIR, entry.path_name), f"weight {fqn}"))
        legacy = f"{constants.CONSTANTS_DIR}{model}.pt"
        if legacy in records:
            found.append((legacy, "constants"))
            continue
        config = constants.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model)
        if config not in records:
            continue
        for fqn, entry in _load_payload_config(reader, config).config.items():
            if entry.path_name.startswith(constants.TENSOR_CONSTANT_FILENAME_PREFIX):
                if entry.use_pickle:
                    found.append((os.path.join(constants.CONSTANTS_DIR, entry.path_name), f"constant {fqn}"))
            elif entry.path_name.startswith(
                (constants.CUSTOM_OBJ_FILENAME_PREFIX, constants.OPAQUE_OBJ_FILENAME_PREFIX)
            ):
                raise BadInputError(
                    f"{path}: constant {fqn} is a pickled Python object ({entry.path_name}); unpickling it could run "
                    "code from the file, so it was not loaded: pass --trust if you trust its source"
                )


def check_exported_program(path: str | Path) -> None:
    """Refuse a ``.pt2`` unless every member ``torch.export.load`` may unpickle loads with ``weights_only=True``.

    Raises :class:`BadInputError` (one line, naming the member and what it holds) for a
    pickled object, compiled code, an implausibly large or malformed archive.
    """
    path = Path(path)
    check_archive_sizes(path, path)
    try:
        members = members_torch_export_unpickles(path)
        with zipfile.ZipFile(path) as archive:
            # torch's reader names records without the archive's root folder
            full_names = {name.split("/", 1)[-1]: name for name in archive.namelist()}
            for record, what in members:
                if record not in full_names:
                    continue  # torch fails on a missing member before unpickling anything
                data = read_member(archive, full_names[record])
                _check_plain_tensors(data, f"{path}: {record} ({what})")
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed archive or config fails in many ways, all of them bad input
        raise BadInputError(f"{path} is not a readable ExportedProgram archive ({reason(exc)})") from None


def _check_plain_tensors(data: bytes, what: str) -> None:
    """Load ``data`` as torch.load would, with ``weights_only=True``; refuse anything else."""
    stream = io.BytesIO(data)
    if zipfile.is_zipfile(stream):
        check_archive_sizes(stream, what, len(data))
    stream.seek(0)
    try:
        torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything but plain tensors and containers is refused
        held = refused_global(str(exc))
        held = f"a pickled {held}" if held else "data that is not plain tensors"
        raise BadInputError(
            f"{what} holds {held}; unpickling it could run code from the file, so it was not loaded: "
            "pass --trust if you trust its source"
        ) from None


def refused_global(message: str) -> str | None:
    """The Python global a weights-only load refused (e.g. torchvision.models.vgg.VGG), if any."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1).rstrip(".") if found else None


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Make every ``torch.load`` in the block load with ``weights_only=True``, whatever its caller asked.

    A second line behind :func:`check_exported_program` while ``torch.export.load`` runs:
    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call.
    """
    saved = {
        key: os.environ.pop(key, None) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def load_exported_program(path: str | Path, *, trust: bool = False) -> Any:
    """``torch.export.load(path)``, after :func:`check_exported_program` unless ``trust`` (the sizes its members
    claim are checked either way, :func:`check_archive_sizes`).

    Raises :class:`BadInputError` in one line for an archive that is refused or cannot be loaded.
    """
    import logging

    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if trust:
        check_archive_sizes(path, path)
    else:
        check_exported_program(path)
        guard = weights_only_unpickling()
    logging.disable(logging.CRITICAL)  # torch.export.load logs a traceback for some corrupted archives
    try:
        with guard:
            return torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - corrupted archives raise many kinds of error
        raise BadInputError(f"{path} is not a loadable ExportedProgram ({reason(exc)})") from None
    finally:
        logging.disable(logging.NOTSET)
