"""A digest of an ONNX file's weights, so that a later check can tell that none changed since export.

Each initializer is hashed on its own (SHA-256 over its name, data type, dims and
raw bytes), and the model's digest is SHA-256 over those digests in the order of
the initializers' names. The export computes it while it streams the weights to
the file, with no second copy of them; ``fcconv check`` recomputes it from the
file, and the per-initializer digests let it name the first initializer that
changed. A state_dict (a ``.pt2`` program's, a safetensors file's) is digested the
same way, each tensor under the ONNX data type of its dtype, so that a digest means
the same whatever the format. It detects changes, it does not authenticate: whoever
can edit the weights can edit the metadata too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fcconv.errors import BadInputError
from fcconv.external_data import external_data, map_external_data
from fcconv.metadata import EACH_DIGEST_KEY, WEIGHTS_DIGEST_KEY

__all__ = [
    "EACH_DIGITS",
    "WeightsDigest",
    "digest_metadata",
    "initializer_digest",
    "onnx_data_type",
    "onnx_weights_digest",
    "state_dict_digest",
    "tensor_bytes",
]

EACH_DIGITS = 16  # hex digits kept per initializer in the metadata: enough to tell a change, short for large models
ONNX_DATA_TYPES = {  # onnx.TensorProto.DataType of each torch dtype fcconv writes, by the dtype's name
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16,
    "float64": onnx.TensorProto.DOUBLE,
    "int64": onnx.TensorProto.INT64,
    "int32": onnx.TensorProto.INT32,
    "int8": onnx.TensorProto.INT8,
    "uint8": onnx.TensorProto.UINT8,
    "bool": onnx.TensorProto.BOOL,
}


def initializer_digest(name: str, data_type: int, dims: Sequence[int], chunks: Iterable[bytes | memoryview]) -> bytes:
    """SHA-256 of one initializer: each field preceded by its length (8 bytes, little-endian), the bytes last.

    ``data_type`` is the ``onnx.TensorProto.DataType`` number; ``chunks`` are the tensor's
    row-major little-endian bytes (what ``TensorProto.raw_data`` holds), in pieces.
    """
    chunks = list(chunks)
    digest = hashlib.sha256()
    for field in (name.encode("utf-8"), str(int(data_type)).encode("ascii"), ",".join(map(str, dims)).encode("ascii")):
        digest.update(len(field).to_bytes(8, "little"))
        digest.update(field)
    digest.update(sum(memoryview(c).nbytes for c in chunks).to_bytes(8, "little"))
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


class WeightsDigest:
    """The digests of a model's initializers, added one at a time, and the model's digest over them."""

    def __init__(self) -> None:
        self.each: dict[str, bytes] = {}

    def add(self, name: str, data_type: int, dims: Sequence[int], chunks: Iterable[bytes | memoryview]) -> None:
        self.each[name] = initializer_digest(name, data_type, dims, chunks)

    def hexdigest(self) -> str:
        """SHA-256 over the initializers' digests, in the order of their names' UTF-8 bytes."""
        digest = hashlib.sha256()
        for name in sorted(self.each, key=lambda n: n.encode("utf-8")):
            digest.update(self.each[name])
        return digest.hexdigest()

    def each_json(self) -> str:
        """``{name: first EACH_DIGITS hex digits of its digest}``, in the order the initializers were added."""
        return json.dumps({name: d.hex()[:EACH_DIGITS] for name, d in self.each.items()}, separators=(",", ":"))

    def metadata(self) -> dict[str, str]:
        """The metadata entries that record this digest: the model's and each tensor's."""
        return {WEIGHTS_DIGEST_KEY: self.hexdigest(), EACH_DIGEST_KEY: self.each_json()}


def onnx_data_type(name: str, tensor: Any) -> int:
    """The ``onnx.TensorProto.DataType`` of a torch tensor's dtype; BadInputError for one ONNX cannot hold."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in ONNX_DATA_TYPES:
        raise BadInputError(f"weight {name!r} has dtype {tensor.dtype}, which fcconv cannot write to ONNX")
    return ONNX_DATA_TYPES[dtype]


def tensor_bytes(tensor: Any) -> memoryview:
    """A torch tensor's bytes in row-major, little-endian order, without a copy when it is contiguous on the CPU."""
    import torch  # a tensor to read means torch is installed

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def state_dict_digest(tensors: Mapping[str, Any]) -> WeightsDigest:
    """The digest of a state_dict: each tensor by its name, dtype (as its ONNX data type), shape and bytes."""
    digest = WeightsDigest()
    for name, tensor in tensors.items():
        digest.add(name, onnx_data_type(name, tensor), list(tensor.shape), [tensor_bytes(tensor)])
    return digest


def digest_metadata(tensors: Mapping[str, Any]) -> dict[str, str]:
    """The digest metadata entries of a state_dict."""
    return state_dict_digest(tensors).metadata()


def onnx_weights_digest(model: Any, path: Path | None = None) -> WeightsDigest:
    """:mod:`fcconv.weights_digest` of ``model``'s initializers (inline, or in external data beside ``path``)."""
    digest = WeightsDigest()
    with ExitStack() as stack:
        for tensor in model.graph.initializer:
            digest.add(tensor.name, tensor.data_type, list(tensor.dims), [_raw_bytes(tensor, path, stack)])
    return digest


def _raw_bytes(tensor: Any, path: Path | None, stack: ExitStack) -> bytes | memoryview:
    """The initializer's row-major little-endian bytes, from the file itself (its window memory-mapped when external)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return map_external_data(external_data(tensor, path), stack)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
