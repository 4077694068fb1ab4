"""Refuse a run that cannot fit in this machine's memory before any of it is allocated.

How much a run at an input size needs is estimated from the model's activations at
that size, found without allocating them: a traced (torch.fx) model is run on fake
tensors, which carry shapes and nothing else, and an ONNX model's shapes come from
ONNX shape inference. Each activation is held from the step that makes it to the
last step that reads it (views and in-place results share their input's memory),
and the largest sum of activations held at one step is the model's peak. The
weights, the allocator's slack and the scratch space of convolutions come on top,
so every estimate here is a floor: a size refused cannot fit, and one accepted may
still be tight. torch is imported only to estimate a traced model, so that ``fcconv
check`` estimates an ONNX model's runs without it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from fcconv.errors import BadInputError
from fcconv.onnx_shapes import inferred_shapes, shapes_only
from fcconv.sizes import batched_shape

if TYPE_CHECKING:
    import torch

__all__ = ["activation_bytes", "machine_memory", "refuse_beyond_memory", "run_bytes", "verification_bytes"]

# ONNX operators whose output onnxruntime may hand out as the input's own buffer.
_ONNX_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


def machine_memory() -> int:
    """Bytes of physical memory, or the container's limit (cgroup v2 or v1) where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" where no limit is set
            total = min(total, int(text))
    return total


def _peak(lifetimes: Iterable[tuple[int, int, int]]) -> int:
    """The largest sum of ``bytes`` held at one step, for (first step, last step, bytes) lifetimes."""
    changes: dict[int, int] = {}
    for first, last, size in lifetimes:
        changes[first] = changes.get(first, 0) + size
        changes[last + 1] = changes.get(last + 1, 0) - size
    held = peak = 0
    for step in sorted(changes):
        held += changes[step]
        peak = max(peak, held)
    return peak


def _graph_activations(module: torch.fx.GraphModule, shape: Sequence[int]) -> tuple[int, tuple[int, ...]] | None:
    """Peak activation bytes of ``module`` on an input of ``shape`` (the input itself not counted), and the shape
    of its first output; None where the graph does not run on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._pytree import tree_leaves

    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        sample = torch.empty(tuple(shape), dtype=dtype, device=device)
    nodes = list(module.graph.nodes)
    step = {node: i for i, node in enumerate(nodes)}
    lifetimes: dict[Any, list[int]] = {}  # storage -> [first step, last step, bytes]

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            with fake_mode:
                result = super().run_node(node)
            if node.op != "placeholder":
                last = max((step[user] for user in node.users), default=step[node])
                for tensor in tree_leaves(result):
                    if isinstance(tensor, FakeTensor):
                        storage = tensor.untyped_storage()
                        held = lifetimes.setdefault(StorageWeakRef(storage), [step[node], last, storage.nbytes()])
                        held[1] = max(held[1], last)
            return result

    # an operator that refuses the size makes fake tensors log a traceback; here it only means no estimate
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        from fcconv.capture import state_kept

        with torch.inference_mode(), state_kept(module):
            output = Recorder(module).run(sample)
    except Exception:  # noqa: BLE001 - an operator fake tensors cannot run: no estimate
        return None
    finally:
        logger.disabled = disabled
    first = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)
    return _peak(map(tuple, lifetimes.values())), tuple(first.shape) if first is not None else ()


def _onnx_activations(model: Any, shape: Sequence[int], itemsize: int) -> tuple[int, tuple[int, ...]] | None:
    """Like :func:`_graph_activations` for an ONNX model (a ModelProto or a file), by ONNX shape inference; values
    whose shape inference leaves open count nothing."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    input_name = next(i.name for i in graph.input if i.name not in initializers)
    shapes = inferred_shapes(shapes_only(model), input_name, tuple(shape))
    if not shapes:
        return None
    last_read = {name: len(graph.node) for name in (o.name for o in graph.output)}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_read[name] = max(last_read.get(name, i), i)
    buffer_of: dict[str, str] = {}  # value -> the value whose memory it is
    lifetimes: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            dims = shapes.get(name)
            if node.op_type in _ONNX_VIEWS and node.input[0] in buffer_of:
                buffer_of[name] = buffer_of[node.input[0]]
            elif dims is not None and all(d is not None for d in dims):
                buffer_of[name] = name
                lifetimes[name] = [i, i, math.prod(dims) * itemsize]
            if name in buffer_of and buffer_of[name] in lifetimes:
                held = lifetimes[buffer_of[name]]
                held[1] = max(held[1], last_read.get(name, i))
    output = shapes.get(graph.output[0].name) or ()
    return _peak(map(tuple, lifetimes.values())), tuple(d or 0 for d in output)


def activation_bytes(
    model: Any, shape: Sequence[int], itemsize: int, *, channels_last: bool = False
) -> tuple[int, tuple[int, ...]] | None:
    """Peak activation bytes of ``model`` run on an input of ``shape`` (N, C, *spatial), and its first output's shape.

    ``model`` is a traced module, an ONNX model or file (``channels_last`` when it takes
    N×H×W×C), or an ``OnnxRunner`` of one. None where the model is none of these or its
    shapes cannot be found.
    """
    torch = sys.modules.get("torch")  # a traced module exists only where torch is imported
    if torch is not None and isinstance(model, torch.fx.GraphModule):
        return _graph_activations(model, shape)
    if hasattr(model, "source") and hasattr(model, "nhwc_input"):  # an OnnxRunner
        model, channels_last = model.source, model.nhwc_input
    if channels_last:
        shape = (shape[0], *shape[2:], shape[1])
    if isinstance(model, (str, Path)) or type(model).__name__ == "ModelProto":
        return _onnx_activations(model, shape, itemsize)
    return None


def run_bytes(
    model: Any,
    input_shape: Sequence[int],
    sizes: Sequence[Sequence[int]],
    batch: int,
    itemsize: int,
    *,
    channels_last: bool = False,
) -> list[tuple[tuple[int, ...], int]]:
    """What running ``model`` on a batch of ``batch`` inputs needs at each size, one size at a time: the input and
    the activations (:func:`activation_bytes`; the input alone where they cannot be found). Largest last."""
    needs = []
    for size in sizes:
        size = tuple(int(s) for s in size)
        shape = batched_shape(input_shape, size, batch)
        run = activation_bytes(model, shape, itemsize, channels_last=channels_last)
        needs.append((size, math.prod(shape) * itemsize + (run[0] if run else 0)))
    return sorted(needs, key=lambda need: need[1])


def verification_bytes(
    features: Any,
    input_shape: Sequence[int],
    sizes: Sequence[Sequence[int]],
    window: Sequence[int] | None,
    stride: Sequence[int],
    batch: int,
    itemsize: int,
) -> list[tuple[tuple[int, ...], int]]:
    """What a verification (:func:`fcconv.verify.reference_outputs`, then the comparison) needs at each size.

    The random inputs of every size are kept to the end: ``batch`` samples each. At one
    size the original runs one sample at a time: ``features`` (the trunk) at its peak,
    then the sliding window copies every window of the feature map into rows, twice
    over while they are stacked and reshaped. The converted model then runs the same
    trunk on the whole batch at once. The two phases do not overlap. Returns (size,
    bytes needed while verifying at it, with every size's inputs), largest last.
    """
    kept = sum(math.prod(batched_shape(input_shape, size, batch)) * itemsize for size in sizes)
    needs = []
    for size in sizes:
        size = tuple(int(s) for s in size)
        trunk = activation_bytes(features, batched_shape(input_shape, size, 1), itemsize)
        if trunk is None:  # no estimate of the activations: the inputs alone are the floor
            needs.append((size, kept))
            continue
        peak, feature_shape = trunk
        rows = 0
        if window is not None and len(feature_shape) == len(window) + 2:
            positions = math.prod(max(0, (f - w) // s + 1) for f, w, s in zip(feature_shape[2:], window, stride))
            rows = positions * feature_shape[1] * math.prod(window) * itemsize
        original = max(peak, math.prod(feature_shape) * itemsize + 2 * rows)
        needs.append((size, kept + max(original, batch * peak)))
    return sorted(needs, key=lambda need: need[1])


def refuse_beyond_memory(needs: Sequence[tuple[tuple[int, ...], int]], doing: str, remedy: str) -> None:
    """Raise :class:`BadInputError` when the largest of ``needs`` ((size, bytes)) is more than the machine has.

    The line reads "``doing`` at SIZE needs at least N GB of memory, more than the M GB
    this machine has; ``remedy``".
    """
    if not needs:
        return
    size, needed = max(needs, key=lambda need: need[1])
    limit = machine_memory()
    if needed > limit:
        shown = "×".join(map(str, size))
        raise BadInputError(
            f"{doing} at {shown} needs at least {_gigabytes(needed)} of memory, more than the {_gigabytes(limit)} "
            f"this machine has; {remedy}"
        )


def _gigabytes(size: int) -> str:
    gb = size / 1e9
    return f"{gb:,.1f} GB" if gb < 10 else f"{gb:,.0f} GB"
