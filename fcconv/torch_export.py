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
import torch.nn.functional as F
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

    As torch.export's ``ShapesSpec`` of unbacked shape variables, which the tracer never fixes to the
    example's sizes: where a size decides a branch it cannot take for every size, the export fails and
    says where. A torch without ``ShapesSpec`` gets ``torch.export.Dim``s, backed by the example, with
    which a map that may be 1 wide fixes its width and the export fails saying so.
    """
    native, first = spatial_size(input_shape), spatial_start(input_shape)
    names = SPATIAL_AXIS_NAMES.get(len(native), tuple(f"axis{2 + i}" for i in range(len(native))))
    try:
        from torch.fx.experimental.dynamic_spec import ParamsSpec, ShapesSpec, ShapeVar, TensorSpec
    except ImportError:
        from torch.export import Dim

        return (
            {0: Dim("batch", min=1), **{first + i: Dim(name, min=n) for i, (name, n) in enumerate(zip(names, native))}},
        )
    channels = input_shape[: first - 1]  # none in a channel-free (N, L) input
    sizes = [ShapeVar(name, min=n) for name, n in zip(names, native)]
    spec = TensorSpec([ShapeVar("batch", min=1), *channels, *sizes])
    (parameter, *_) = inspect.signature(module.forward).parameters.values()
    named = {"*args": [spec]} if parameter.kind is inspect.Parameter.VAR_POSITIONAL else {parameter.name: spec}
    return ShapesSpec(ParamsSpec(named))


class MaxPool1dAs2d(nn.Module):
    """``nn.MaxPool1d`` computed as a 2D max pooling over a height-1 map: the same values.

    torch.export fixes the length of a 1D max pooling's input to the traced one
    (its ATen implementation reads the size in C++), and not a 2D one's.
    """

    def __init__(self, pool: nn.MaxPool1d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        kernel, stride, padding, dilation = (_single(v) for v in (p.kernel_size, p.stride, p.padding, p.dilation))
        y = max_pool(x.unsqueeze(-2), (1, kernel), (1, stride), (0, padding), (1, dilation), p.ceil_mode)
        return y.squeeze(-2)


class CeilModeMaxPool(nn.Module):
    """``nn.MaxPool2d`` or ``nn.MaxPool3d`` with ``ceil_mode`` (SqueezeNet's, GoogLeNet's), computed by
    :func:`max_pool`: the same values, with the count of windows a program keeps at every size."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, rank = self.pool, 2 if isinstance(self.pool, nn.MaxPool2d) else 3
        kernel, stride, padding, dilation = (_tuple(v, rank) for v in (p.kernel_size, p.stride, p.padding, p.dilation))
        return max_pool(x, kernel, stride, padding, dilation, True)


def max_pool(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    ceil_mode: bool,
) -> torch.Tensor:
    """A 2D or 3D max pooling (by the kernel's rank); in ceil mode as a floor-mode one of ``x`` padded with -inf.

    PyTorch counts a ceil-mode pooling's windows with a branch in Python (one window less where the last
    would start past the input and its near padding), which fixes the count to the traced size's. Here the
    count is the smaller of the two counts that branch chooses between, a value a program keeps; ``x`` is
    padded to take that many windows in floor mode. Every window holds a cell of ``x``, so the padding
    never wins: the same values as the ceil-mode pooling.
    """
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool3d
    if not ceil_mode:
        return pool(x, kernel, stride, padding, dilation)
    pads = []
    for size, k, s, p, d in zip(x.shape[-len(kernel) :], kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        count = torch.sym_min((size + 2 * p - span + s - 1) // s + 1, (size + p - 1) // s + 1)
        pads.append((p, torch.sym_max((count - 1) * s + span - size - p, 0)))  # less than a stride too many
    flat = [side for near_far in reversed(pads) for side in near_far]  # F.pad lists the last axis first
    return pool(F.pad(x, flat, value=float("-inf")), kernel, stride, 0, dilation)


def _single(value: Any) -> int:
    """A 1D layer's size, given as an int or a 1-tuple."""
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    """A layer's size per axis, given as an int or a tuple."""
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def program_form(converted: nn.Module) -> nn.Module:
    """The module :func:`export_program` traces: the export form (plain convolutions), 1D max poolings as 2D ones,
    ceil-mode max poolings as padded floor-mode ones (:func:`max_pool`), and each adaptive average pooling given
    a contiguous input.

    ATen's adaptive average pooling asks its input's layout; for a map laid out channels-last (ConvNeXt's
    blocks and Swin's permutes leave one) the answer reads whether the batch is above 1, which a free batch
    does not say, and the export would fail. A contiguous copy answers without it: the same values.
    Parameters are shared with ``converted`` and the state_dict's names are the same.
    """
    module = as_export_module(converted)
    if not isinstance(module, fx.GraphModule):
        return module
    modules = dict(module.named_modules())
    pools = [
        name for name, m in modules.items()
        if not getattr(m, "return_indices", True)
        and (type(m) is nn.MaxPool1d or (type(m) in (nn.MaxPool2d, nn.MaxPool3d) and m.ceil_mode))
    ]  # fmt: skip
    averages = [node for node in module.graph.nodes if _adaptive_average(node, modules)]
    if not pools and not averages:
        return module
    # A new GraphModule has its own containers, and graph where it is edited (the layers themselves are shared):
    # ``converted`` is left be.
    graph = copy.deepcopy(module.graph) if averages else module.graph
    for node in [n for n in graph.nodes if averages and _adaptive_average(n, modules)]:
        with graph.inserting_before(node):
            node.replace_input_with(node.args[0], graph.call_method("contiguous", (node.args[0],)))
    module = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name in pools:
        pool = module.get_submodule(name)
        module.set_submodule(
            name, (MaxPool1dAs2d if type(pool) is nn.MaxPool1d else CeilModeMaxPool)(pool), strict=False
        )
    return module


def _adaptive_average(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` is an adaptive average pooling of its first argument (a module or a function)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))
    return (
        node.op == "call_function"
        and node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
        and bool(node.args)
    )


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
    import copy

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
