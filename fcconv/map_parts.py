"""A map in parts: a model whose positions read far more input than its tiles can spare is cut into parts, and
each part maps the previous part's output, written to disk.

A tile recomputes the input its border positions share with the neighbouring tiles. A VGG16 position reads 404
input pixels per axis, so its 2,042-pixel tiles (all that 2 GiB of its first activations allow) compute 378 of
them again. Cut after each downsampling, each part reads only a few pixels of its own input around its step (the
borders of its 3×3 convolutions), and the later parts read smaller inputs with fewer values per input pixel,
so their tiles can be larger: the parts' tiles overlap by a few pixels where the whole model's overlapped by
hundreds. A part's output is the whole input's tensor at the cut, written to a ``.npy`` memory map and read by
the next part's tiles. The map is exact: each part's tiles give what one pass of that part over the whole tensor
gives (:mod:`fcconv.tiling`), and one pass of the parts in turn is one pass of the model.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.grid_fit import fit_output_grid
from fcconv.mapping import InputArray, MapPlan, forget_sessions, plan_map
from fcconv.onnx_shapes import inferred_element_types, inferred_shapes, onnx_output_shapes, shapes_only
from fcconv.tiling import OVERLAP_SHARE, reread_share

__all__ = ["Cut", "Part", "cuts", "describe_parts", "needs_parts", "plan_parts", "scratch_bytes", "write_parts"]

SMALLEST_PART_TILE = {1: 1 << 16, 2: 256, 3: 32}
"""Input pixels per axis of a part's default tile at least: a part reads little beyond its step, and its tiles
ran fastest small (``docs/performance.md``)."""


@dataclass(frozen=True)
class Cut:
    """A tensor the model can be cut at: the only value later nodes read from earlier ones (weights aside)."""

    name: str
    channels: int
    native: tuple[int, ...]
    """Its spatial size when the model runs at its native size."""
    stride: tuple[int, ...]
    """Input pixels per step of it, per axis."""


def cuts(model: onnx.ModelProto, native: Sequence[int], total_stride: Sequence[int]) -> list[Cut]:
    """Where ``model`` (native input (C, *S), total stride per axis) can be cut into parts that each map the last
    one's output: the first cut tensor at each larger stride, in order. Empty where there is none, or the model has
    more than one input or output."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1:
        return []
    source, rank = inputs[0], len(native) - 1
    computed = {source}  # values that depend on the input (not weights, constants, or shapes of them)
    last_read: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if any(name in computed for name in node.input):
            computed.update(name for name in node.output if name)
        for name in node.input:
            if name in computed:
                last_read[name] = i
    candidates, live = [], {source}
    for i, node in enumerate(graph.node[:-1]):
        live.update(name for name in node.output if last_read.get(name, -1) > i)
        live = {name for name in live if last_read.get(name, -1) > i}
        if len(live) == 1 and next(iter(live)) in node.output:
            candidates.append(next(iter(live)))
    if not candidates:
        return []
    light = shapes_only(model)
    types = inferred_element_types(light, source, (1, *native))
    at_native = inferred_shapes(light, source, (1, *native))
    grown = inferred_shapes(light, source, (1, native[0], *(n + t for n, t in zip(native[1:], total_stride))))
    found: list[Cut] = []
    previous = (1,) * rank
    for name in candidates:
        shape, larger = at_native.get(name), grown.get(name)
        if types.get(name) != onnx.TensorProto.FLOAT or not _whole(shape, rank) or not _whole(larger, rank):
            continue
        steps = [b - a for a, b in zip(shape[2:], larger[2:])]
        if any(step <= 0 or t % step for step, t in zip(steps, total_stride)):
            continue
        stride = tuple(t // step for step, t in zip(steps, total_stride))
        if math.prod(stride) > math.prod(previous) and all(s % p == 0 for s, p in zip(stride, previous)):
            found.append(Cut(name, shape[1], tuple(shape[2:]), stride))
            previous = stride
    return found


def _whole(shape: Any, rank: int) -> bool:
    return shape is not None and len(shape) == rank + 2 and all(isinstance(d, int) and d > 0 for d in shape)


@dataclass(frozen=True)
class Part:
    """One part of a cut model, written as an ONNX file that ``fcconv map`` reads like an export."""

    path: Path
    native: tuple[int, ...]
    """Its input's (C, *S) when the model runs at its native size."""


def write_parts(model: onnx.ModelProto, native: Sequence[int], total_stride: Sequence[int], found: Sequence[Cut],
                folder: Path) -> list[Part] | None:  # fmt: skip
    """The parts between the input, each of ``found`` and the output, written into ``folder`` with the metadata
    ``fcconv map`` reads (native shape, total stride, receptive field, fitted from its output sizes by
    :func:`fcconv.grid_fit.fit_output_grid`); None where a part's sizes do not follow
    ``floor((X - field) / stride) + 1`` at the stride its cuts give. The cuts' types are declared in ``model`` (it is changed)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    source = next(i.name for i in graph.input if i.name not in weights)
    rank = len(native) - 1
    for cut in found:  # the cut values become the parts' inputs and outputs: they need declared types
        dims = ["batch", cut.channels, *(f"{cut.name}_{axis}" for axis in range(rank))]
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(cut.name, onnx.TensorProto.FLOAT, dims))
    extractor = onnx.utils.Extractor(model)
    ends = [(source, tuple(native), (1,) * rank), *((c.name, (c.channels, *c.native), c.stride) for c in found)]
    ends.append((graph.output[0].name, None, tuple(total_stride)))
    parts = []
    for k, ((start, shape, before), (stop, _, after)) in enumerate(zip(ends, ends[1:])):
        part = extractor.extract_model([start], [stop])
        stride = tuple(a // b for a, b in zip(after, before))
        grid = fit_output_grid(onnx_output_shapes(part), shape)
        if grid is None or grid.total_stride != stride:
            return None
        field = grid.receptive_field
        for key, value in {
            "fcconv.input_shape": shape, "fcconv.total_stride": stride, "fcconv.receptive_field": field,
        }.items():  # fmt: skip
            onnx.helper.set_model_props(part, {**{p.key: p.value for p in part.metadata_props},
                                               key: ",".join(map(str, value))})  # fmt: skip
        path = folder / f"part{k}.onnx"
        large = sum(len(t.raw_data) for t in part.graph.initializer) > (1 << 30)
        onnx.save(part, str(path), save_as_external_data=large, location=f"{path.name}.data")
        parts.append(Part(path, shape))
    return parts


def needs_parts(whole: MapPlan) -> bool:
    """Whether ``whole``'s tiles are too small for their overlap: more than one tile, together reading more of the
    input again than tiles overlapping by ``OVERLAP_SHARE`` of their length per axis would, because memory
    allowed no larger tile."""
    rank = len(whole.extents)
    return len(whole.tiles) > 1 and reread_share(whole.tiles, whole.input.shape[1:]) > (1 + OVERLAP_SHARE) ** rank - 1


def plan_parts(
    whole: MapPlan, native: Sequence[int], folder: Path, *, workers: int | None = None, budget: int | None = None,
) -> list[MapPlan] | None:  # fmt: skip
    """The map ``whole`` plans, as the plans of the model's parts (native input (C, *S)), cut at :func:`cuts`: each
    reads the last one's output from ``folder`` (``cut1.npy``, …), the last gives the map. The parts are written
    into ``folder``; each plan's tiles are the default ones, at least ``SMALLEST_PART_TILE`` pixels per axis.
    None (the parts removed again) where the model has no cut, a part cannot be tiled, or ``folder``'s disk has
    no room for the tensors at two cuts at once."""
    proto = onnx.load(whole.model)
    meta = {p.key: p.value for p in proto.metadata_props}
    total_stride = tuple(int(s) for s in meta["fcconv.total_stride"].split(","))
    found = cuts(proto, native, total_stride)
    parts = write_parts(proto, native, total_stride, found, folder) if found else None
    del proto
    if not parts:
        return None
    least = SMALLEST_PART_TILE[len(native) - 1]
    plans, current = [], whole.input
    try:
        for k, part in enumerate(parts):
            plan = plan_map(str(part.path), current, part.native[1:], None, workers=workers, budget=budget,
                            least=least)  # fmt: skip
            plans.append(plan)
            current = InputArray(str(folder / f"cut{k + 1}.npy"), "npy", plan.shape)
    except (BadInputError, NotConvertibleError):  # a part that cannot be tiled: the model is mapped whole
        plans = []
    finally:
        # the tiles make their own sessions; the whole model's, which measured its extent, is not needed again
        forget_sessions([whole.model, *(str(part.path) for part in parts)])
    if not plans or plans[-1].shape != whole.shape or shutil.disk_usage(folder).free < scratch_bytes(plans):
        for part in parts:  # their disk is not held while the model is mapped whole
            for written in folder.glob(f"{part.path.name}*"):
                written.unlink()
        return None
    return plans


def scratch_bytes(plans: Sequence[MapPlan]) -> int:
    """The most disk the tensors at the cuts hold at once: one part's input and output."""
    held = [4 * math.prod(plan.shape) for plan in plans[:-1]]
    return max((a + b for a, b in zip([0, *held], held)), default=0)


def describe_parts(plans: Sequence[MapPlan]) -> str:
    """One line: the parts, their tiles, and the disk their cuts' tensors hold."""
    tiles = ", ".join(f"{len(p.tiles)} of at most {'×'.join(map(str, p.tile))}" for p in plans)
    held = scratch_bytes(plans)
    disk = f"{held / 1e9:,.2f} GB" if held >= 1e9 else f"{held / 1e6:,.1f} MB"
    return (
        f"in {len(plans)} parts, cut after each downsampling, each mapping the last one's output from disk "
        f"({disk} at most): tiles {tiles}"
    )
