"""``fcconv map``: a converted model's dense map of an input of any size, exactly, tile by tile (:mod:`fcconv.mapping`)."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import check_output
from fcconv.pipeline.events import Note, Progress, Reporter
from fcconv.pipeline.results import MapResult
from fcconv.sizes import parse_counts
from fcconv.tiling import tile_per_axis

SCHEDULER_TIMEOUT = 10  # seconds a scheduler address has to answer


def map_file(
    model: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    tile: str | int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    arch: str | None = None,
    input_shape: str | None = None,
    stride: str | int | None = None,
    trust: bool = False,
    progress: Progress | None = None,
) -> MapResult:
    """Score every window of ``source`` with ``model`` and write the map (K, *positions) to ``output`` (``.npy``),
    as ``fcconv map`` does.

    ``model`` is an ONNX export of ``fcconv convert``, or a checkpoint (``arch``, ``input_shape``, ``trust`` as
    ``convert`` reads them), converted first as ``convert --dense`` (with ``stride``, à trous) converts it, into a
    temporary folder, and verified: a conversion that does not match leaves the result's ``written`` False (the
    command's exit 1) and nothing written.

    The input is cut into tiles of at most ``tile`` input pixels per axis (one value, or one per axis) that overlap by
    the extent each map position reads, measured on the model, and are aligned to the map's grid, so that the
    map equals one pass over the whole input. Dask runs the tiles: on ``workers`` threads of this machine, or on
    the Dask cluster whose scheduler is at ``scheduler`` (``tcp://HOST:PORT``; the model and the input must be
    readable there at the same paths). Where memory keeps the default tiles far smaller than the extent they
    share with their neighbours, the model is cut into parts after each downsampling, each mapping the last
    one's output through a file in a scratch folder beside ``output`` (:mod:`fcconv.map_parts`; not on a cluster
    or with ``tile``). The map is written as tiles finish, staged beside ``output`` and moved onto it at the end,
    so an interrupted run leaves nothing under that name.
    Raises :class:`~fcconv.errors.BadInputError` (exit 2) before any tile runs.
    """
    model, source, output, report = Path(model), Path(source), Path(output), Reporter(progress)
    check_output(output, ".npy", "-o", (model, source))
    if workers is not None and workers < 1:
        raise BadInputError(f"--workers {workers}: give at least 1")
    sizes = None if tile is None else parse_counts(tile, "--tile", "1024, or 64,512,512")
    if not source.exists():
        raise BadInputError(f"{source}: no such file")
    if model.suffix.lower() == ".onnx":
        if any(given is not None for given in (arch, input_shape, stride)) or trust:
            raise BadInputError("--arch, --input-shape, --stride and --trust are for a checkpoint; an export is mapped "
                                "as it was converted")  # fmt: skip
        return _map_export(model, source, output, sizes, scheduler, workers, report)
    import tempfile

    from fcconv.pipeline.convert import convert_file

    with tempfile.TemporaryDirectory(prefix="fcconv-map-") as folder:
        converted = Path(folder) / f"{model.name.split('.')[0]}.fcn.onnx"
        result = convert_file(model, converted, arch=arch, input_shape=input_shape, dense=True, stride=stride,
                              trust=trust, progress=progress)  # fmt: skip
        if not result.written:
            return MapResult(output, (), 0, written=False, report=result.report)
        return _map_export(converted, source, output, sizes, scheduler, workers, report)


def _map_export(
    model: Path, source: Path, output: Path, sizes: tuple[int, ...] | None, scheduler: str | None,
    workers: int | None, report: Reporter,
) -> MapResult:  # fmt: skip
    """The map of ``source`` by the export ``model``: its metadata read, the input opened, the tiles run."""
    from fcconv.map_parts import describe_parts, needs_parts, plan_parts
    from fcconv.mapping import TILE_BUDGET, describe, forget_sessions, open_input, plan_map
    from fcconv.staging import scratch_folder

    meta = _metadata(model)
    native = tuple(int(s) for s in meta["fcconv.input_shape"].split(","))
    channels, rank = native[0], len(native) - 1
    preprocess = json.loads(meta["fcconv.preprocess"]) if meta.get("fcconv.preprocess") else None
    array = open_input(source, channels, rank, preprocess)
    if array.shape[0] != channels or len(array.shape) != len(native):
        raise BadInputError(
            f"{source}: {'×'.join(map(str, array.shape))} values (C, *S); the model reads {channels} channels and "
            f"{rank} spatial axes"
        )
    if sizes is not None:  # refused before the extent is measured
        sizes = tile_per_axis(sizes, rank)
    client = _client(scheduler) if scheduler else None
    try:
        with contextlib.ExitStack() as stack:
            with report.stage("extent", "Measuring what each map position reads…"):
                # on a cluster, the workers' memory is not this machine's: the budget is the default one
                budget = TILE_BUDGET if client is not None else None
                plan = plan_map(str(model.resolve()), array, native[1:], sizes, workers=workers, budget=budget)
            report(Note(describe(plan)))
            plans = [plan]
            # a model cut into parts maps through files on this machine's disk: not on a cluster, and not where
            # --tile bounds the model's tiles
            if client is None and sizes is None and needs_parts(plan):
                folder = stack.enter_context(scratch_folder(output))
                with report.stage("extent", "Cutting the model into parts, measuring what each reads…"):
                    plans = plan_parts(plan, native, folder, workers=workers) or [plan]
                stack.callback(forget_sessions, [p.model for p in plans] if len(plans) > 1 else [])
                report(Note(describe_parts(plans) if len(plans) > 1 else "the model has no cut that a map can use, "
                            "or the disk no room for the tensors at its cuts: mapped whole"))  # fmt: skip
            written = _run(plans, output, client, workers, report)
    finally:
        if client is not None:
            client.close()
    return MapResult(output, plan.shape, sum(len(p.tiles) for p in plans), written)


def _metadata(model: Path) -> dict[str, str]:
    """The export's fcconv metadata, which says its native shape, total stride and receptive field."""
    import onnx

    from fcconv.files import check_readable

    check_readable(model, "model")
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - not an ONNX file
        raise BadInputError(f"{model}: not an ONNX model ({' '.join(str(exc).split())[:120]})") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    needed = ("fcconv.input_shape", "fcconv.total_stride", "fcconv.receptive_field")
    if any(key not in meta for key in needed) or not all(meta[k][:1].isdigit() for k in needed[1:]):
        raise BadInputError(
            f"{model}: no score map to tile: fcconv map reads an export of fcconv convert whose metadata records "
            "its native shape, total stride and receptive field (one converted with --pool has none)"
        )
    return meta


def _client(address: str) -> Any:
    """A Dask client of the scheduler at ``address``; refused in one line when it does not answer."""
    from distributed import Client

    try:
        return Client(address, timeout=SCHEDULER_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a scheduler that does not answer, or an address that is none
        text = " ".join(str(exc).split())[:160]
        raise BadInputError(f"--scheduler {address}: no Dask scheduler answers there ({text})") from exc


def _run(plans: list[Any], output: Path, client: Any, workers: int | None, report: Reporter) -> bool:
    """Every tile of every part run and written, the parts' outputs to the files the next parts read, the map into
    its staged file, moved onto ``output`` when all are written."""
    from fcconv.mapping import forget_sessions
    from fcconv.staging import staged_path

    clock = _MapClock(plans)
    with staged_path(output) as staged:
        for k, plan in enumerate(plans):
            target = Path(plans[k + 1].input.path) if k + 1 < len(plans) else staged
            part = f" (part {k + 1} of {len(plans)})" if len(plans) > 1 else ""
            text = f"Mapping {Path(plans[0].input.path).name}{part}"
            _run_plan(plan, target, client, workers, report, text, clock.part(k))
            if k:  # the part's input, the last part's output, is read
                Path(plan.input.path).unlink()
            if len(plans) > 1:
                forget_sessions([plan.model])
    return True


class _MapClock:
    """The whole map's rate and time left, across its parts: each part's share of the work is its multiply-adds
    (:func:`fcconv.mapping.plan_work`; its tiles' input values where they cannot be counted), and a tile's share
    of its part's is its share of the part's positions. A map in one part reads as positions done against time."""

    def __init__(self, plans: list[Any]) -> None:
        from fcconv.mapping import plan_work

        works = [plan_work(plan) for plan in plans] if len(plans) > 1 else [plans[0].positions]
        if any(not work for work in works):
            works = [sum(math.prod(b - a for a, b in t.input) for t in p.tiles) * p.input.shape[0] for p in plans]
        self.works, self.total, self.positions = works, sum(works), plans[-1].positions
        self.done, self.started, self.lock = 0.0, time.monotonic(), threading.Lock()

    def part(self, k: int) -> Any:
        """``finished(tile, plan)`` for part ``k``: the map's (positions per second, seconds left) once it is done."""

        def finished(tile: Any, plan: Any) -> tuple[float, float]:
            with self.lock:
                self.done += self.works[k] * tile.positions / plan.positions
                elapsed = max(time.monotonic() - self.started, 1e-9)
                share = min(1.0, self.done / self.total)
                return self.positions * share / elapsed, elapsed * (1 - share) / max(share, 1e-12)

        return finished


def _run_plan(
    plan: Any, target: Path, client: Any, workers: int | None, report: Reporter, text: str, timed: Any
) -> None:
    """One plan's tiles run in the plan's order and written into the ``.npy`` map at ``target``; ``timed(tile,
    plan)`` gives the map's rate and time left (:class:`_MapClock`) as each tile is written."""
    from fcconv.mapping import map_writer, run_tile, run_tiles

    done, lock = [0], threading.Lock()
    with report.stage("map", text, len(plan.tiles), unit="tiles") as advance, map_writer(target, plan.shape) as write:

        def finished(tile: Any, scores: Any) -> None:
            write(tile, scores)
            rate, left = timed(tile, plan)
            with lock:
                done[0] += 1
                advance(done[0], text=f"{text}: {rate:,.0f} positions/s, {left:,.0f} s left")

        if client is None:
            run_tiles(plan, finished, workers)
        else:
            from distributed import as_completed

            futures = {
                client.submit(run_tile, plan.model, plan.input, tile, pure=False, retries=3, priority=-k): tile
                for k, tile in enumerate(plan.tiles)  # in the plan's order, as on threads
            }
            for future in as_completed(futures):
                finished(futures[future], future.result())
