"""Write a converted model for PyTorch: an ExportedProgram (``.pt2``) or its weights alone (``.safetensors``).

The FCN way of working fine-tunes a converted classifier in PyTorch, so ``fcconv
convert`` also writes what PyTorch reads:

* ``NAME.pt2``: the converted module's export form (:func:`~fcconv.export.as_export_module`,
  plain convolutions) as a ``torch.export`` program with free batch and spatial
  axes, each spatial axis from the native size up;
* ``NAME.safetensors``: the converted module's state_dict (the first fully
  connected layer as a k×k kernel), rebuilt by converting the architecture again
  and loading it (``fcconv.convert(arch(), shape).load_state_dict(...)``).

Both carry the same fcconv metadata as an ONNX export (:func:`~fcconv.metadata.fcconv_metadata`,
the probe output, the weights' digest), so that ``fcconv verify`` and ``fcconv check``
read them: in the program's archive as ``extra/fcconv_metadata.json``, in the
safetensors header's ``__metadata__``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import logging
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fcconv.archive import load_exported_program
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.export import as_export_module
from fcconv.files import (
    check_archive_sizes,
    check_readable,
    is_program_file,
    is_weights_file,
    read_member,
)
from fcconv.metadata import SPATIAL_AXIS_NAMES, conversion_options, metadata_input_shape
from fcconv.sizes import batched_shape, spatial_size, spatial_start
from fcconv.traceable import traceable_form
from fcconv.weights_digest import digest_metadata, state_dict_digest

__all__ = [
    "METADATA_MEMBER",
    "ProgramModel",
    "export_program",
    "is_program_file",
    "is_weights_file",
    "load_weights_into",
    "read_program_metadata",
    "read_weights_metadata",
    "state_dict_digest",
    "rebuild",
    "save_program",
    "save_weights",
]

METADATA_MEMBER = "fcconv_metadata.json"  # torch.export.save's extra_files: stored under the archive's extra/
METADATA_LIMIT = 16 << 20  # far above what fcconv writes (a digest per weight); larger is refused unread
# --- ExportedProgram --------------------------------------------------------------------------------


def export_program(converted: nn.Module, input_shape: Sequence[int]) -> torch.export.ExportedProgram:
    """``converted`` as a ``torch.export`` program whose batch and spatial axes are free.

    Each spatial axis is free from the native size up, the batch from 1 up. The sizes
    are declared as torch.export's unbacked shape variables (:func:`_free_axes`): a
    map that is 1 wide at the native size and wider above it (the head's output, a
    video model's time axis) has a size that may or may not be 1, and with a
    variable backed by the traced example the tracer would fix that choice to the
    example's. The program is then run at batch 1 on the native size, where a
    runtime check the tracer placed on the sizes would show. Raises
    :class:`~fcconv.errors.NotConvertibleError` naming torch's reason when the
    program cannot have free axes.
    """
    input_shape = tuple(int(s) for s in input_shape)
    native = spatial_size(input_shape)
    module = program_form(converted).eval()
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    # seeded: torch.export.save writes the example into the archive, which is then the same on every run
    example_shape = batched_shape(input_shape, [n + n // 2 + 1 for n in native], 2)
    example = torch.randn(example_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    logging.disable(logging.CRITICAL)  # the tracer logs its failures before raising them
    try:  # and prints the graph it had traced so far: the refusal below says why in one line
        with contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(module, (example,), dynamic_shapes=_free_axes(module, input_shape))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means the program cannot have free axes
        raise NotConvertibleError(
            "the converted model cannot be exported as a program with free spatial axes: "
            f"torch.export says {_export_failure(exc)}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    try:
        with torch.inference_mode():
            program.module()(torch.zeros((1, *input_shape), dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - a guard the tracer placed on the sizes
        raise NotConvertibleError(
            "the exported program does not run at batch 1 at the native "
            f"{'×'.join(map(str, native))} ({_first_line(exc)}): torch.export fixed an axis while tracing"
        ) from None
    return program


def _free_axes(module: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """The ``dynamic_shapes`` of ``module``'s input: the batch from 1 up, each spatial axis from the native size up.

    As torch.export's ``ShapesSpec`` of unbacked shape variables (torch 2.14 and later), which the tracer
    never fixes to the example's sizes: where a size decides a branch it cannot take for every size, the
    export fails and says where.
    """
    from torch.fx.experimental.dynamic_spec import ParamsSpec, ShapesSpec, ShapeVar, TensorSpec

    native, first = spatial_size(input_shape), spatial_start(input_shape)
    names = SPATIAL_AXIS_NAMES.get(len(native), tuple(f"axis{2 + i}" for i in range(len(native))))
    channels = input_shape[: first - 1]  # none in a channel-free (N, L) input
    sizes = [ShapeVar(name, min=n) for name, n in zip(names, native)]
    spec = TensorSpec([ShapeVar("batch", min=1), *channels, *sizes])
    (parameter, *_) = inspect.signature(module.forward).parameters.values()
    named = {"*args": [spec]} if parameter.kind is inspect.Parameter.VAR_POSITIONAL else {parameter.name: spec}
    return ShapesSpec(ParamsSpec(named))


def program_form(converted: nn.Module) -> nn.Module:
    """The module :func:`export_program` traces: the export form (plain convolutions) in its traceable form
    (:func:`fcconv.traceable.traceable_form`, ceil-mode max poolings included). Parameters are shared with
    ``converted`` and the state_dict's names are the same."""
    return traceable_form(as_export_module(converted), ceil_mode_pools=True)


def save_program(program: torch.export.ExportedProgram, path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Save ``program`` at ``path`` (a ``.pt2`` name) with ``metadata`` and its weights' digest in the archive.

    Written in place: ``fcconv convert`` stages it beside the target and moves it there once verified.
    """
    path = Path(path)
    meta = {**metadata, **digest_metadata(program.state_dict)}
    with _graphs_numbered(program):
        torch.export.save(program, path, extra_files={METADATA_MEMBER: json.dumps(meta, sort_keys=True)})
    return path


@contextlib.contextmanager
def _graphs_numbered(program: torch.export.ExportedProgram) -> Iterator[None]:
    """The program's node provenance with each graph named by a number in order of appearance, not by its address.

    torch.fx records where each node came from (``node.meta["from_node"]``) by the ``id()`` of its graph,
    an address that differs from one process to the next, and ``torch.export.save`` writes it into the
    archive. Numbered, the same conversion saves the same bytes; nodes from one graph still share a number.
    The program's own provenance is put back afterwards.
    """
    from torch.fx.traceback import NodeSource

    numbers: dict[int, int] = {}

    def numbered(source: dict[str, Any]) -> dict[str, Any]:
        graph = source.get("graph_id", -1)  # -1: no graph recorded
        graph = graph if graph == -1 else numbers.setdefault(graph, len(numbers))
        return {**source, "graph_id": graph, "from_node": [numbered(s) for s in source.get("from_node") or []]}

    saved = []
    for module in program.graph_module.modules():
        for node in module.graph.nodes if isinstance(module, fx.GraphModule) else ():
            if node.meta.get("from_node"):
                saved.append((node, node.meta["from_node"]))
                node.meta["from_node"] = [NodeSource._from_dict(numbered(s.to_dict())) for s in node.meta["from_node"]]
    try:
        yield
    finally:
        for node, sources in saved:
            node.meta["from_node"] = sources


def read_program_metadata(path: str | Path) -> dict[str, str]:
    """The fcconv metadata saved in a program's archive (empty when it has none), without loading the program."""
    path = Path(path)
    check_readable(path)
    check_archive_sizes(path, path)
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith(f"extra/{METADATA_MEMBER}")), None)
            text = read_member(archive, member, limit=METADATA_LIMIT + 1).decode("utf-8") if member else ""
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not an ExportedProgram archive ({_first_line(exc)})") from None
    if not text:
        return {}
    if len(text) > METADATA_LIMIT:
        raise BadInputError(
            f"{path}: its {METADATA_MEMBER} is larger than {METADATA_LIMIT:,} bytes, more than fcconv writes"
        )
    try:
        meta = json.loads(text)
    except ValueError:
        raise BadInputError(f"{path}: its {METADATA_MEMBER} is not JSON") from None
    if not isinstance(meta, dict):
        raise BadInputError(f"{path}: its {METADATA_MEMBER} is not a JSON object")
    return {str(k): str(v) for k, v in meta.items()}


class ProgramModel:
    """A saved ExportedProgram, loaded and called like a module on tensors, with its fcconv metadata.

    The archive is checked first, as ``fcconv convert`` checks an ExportedProgram it
    reads: a member that would unpickle code is refused unless ``trust``.
    """

    def __init__(self, path: str | Path, *, trust: bool = False) -> None:
        path = Path(path)
        self.metadata = read_program_metadata(path)
        self.program = load_exported_program(path, trust=trust)
        self.module = self.program.module()
        floats = [t for t in self.program.state_dict.values() if t.is_floating_point()]
        self.dtype = floats[0].dtype if floats else torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x.cpu())  # the program was saved on the CPU

    def spatial_ranges(self, first: int = 2) -> list[tuple[int, int | None]]:
        """Each spatial axis's (lowest, highest) size the program accepts; None for no upper bound (or a fixed axis).

        ``first`` is the input's first spatial axis: 1 for a channel-free (N, L) input."""
        (placeholder,) = [
            n for n in self.program.graph.nodes
            if n.op == "placeholder" and n.name in self.program.graph_signature.user_inputs
        ]  # fmt: skip
        ranges = []
        for size in placeholder.meta["val"].shape[first:]:
            if isinstance(size, int):
                ranges.append((size, size))
                continue
            bounds = self.program.range_constraints.get(size.node.expr)
            lower = int(bounds.lower) if bounds is not None else 0
            upper = None if bounds is None or bounds.upper.is_finite is False else _integer(bounds.upper)
            ranges.append((lower, upper))
        return ranges


# --- state_dict -------------------------------------------------------------------------------------


def save_weights(converted: nn.Module, path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Save ``converted``'s state_dict at ``path`` as safetensors, ``metadata`` and the digest in its header.

    Written in place: ``fcconv convert`` stages it beside the target and moves it there once verified.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors, seen = {}, set()
    for name, tensor in converted.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[name] = tensor.clone() if key in seen else tensor  # safetensors refuses tensors sharing memory
        seen.add(key)
    meta = {**metadata, **digest_metadata(tensors)}
    save_file(tensors, str(path), metadata=meta)
    _sort_header_metadata(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates its files private; the result gets the usual permissions
    return path


def _sort_header_metadata(path: Path) -> None:
    """Put the ``__metadata__`` of the safetensors file at ``path`` in key order, in place.

    safetensors writes it in the order of a hash map seeded anew in each process, so the same weights and
    metadata gave different bytes on every run. Sorted, the header is the same JSON in another order: it
    keeps its length (padded with spaces, as safetensors pads it) and every tensor its offset.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:  # always, with the same escapes as safetensors' serde_json
            f.seek(8)
            f.write(text.ljust(length, b" "))


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata (empty when it has none), without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def load_weights_into(converted: nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """``converted`` with ``tensors`` in place of its weights (strict: every name, every shape).

    The tensors are assigned, not copied, so the module ``converted`` was made from
    (which shares its weights) keeps its own. A state_dict that does not fit raises
    :class:`~fcconv.errors.BadInputError` naming the first difference.
    """
    expected = converted.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        what = f"{missing[0]!r} is missing" if missing else f"{unexpected[0]!r} is not in the converted module"
        raise BadInputError(f"{source} does not fit the converted module: {what}")
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise BadInputError(
                f"{source} does not fit the converted module: {name!r} is "
                f"{'×'.join(map(str, tensors[name].shape))}, the module's {'×'.join(map(str, tensor.shape))}"
            )
    converted.load_state_dict(dict(tensors), strict=True, assign=True)
    return converted


def rebuild(
    original: nn.Module,
    input_shape: Sequence[int],
    meta: Mapping[str, str],
    path: str | Path,
    *,
    consume_original: bool = False,
) -> nn.Module:
    """The module a ``.safetensors`` file was written from: ``original`` converted as recorded, with the file's weights.

    ``original`` is the model as loaded; ``fcconv.logits`` and ``fcconv.until`` in ``meta`` end it as the
    conversion did. The converted module shares its trunk's layers with ``original``, so ``original`` is
    copied first, unless ``consume_original``: then its layers take the file's weights in place of its own,
    which saves a copy of the weights for a caller that has no further use for ``original``."""

    from fcconv.rewrite import convert

    options = conversion_options(meta)
    source = original if consume_original else copy.deepcopy(original)
    converted = convert(source, tuple(input_shape), dense=options.dense,
                        pool=None if options.pool == "none" else options.pool, pointwise=options.pointwise,
                        logits=options.logits, until=options.until)  # fmt: skip
    return load_weights_into(converted, read_weights(path), path).eval()


def _integer(value: Any) -> int | None:
    """A sympy bound as an int; None for infinity (the symbolic-shape ``int_oo`` included)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _export_failure(exc: BaseException) -> str:
    """torch.export's reason in one line: its first line, its first listed violation and the graph node it was
    executing, without the advice."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0].split(" For more information")[0] if lines else type(exc).__name__
    listed = next((line.removeprefix("- ") for line in lines[1:] if line.startswith("- ")), "")
    node = next((line.split()[2] for line in lines if line.startswith("While executing %")), "")
    where = f"(while computing {node.removeprefix('%')})" if node else ""
    return " ".join(f"{first} {listed} {where}".split())[:400]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def spatial_shape(meta: Mapping[str, str]) -> Any:
    """The native input shape the metadata records, or None."""
    return metadata_input_shape(meta)
