"""An ONNX initializer's external data: read only from a regular file in the model's own folder, and only its window.

onnx and onnxruntime refuse external data whose ``location`` is absolute or leads out of the model's folder
(through ``..`` or a symbolic link), and an offset or length past the end of the file. fcconv reads external data
itself too (``fcconv check`` hashes it), by the same rules: otherwise a crafted model could make it open any file
and report, through the digest's verdict, on that file's content.
"""

from __future__ import annotations

import mmap
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError

__all__ = [
    "PROTOBUF_LIMIT",
    "ExternalData",
    "check_external_data",
    "check_file_external_data",
    "external_data",
    "external_data_path",
    "map_external_data",
]

PROTOBUF_LIMIT = 2**31  # a serialized protobuf message (one ONNX file) must stay below 2 GiB


def external_data_path(path: str | Path) -> Path:
    """Where the weights of an ONNX file fcconv writes with external data lie: ``NAME.onnx.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


@dataclass(frozen=True)
class ExternalData:
    """Where one initializer's bytes lie: ``length`` bytes from ``offset`` of ``file``, inside the model's folder."""

    file: Path
    offset: int
    length: int


def external_data(tensor: Any, model_path: str | Path) -> ExternalData:
    """Where ``tensor``'s external data lies beside the ONNX file ``model_path``.

    Raises :class:`~fcconv.errors.BadInputError`, naming the initializer and its
    location, when the data lies outside the model's folder, is missing or not a
    regular file, or its window reaches past the end of the file.
    """
    from onnx.external_data_helper import ExternalDataInfo

    model_path = Path(model_path)
    try:
        info = ExternalDataInfo(tensor)
    except ValueError as exc:  # an offset or length that is not a count of bytes
        raise BadInputError(f"{model_path}: initializer {tensor.name!r}: {exc}") from None
    location = info.location
    where = f"initializer {tensor.name!r} has its data in {location!r}"
    folder = model_path.parent.resolve()
    file = (model_path.parent / location).resolve()
    if not location or os.path.isabs(location) or not file.is_relative_to(folder):
        raise BadInputError(
            f"{model_path}: {where}, which leads outside the model's folder (as onnx and onnxruntime refuse it)"
        )
    if not file.exists():
        raise BadInputError(f"{model_path}: its weights file {location} is missing beside it ({where})")
    if not file.is_file():
        raise BadInputError(f"{model_path}: {where}, which is not a regular file")
    size = file.stat().st_size
    offset = int(info.offset or 0)
    length = size - offset if info.length is None else int(info.length)
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(
            f"{model_path}: {where}, at bytes {offset} to {offset + length}, past the end of the file ({size} bytes)"
        )
    return ExternalData(file, offset, length)


def check_external_data(model: Any, model_path: str | Path) -> None:
    """Refuse ``model`` (read without its external data) when any initializer's data may not be read, see
    :func:`external_data`."""
    import onnx

    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external_data(tensor, model_path)


def check_file_external_data(path: str | Path) -> None:
    """:func:`check_external_data` for the ONNX file at ``path``, before onnxruntime or onnx reads it (older versions
    of either follow any location); a file that does not parse is left to its reader's own error."""
    import onnx

    model = onnx.ModelProto()
    try:
        # Parsed from a memory map, not from a bytes copy of the file: the weights of an inline model are copied once.
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            model.ParseFromString(memoryview(mapped))
    except Exception:  # noqa: BLE001 - not ONNX at all: the reader's own error says so
        return
    check_external_data(model, path)


def map_external_data(data: ExternalData, stack: ExitStack) -> memoryview | bytes:
    """The bytes of ``data``, memory-mapped until ``stack`` closes: that window of the file and no more."""
    if data.length == 0:
        return b""  # mmap would map the whole file for a length of 0
    start = data.offset - data.offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are multiples of it
    with open(data.file, "rb") as f:
        window = mmap.mmap(f.fileno(), data.offset + data.length - start, offset=start, access=mmap.ACCESS_READ)
    stack.enter_context(window)
    return memoryview(window)[data.offset - start :]
