"""A digest of an ONNX file's weights, so that a later check can tell that none changed since export.

Each initializer is hashed on its own (SHA-256 over its name, data type, dims and
raw bytes), and the model's digest is SHA-256 over those digests in the order of
the initializers' names. The export computes it while it streams the weights to
the file, with no second copy of them; ``fcconv check`` recomputes it from the
file, and the per-initializer digests let it name the first initializer that
changed. It detects changes, it does not authenticate: whoever can edit the
weights can edit the metadata too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

__all__ = ["EACH_DIGITS", "WeightsDigest", "initializer_digest"]

EACH_DIGITS = 16  # hex digits kept per initializer in the metadata: enough to tell a change, short for large models


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
