"""The members of a ``.pt2`` that ``torch.export.load`` would unpickle, and loading a program within them.

The zip bounds every archive must meet first (:func:`~fcconv.files.check_archive_sizes`,
:func:`~fcconv.files.read_member`) live in :mod:`fcconv.files`, which needs no torch.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fcconv.errors import BadInputError, reason
from fcconv.files import check_archive_sizes, is_exported_program, read_member

__all__ = [
    "check_archive_sizes",
    "check_exported_program",
    "is_exported_program",
    "load_exported_program",
    "members_torch_export_unpickles",
    "read_member",
    "weights_only_unpickling",
]

CODE_SUFFIXES = (".so", ".dll", ".dylib", ".py", ".pyc", ".cubin", ".ptx")

# The members of an archive from before torch 2.8, which torch.export.load still reads with full
# unpickling as a fallback whenever the current format fails to load with a RuntimeError.
OLD_FORMAT_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")


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
