"""What a file is, and whether fcconv may read it: one place for format detection and the bounds on inputs.

fcconv reads ONNX models, ``torch.export`` programs (``.pt2``), ``torch.save``
checkpoints (zip archives, or legacy pickles), safetensors files and JSON model
cards. :func:`file_format` names which one a file is, from its suffix or its first
bytes, without running anything from it. The checks here refuse, before anything
parses a file, what no reader should open: a special file that would block, an
empty one, a zip whose members claim more bytes than the file could hold, a model
card larger than any card. The checks that need torch's own archive reader (what
``torch.export.load`` would unpickle) live in :mod:`fcconv.archive`. This module
imports neither torch nor safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import onnx

from fcconv.errors import BadInputError, reason

__all__ = [
    "MODEL_CARD_LIMIT",
    "check_archive_sizes",
    "check_readable",
    "file_format",
    "file_sha256",
    "is_exported_program",
    "is_onnx_file",
    "is_program_file",
    "is_safetensors",
    "is_weights_file",
    "read_member",
    "read_model_card",
]

PROGRAM_SUFFIX, WEIGHTS_SUFFIX = ".pt2", ".safetensors"
MODEL_CARD_LIMIT = 16 << 20  # a card naming 20,000 classes is under 1 MB; larger is not read


def read_model_card(path: Path) -> dict[str, Any]:
    """The JSON model card beside ``path`` (same stem, ``.json``), or {}."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return {}
    card = read_json_object(card_path, "model card")
    card["_dir"] = str(card_path.parent.resolve())
    return card


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a model card, a model's configuration), refused in one line when it is none.

    Read only up to :data:`MODEL_CARD_LIMIT`: such a file is a few kilobytes, and one that is not is not one.
    """
    if path.stat().st_size > MODEL_CARD_LIMIT:
        raise BadInputError(f"{path}: a {what} of {path.stat().st_size:,} bytes is not a {what}")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise BadInputError(f"{path}: {what} is not a JSON object")
    return values


def check_readable(path: Path, kind: str = "checkpoint") -> None:
    """Refuse what is not a readable, non-empty regular file, before anything opens it.

    A named pipe, socket or device would block or never end if read, so only the file's
    status is looked at.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(status.st_mode):
        raise BadInputError(f"{path}: is a directory, not a {kind}")
    if not stat.S_ISREG(status.st_mode):
        raise BadInputError(f"{path}: is {_special_file_kind(status.st_mode)}, not a regular file; it was not read")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{path}: permission denied")
    if status.st_size == 0:
        raise BadInputError(f"{path}: file is empty")


def _special_file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


# torch writes its archives uncompressed, so their members declare about the file's own size;
# a recompressed archive of weights shrinks little. Members that together declare more than
# this many times the file's size (plus a little, for tiny files) are not a checkpoint.
MAX_EXPANSION = 32
EXPANSION_SLACK = 1 << 20


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


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def is_onnx_file(path: str | Path) -> bool:
    """True for a ``.onnx`` path, or a file whose bytes parse as an ONNX model whatever its suffix."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    if not path.is_file():  # a named pipe would block the read below; the loader refuses it
        return False
    try:
        with open(path, "rb") as f:
            start = f.read(3)
    except OSError:
        return False
    # onnx writes ir_version (field 1, a small varint) first, then another field of the ModelProto.
    if len(start) < 3 or start[0] != 0x08 or not 1 <= start[1] <= 32 or start[2] not in b"\x12\x1a\x22\x2a\x32\x3a\x42":
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as a ModelProto: not ONNX
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def is_program_file(path: str | Path) -> bool:
    """A ``torch.export.save`` archive, by its ``.pt2`` suffix or its content."""
    path = Path(path)
    return path.suffix.lower() == PROGRAM_SUFFIX or is_exported_program(path)


def is_weights_file(path: str | Path) -> bool:
    """A safetensors file, by its ``.safetensors`` suffix or its header."""
    path = Path(path)
    return path.suffix.lower() == WEIGHTS_SUFFIX or (path.is_file() and is_safetensors(path))


def file_format(path: str | Path) -> str:
    """What the model file at ``path`` is: ``onnx``, ``pt2``, ``safetensors``, ``zip checkpoint`` or ``pickle``.

    Decided in that order, by content (and the ``.onnx`` and ``.safetensors``
    suffixes); a file that is none of the others is read as a legacy (pre-zip)
    ``torch.save`` pickle, which only ``weights_only`` unpickling (or ``--trust``)
    may open. The file must pass :func:`check_readable`.
    """
    path = Path(path)
    check_readable(path, "model")
    if is_onnx_file(path):
        return "onnx"
    if is_exported_program(path):
        return "pt2"
    if is_safetensors(path):
        return "safetensors"
    if zipfile.is_zipfile(path):
        return "zip checkpoint"
    return "pickle"


def file_sha256(path: str | Path, on_progress: Callable[[int, int], None] | None = None) -> str:
    """SHA-256 of the file at ``path``, read in 1 MB blocks; ``on_progress(bytes read, file size)`` after each."""
    digest, done, size = hashlib.sha256(), 0, os.path.getsize(path)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            done += len(block)
            if on_progress is not None:
                on_progress(done, size)
    return digest.hexdigest()
