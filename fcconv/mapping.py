"""``fcconv map``: the dense map of an input of any size, tile by tile, written to disk as it is made.

The input is read lazily, one tile at a time: a ``.npy`` array through a memory map, a zarr array, a TIFF
(BigTIFF, tiled or pyramidal: its full-resolution level) through tifffile's zarr view, a WAV file by frames;
only a picture Pillow reads whole is decoded at once. The tiles (:mod:`fcconv.tiling`) are scheduled by Dask:
on this machine's threads by default, or on a Dask cluster (``scheduler``), where each worker keeps one
onnxruntime session per model. The map goes into a ``.npy`` memory map or a zarr array, staged beside the
target and moved onto it when every tile is written.

Nothing here imports torch: a worker needs numpy, onnxruntime and the readers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import wave
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcconv.errors import BadInputError
from fcconv.tiling import (
    AxisExtent,
    Tile,
    balanced_tile,
    default_tile,
    measure_extent,
    output_size,
    plan_tiles,
    threads_per_tile,
    tile_per_axis,
)  # fmt: skip

__all__ = [
    "InputArray", "MapPlan", "default_tiles", "forget_sessions", "open_input", "plan_map", "plan_work", "run_tile",
    "run_tiles", "session_for", "tile_budget",
]  # fmt: skip

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}
TIFF_SUFFIXES = {".tif", ".tiff"}
TILE_BUDGET = 2 << 30
"""Bytes of activations a default tile's run may hold, as ONNX shape inference estimates them."""
SMALLEST_DEFAULT_TILE = {1: 1 << 18, 2: 2048, 3: 128}
"""Input pixels per axis of a default tile at least (about 4 M input values per channel in 2D), and of every
default tile where the model's activations cannot be estimated. A light model's tiles cost more in reading,
writing and scheduling than in their overlap: the digits sample's 2048×2048 map took 1.18–1.24× as long in
six tiles of 1036×700 as in two of 2048×1036 (2D measured; 1D and 3D as before, not measured)."""

_sessions: dict[tuple[str, int], Any] = {}
_sessions_lock = threading.Lock()


def session_for(model: str, threads: int = 1) -> Any:
    """This process's onnxruntime session of ``model`` on ``threads`` threads (one per model, thread count and
    worker), made on first use."""
    with _sessions_lock:
        if (model, threads) not in _sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 4
            _sessions[model, threads] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return _sessions[model, threads]


def forget_sessions(models: Sequence[str]) -> None:
    """Close this process's sessions of ``models`` (files about to be removed: a map's parts)."""
    with _sessions_lock:
        for key in [key for key in _sessions if key[0] in models]:
            del _sessions[key]


def tile_budget(concurrent: int) -> int:
    """Bytes of activations one of ``concurrent`` tiles run side by side may hold by default: ``TILE_BUDGET``, or
    a quarter of this machine's memory shared among them where that is less."""
    from fcconv.memory import machine_memory

    return min(TILE_BUDGET, machine_memory() // (4 * max(1, concurrent)))


def default_tiles(
    size: Sequence[int], extents: Sequence[AxisExtent], activations: Callable[[tuple[int, ...]], int | None],
    budget: int, least: int | None = None, workers: int = 1,
) -> tuple[int, ...]:  # fmt: skip
    """The default tile of ``fcconv map`` and ``fcconv heatmap``: :func:`fcconv.tiling.default_tile`, at least
    ``least`` (``SMALLEST_DEFAULT_TILE``) pixels per axis (that size where the activations cannot be estimated),
    then shaped for ``workers`` running tiles side by side (:func:`fcconv.tiling.balanced_tile`)."""
    least = least or SMALLEST_DEFAULT_TILE[len(size)]
    tile = default_tile(size, extents, activations, budget, least) or (least,) * len(size)

    def fits(shape: tuple[int, ...]) -> bool:
        needed = activations(shape)
        return needed is None or needed <= budget

    return balanced_tile(size, extents, tile, workers, fits)


@dataclass(frozen=True)
class InputArray:
    """Where an input's values come from and how they become the model's input: channels-first (C, *S)."""

    path: str
    kind: str
    """``npy``, ``zarr``, ``tiff``, ``wav`` or ``picture``."""
    shape: tuple[int, ...]
    """(C, *S), as the model reads it."""
    channels_last: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 1.0
    """Raw values are multiplied by this before ``mean`` and ``std`` (1/255 for 8-bit pictures)."""

    def read(self, slices: tuple[slice, ...]) -> np.ndarray:
        """The (C, *S) block at ``slices`` (spatial), as float32, normalised as the model expects."""
        raw = self._raw(slices)
        if self.channels_last:
            raw = np.moveaxis(raw, -1, 0)
        if raw.ndim == len(slices):
            raw = raw[None]
        values = np.array(raw, dtype=np.float32, order="C")  # the one copy: the rest is done in place
        if self.scale != 1.0:
            values *= np.float32(self.scale)
        if self.mean:
            shape = (-1, *(1,) * len(slices))
            values -= np.asarray(self.mean, np.float32).reshape(shape)
            values /= np.asarray(self.std, np.float32).reshape(shape)
        return values

    def _raw(self, slices: tuple[slice, ...]) -> np.ndarray:
        if self.kind == "npy":
            array = np.load(self.path, mmap_mode="r")
            return np.asarray(array[(Ellipsis, *slices)] if not self.channels_last else array[slices])
        if self.kind == "zarr":
            import zarr

            array = zarr.open_array(self.path, mode="r")
            return np.asarray(array[(slice(None), *slices)] if array.ndim == len(slices) + 1 else array[slices])
        if self.kind == "tiff":
            import tifffile
            import zarr

            with tifffile.TiffFile(self.path) as tif:
                store = tif.series[0].aszarr(level=0)
                array = zarr.open_array(store, mode="r")
                return np.asarray(array[slices])
        if self.kind == "wav":
            (span,) = slices
            with wave.open(self.path, "rb") as audio:
                width, channels = audio.getsampwidth(), audio.getnchannels()
                audio.setpos(span.start)
                frames = audio.readframes(span.stop - span.start)
            dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
            samples = np.frombuffer(frames, dtype=dtype).reshape(-1, channels)
            if width == 1:
                samples = samples.astype(np.int16) - 128
            return samples.T  # (C, L)
        return _picture(self.path, self.shape[0])[(slice(None), *slices)]


_pictures: dict[tuple[str, int], np.ndarray] = {}


def _picture(path: str, channels: int) -> np.ndarray:
    """A picture Pillow reads, decoded once per process, (C, H, W) uint8."""
    key = (path, channels)
    if key not in _pictures:
        from PIL import Image

        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            _pictures[key] = np.moveaxis(np.asarray(converted).reshape(converted.height, converted.width, -1), -1, 0)
    return _pictures[key]


def open_input(path: Path, channels: int, rank: int, preprocess: dict | None) -> InputArray:
    """``path`` as the model's input: its kind, its (C, *S) shape and its normalisation; refused in one line
    (:class:`BadInputError`) where it cannot be read or does not fit the model.

    Arrays (``.npy``, zarr) are the model's input values as they are; a WAV file's samples are scaled to
    [-1, 1); pictures and TIFF files are pixels / 255 (8-bit) normalised as the export's recorded
    ``preprocess`` says, as ``fcconv heatmap`` reads a picture."""
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    mean, std = _normalisation(preprocess, channels)
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r")
            shape = tuple(array.shape)
            if len(shape) == rank:
                shape = (1, *shape)
            if array.dtype.kind not in "fiub" or len(shape) != rank + 1:
                raise BadInputError(f"{path}: a {array.dtype} array of shape {array.shape}; the model reads "
                                    f"(C, {', '.join('S' * rank)}) numbers")  # fmt: skip
            return InputArray(str(path), "npy", shape)
        if suffix == ".zarr" or path.is_dir():
            import zarr

            array = zarr.open_array(str(path), mode="r")
            shape = tuple(array.shape) if array.ndim == rank + 1 else (1, *array.shape)
            return InputArray(str(path), "zarr", shape)
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(series.levels[0].shape)
            scale = 1 / 255 if series.dtype == np.uint8 else 1.0
            if len(shape) == rank:
                return InputArray(str(path), "tiff", (1, *shape), False, mean, std, scale)
            return InputArray(str(path), "tiff", (shape[-1], *shape[:-1]), True, mean, std, scale)
        if suffix == ".wav":
            with wave.open(str(path), "rb") as audio:
                length, count, width = audio.getnframes(), audio.getnchannels(), audio.getsampwidth()
            scale = 1 / {1: 128, 2: 32768, 4: 2147483648}[width]
            return InputArray(str(path), "wav", (count, length), scale=scale)
        if suffix in PICTURE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                width, height = image.size
            return InputArray(str(path), "picture", (channels, height, width), scale=1 / 255, mean=mean, std=std)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader's failure is an unreadable input
        raise BadInputError(f"{path}: cannot be read as an input ({' '.join(str(exc).split())[:200]})") from exc
    raise BadInputError(
        f"{path}: not an input fcconv map reads (.npy, .zarr, .tif/.tiff, .wav, or a picture: "
        f"{', '.join(sorted(PICTURE_SUFFIXES))})"
    )


def _normalisation(preprocess: dict | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not preprocess:
        return (), ()
    mean = tuple(float(v) for v in preprocess.get("mean", (0.0,) * channels))
    std = tuple(float(v) for v in preprocess.get("std", (1.0,) * channels))
    return mean, std


@dataclass(frozen=True)
class MapPlan:
    """One map's work: the model and input, the extent per axis, the tiles, and the map's shape (K, *positions)."""

    model: str
    input: InputArray
    extents: tuple[AxisExtent, ...]
    tiles: tuple[Tile, ...]
    shape: tuple[int, ...]
    tile: tuple[int, ...]
    """The most input pixels per axis a tile reads."""
    threads: int = 1
    """onnxruntime threads per tile: the workers shared among the tiles that run at once."""

    @property
    def positions(self) -> int:
        return math.prod(self.shape[1:])


def plan_map(
    model: str, source: InputArray, native: Sequence[int], tile: Sequence[int] | None, *,
    workers: int | None = None, budget: int | None = None, least: int | None = None,
) -> MapPlan:  # fmt: skip
    """Measure the model's extent and cut the input into tiles (:func:`fcconv.tiling.plan_tiles`).

    Without ``tile``, tiles are as large as ``budget`` bytes of activations allow (:func:`tile_budget` of
    ``workers`` by default; :func:`fcconv.tiling.default_tile`), and at least ``least`` pixels per axis
    (:func:`default_tiles`). ``workers`` threads (this machine's cores by default) are shared among the tiles
    that run at once.
    """
    workers = workers or os.cpu_count() or 1
    session = session_for(model, workers)
    name = session.get_inputs()[0].name
    channels = source.shape[0]
    rank = len(source.shape) - 1

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    meta = dict(session.get_modelmeta().custom_metadata_map)
    strides = [int(s) for s in meta["fcconv.total_stride"].split(",")]
    fields = [int(s) for s in meta["fcconv.receptive_field"].split(",")]
    for axis, (n, field) in enumerate(zip(source.shape[1:], fields)):
        if n < max(field, native[axis]):
            shown = "×".join(map(str, source.shape[1:]))
            raise BadInputError(f"the input is {shown}, smaller than the model's native size "
                                f"{'×'.join(map(str, native))}")  # fmt: skip
    extents = tuple(measure_extent(run, native, channels, strides, fields))
    size = source.shape[1:]
    if tile is None:
        tile = default_tiles(
            size, extents, _activations(model, channels), budget or tile_budget(workers), least, workers
        )
    tile = tile_per_axis(tile, rank)
    tiles = tuple(plan_tiles(size, extents, tile))
    classes = run(np.zeros((1, channels, *native), np.float32)).shape[1]
    shape = (classes, *(output_size(n, e) for n, e in zip(size, extents)))
    threads = threads_per_tile(workers, len(tiles))
    return MapPlan(model, source, extents, tiles, shape, tile, threads)


def _activations(model: str, channels: int) -> Callable[[tuple[int, ...]], int | None]:
    """The estimated activation bytes of ``model`` on one tile of each size, from ONNX shape inference."""
    import onnx

    from fcconv.memory import activation_bytes
    from fcconv.onnx_shapes import shapes_only

    light = shapes_only(onnx.load(model, load_external_data=False))

    def estimate(tile: tuple[int, ...]) -> int | None:
        found = activation_bytes(light, (1, channels, *tile), np.dtype(np.float32).itemsize)
        return found[0] if found else None

    return estimate


def plan_work(plan: MapPlan) -> int | None:
    """The multiply-adds of all of ``plan``'s tiles, as ONNX shape inference counts them at each tile's input size
    (:func:`fcconv.onnx_shapes.multiply_adds`); None where they cannot be counted. It tells how the time of a map
    in parts divides among them: VGG16's six parts at 4096×4096 ran at 96–136 G multiply-adds a second each."""
    import onnx

    from fcconv.onnx_shapes import multiply_adds, shapes_only

    proto = onnx.load(plan.model, load_external_data=False)
    light, name = shapes_only(proto), proto.graph.input[0].name
    counts: dict[tuple[int, ...], int] = {}
    for tile in plan.tiles:
        shape = tuple(b - a for a, b in tile.input)
        counts[shape] = counts.get(shape, 0) + 1
    total = 0
    for shape, count in counts.items():
        each = multiply_adds(light, name, (1, plan.input.shape[0], *shape))
        if each is None:
            return None
        total += count * each
    return total


def run_tile(model: str, source: InputArray, tile: Tile, threads: int = 1) -> np.ndarray:
    """One tile's part of the map, (K, *positions): the model on the tile's input, cut to the positions it owns."""
    session = session_for(model, threads)
    x = source.read(tile.input_slices)[None]
    scores = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    return np.ascontiguousarray(scores[(slice(None), *tile.own_slices)])


def run_tiles(
    plan: MapPlan, finished: Callable[[Tile, np.ndarray], None], workers: int | None = None,
    threads: int | None = None,
) -> None:  # fmt: skip
    """Every tile of ``plan`` run on Dask's local threads (``workers`` of them) in the plan's order, row after row,
    each on ``threads`` onnxruntime threads (the plan's share by default); ``finished(tile, scores)`` as each ends.

    Dask runs tasks that depend on nothing in the order of their keys, the last first; the tiles are named for
    it. Left to their hashed default keys they ran in no order, so that tiles sharing pages of the map file wrote
    them far apart in time and the kernel wrote those pages back between them: VGG16's first part at 8192×8192
    (a 4.3 GB map, 1,088 tiles) took 77 s so, 40 s in order, and 29 s when the map was not written.
    """
    import dask

    threads = plan.threads if threads is None else threads

    def one(tile: Tile) -> None:
        finished(tile, run_tile(plan.model, plan.input, tile, threads))

    count = len(plan.tiles)
    tasks = [
        dask.delayed(one)(tile, dask_key_name=f"fcconv-tile-{count - 1 - k:09d}") for k, tile in enumerate(plan.tiles)
    ]
    dask.compute(*tasks, scheduler="threads", num_workers=workers)


@contextlib.contextmanager
def map_writer(path: Path, shape: tuple[int, ...]) -> Iterator[Callable[[Tile, np.ndarray], None]]:
    """A function that writes one tile's scores into a new ``.npy`` map at ``path``.

    A tile that spans every axis but the first (a strip of rows, any 1D tile) lies in one run of the file per
    class and is written with ``pwrite``: the digits sample's 10 MB map took 2.3 ms so, against 11 ms through a
    memory map, whose every page is a fault. Other tiles go through a memory map of the file (a ``pwrite`` per
    row took longer still). Neither is flushed (``msync``) at the end: the page cache holds the writes for the
    file as for any other written file."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    fd = os.open(path, os.O_WRONLY) if hasattr(os, "pwrite") else None  # Windows has no pwrite
    try:
        yield functools.partial(_write, array, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _write(array: np.memmap, fd: int | None, tile: Tile, scores: np.ndarray) -> None:
    region = (slice(None), *tile.output_slices)
    if fd is None or any(b - a != n for (a, b), n in zip(tile.output[1:], array.shape[2:])):
        array[region] = scores
        return
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    step = math.prod(array.shape[2:]) * array.itemsize  # bytes from one index of the first axis to the next
    for k, values in enumerate(scores):
        data, offset = memoryview(values).cast("B"), array.offset + (k * array.shape[1] + tile.output[0][0]) * step
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written


def describe(plan: MapPlan) -> str:
    """One line: the input, the map, the tiles, and what each position reads."""

    def dims(values: Sequence[int]) -> str:
        return "×".join(map(str, values))

    spans = dims([e.span for e in plan.extents])
    before = dims([e.before for e in plan.extents])
    strides = dims([e.stride for e in plan.extents])
    return (
        f"map {dims(plan.shape[1:])} of {plan.shape[0]} classes from {dims(plan.input.shape[1:])} input values, "
        f"{len(plan.tiles)} tile{'s' * (len(plan.tiles) != 1)} of at most {dims(plan.tile)}; each position reads "
        f"{spans} input pixels, from {before} before its step ({strides} pixels apart)"
    )
