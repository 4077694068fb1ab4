"""``fcconv map``: the dense map of an input of any size, tile by tile, equal to one pass over the whole input.

The contract: for 1D, 2D and 3D exports, padded trunks and unpadded ones, and a map à trous, the map written tile
by tile equals the export run once on the whole input (within float32 rounding), whatever the tile size, down to
the smallest the model's extent allows; on a two-worker Dask cluster it is byte-identical to the map made on
this machine's threads; every input kind reads as the model expects it; and bad input is refused in one line
with exit 2 before any work, leaving nothing behind.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import wave

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO
from torch import nn

from fcconv.errors import BadInputError
from fcconv.pipeline import map_file

SAMPLES = REPO / "sample_models"


def fcconv(*args):
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The sample classifiers converted (shapes: padded 2D; digits: unpadded 2D; signals: 1D; shapes at stride 2),
    and a small padded volume classifier."""
    folder = tmp_path_factory.mktemp("exports")
    made = {}
    for name, sample, extra in [
        ("shapes", "shapes_vgg", []),
        ("digits", "digits_lenet", []),
        ("signals", "signals_net", []),
        ("shapes-s2", "shapes_vgg", ["--stride", "2"]),
    ]:
        out = folder / f"{name}.onnx"
        run = fcconv("convert", SAMPLES / f"{sample}.pt", "-o", out, "--quiet", *extra)
        assert run.returncode == 0, run.stderr
        made[name] = out
    import fcconv as package
    from fcconv.export import export_onnx

    torch.manual_seed(0)
    volume = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 4, 3, padding=1), nn.MaxPool3d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2 * 2, 3),
    ).eval()  # fmt: skip
    made["volume"] = folder / "volume.onnx"
    export_onnx(package.convert(volume, (1, 8, 8, 8)), made["volume"], (1, 8, 8, 8))
    made["residual"] = folder / "residual.onnx"
    export_onnx(package.convert(Residual().eval(), (3, 32, 32)), made["residual"], (3, 32, 32))
    return made


class Residual(nn.Module):
    """A padded stem at stride 2, a residual block whose input is read again by its sum, a pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(torch.relu(self.block(x) + x)))


def one_pass(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x[None].astype(np.float32)})[0][0]


CASES = [
    ("shapes", (3, 157, 203), ["100", "64,150", "60"]),
    ("digits", (1, 97, 131), ["64", "40,90"]),
    ("shapes-s2", (3, 101, 77), ["70", "56"]),
    ("signals", (1, 9000), ["2048", "1000"]),
    ("volume", (1, 27, 33, 22), ["20", "18,30,40"]),
]


@pytest.mark.parametrize(("name", "shape", "tiles"), CASES, ids=[c[0] for c in CASES])
def test_the_tiled_map_equals_one_pass_over_the_whole_input(exports, tmp_path, name, shape, tiles):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    source = tmp_path / "input.npy"
    np.save(source, x)
    expected = one_pass(exports[name], x)
    for tile in tiles:
        out = tmp_path / f"map-{tile.replace(',', '-')}.npy"
        result = map_file(exports[name], source, out, tile=tile)
        assert result.tiles > 1 and result.shape == expected.shape
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


def test_the_tiles_cover_the_map_once_and_start_on_its_grid(exports, tmp_path):
    from fcconv.mapping import open_input, plan_map

    x = np.zeros((3, 157, 203), np.float32)
    np.save(tmp_path / "x.npy", x)
    plan = plan_map(str(exports["shapes"]), open_input(tmp_path / "x.npy", 3, 2, None), (32, 32), (60, 60))
    covered = np.zeros(plan.shape[1:], int)
    for tile in plan.tiles:
        covered[tile.output_slices] += 1
        assert all(start % e.stride == 0 for (start, _), e in zip(tile.input, plan.extents))
    assert (covered == 1).all()
    # a padded trunk reads past its unpadded receptive field, on both sides
    assert all(e.before > 0 and e.span > e.receptive_field for e in plan.extents)


WRITTEN = [
    ((3000,), (700,)),  # 1D: every tile one run per class
    ((90, 120), (40, 120)),  # strips of whole rows: one run per class
    ((90, 120), (40, 50)),  # a grid: through the memory map
    ((30, 40, 50), (12, 40, 50)),  # slabs of whole planes
    ((30, 40, 50), (12, 20, 50)),
]


def test_the_extent_is_measured_however_far_past_the_receptive_field_it_reaches():
    """A 1D model whose positions (2 apart, 8 input pixels the least input) each read 40 pixels from 15 before
    their step, zero-padded: the first probes (two fields long, then four) are too short for the watched
    position's interval, and the probe grows until it holds it."""
    from fcconv.tiling import AxisExtent, measure_extent

    weights = np.random.default_rng(1).random(40) + 0.5
    probes = []

    def run(x: np.ndarray) -> np.ndarray:
        probes.append(x.shape[-1])
        padded = np.pad(x, ((0, 0), (0, 0), (15, 40)))
        count = (x.shape[-1] - 8) // 2 + 1
        return np.stack([padded[..., 2 * m : 2 * m + 40] @ weights for m in range(count)], axis=-1)

    assert measure_extent(run, (8,), 1, [2], [8]) == [AxisExtent(2, 8, 15, 40)]
    assert sorted(set(probes)) == [16, 32, 64]


@pytest.mark.parametrize(("size", "tile"), WRITTEN, ids=["1d", "strips", "grid", "slabs", "3d grid"])
def test_the_map_file_holds_every_tiles_scores_where_they_belong(tmp_path, size, tile):
    from fcconv.mapping import map_writer
    from fcconv.tiling import AxisExtent, output_size, plan_tiles

    extent = AxisExtent(stride=2, receptive_field=6, before=1, span=8)
    extents = (extent,) * len(size)
    expected = np.random.default_rng(0).standard_normal((3, *(output_size(n, extent) for n in size)), np.float32)
    tiles = plan_tiles(size, extents, tile)
    assert len(tiles) > 1
    with map_writer(tmp_path / "map.npy", expected.shape) as write:
        for t in reversed(tiles):  # in any order, and from views that are not contiguous
            write(t, expected[(slice(None), *t.output_slices)])
    np.testing.assert_array_equal(np.load(tmp_path / "map.npy"), expected)


def test_default_tiles_are_as_large_as_their_memory_allows_up_to_a_small_overlap():
    from fcconv.tiling import OVERLAP_SHARE, AxisExtent, default_tile, plan_tiles

    vgg = AxisExtent(stride=32, receptive_field=224, before=90, span=404)  # VGG16's extent, measured

    def activations(tile):  # VGG16's: 64 channels at full resolution, held twice
        return 2 * 64 * 4 * tile[0] * tile[1]

    for budget in (1 << 28, 1 << 30, 2 << 30):
        tile = default_tile((20_000, 20_000), (vgg, vgg), activations, budget, least=1024)
        assert activations(tile) <= budget < activations((tile[0] + 32, tile[1] + 32))  # the largest that fits
        assert tile[0] == tile[1] and tile[0] % 32 == 410 % 32  # whole positions from a start on the grid
    # where memory allows, no larger than an overlap of OVERLAP_SHARE needs
    tile = default_tile((50_000, 50_000), (vgg, vgg), activations, 1 << 40, least=1024)
    overlap = 410 - 32
    assert overlap / tile[0] <= OVERLAP_SHARE < overlap / (tile[0] - 32)
    # a small model's tiles are the least given; an input smaller than a tile is one tile
    small = AxisExtent(stride=4, receptive_field=28, before=0, span=28)
    assert default_tile((5000, 5000), (small, small), activations, 2 << 30, least=1024) == (1024, 1024)
    assert default_tile((700, 900), (small, small), activations, 2 << 30, least=1024) == (700, 900)
    assert len(plan_tiles((700, 900), (small, small), (700, 900))) == 1
    # an input shorter than one position's interval from a grid start (but not than the receptive field) is one tile
    assert default_tile((300, 300), (vgg, vgg), activations, 2 << 30, least=1024) == (300, 300)
    assert len(plan_tiles((300, 300), (vgg, vgg), (300, 300))) == 1
    # where the activations cannot be estimated, there is no default to give
    assert default_tile((5000, 5000), (small, small), lambda tile: None, 2 << 30, least=1024) is None


def test_default_tiles_are_shaped_so_the_workers_finish_together():
    from fcconv.tiling import AxisExtent, balanced_tile, plan_tiles, reread_share

    shapes = AxisExtent(stride=8, receptive_field=32, before=9, span=50)  # the shapes sample's extent, measured
    extents, largest = (shapes, shapes), (1961, 1961)  # the largest tile 2 GiB of its activations allow

    def cut(size, tile):
        tiles = plan_tiles(size, extents, tile)
        return tiles, math.prod(tile), reread_share(tiles, size)

    # 4096×4096 cut evenly is 3×3 tiles: on two workers the ninth runs alone; the balanced tiles come in pairs
    even, even_volume, _ = cut((4096, 4096), largest)
    tile = balanced_tile((4096, 4096), extents, largest, 2)
    tiles, volume, reread = cut((4096, 4096), tile)
    assert len(even) == 9 and len(tiles) % 2 == 0 and volume <= even_volume
    assert math.ceil(len(tiles) / 2) * volume < math.ceil(len(even) / 2) * even_volume
    # an input a little larger than the tile keeps one axis whole: one seam to read again, not two
    tiles, volume, reread = cut((2048, 2048), balanced_tile((2048, 2048), extents, largest, 2))
    assert len(tiles) == 2 and volume <= even_volume and reread < cut((2048, 2048), largest)[2]
    assert any(stop - start == 2048 for start, stop in tiles[0].input)
    # on one worker, the tiles that read the fewest pixels; and only tiles that fit
    one = balanced_tile((4096, 4096), extents, largest, 1)
    assert cut((4096, 4096), one)[2] <= cut((4096, 4096), largest)[2]
    assert balanced_tile((4096, 4096), extents, largest, 2, fits=lambda tile: tile == largest) == largest
    # an input that one tile holds is cut once per worker, where the overlap costs less than running one tile on
    # all threads, across its longer side; a square one into strips of whole rows (a strip's map is written in
    # one run per class); where a cut would cost more (VGG16 reads 378 pixels again at each), it stays whole
    halves = plan_tiles((1500, 1800), extents, balanced_tile((1500, 1800), extents, (1500, 1800), 2))
    assert len(halves) == 2 and all(tile.input[0] == (0, 1500) for tile in halves)
    strips = plan_tiles((1800, 1800), extents, balanced_tile((1800, 1800), extents, (1800, 1800), 2))
    assert len(strips) == 2 and all(tile.input[1] == (0, 1800) for tile in strips)
    assert balanced_tile((1500, 1800), extents, (1500, 1800), 1) == (1500, 1800)
    vgg = AxisExtent(stride=32, receptive_field=224, before=90, span=404)
    assert balanced_tile((1500, 1800), (vgg, vgg), (1500, 1800), 2) == (1500, 1800)


def test_default_tiles_map_exactly_and_share_the_threads(exports, tmp_path):
    from fcconv.mapping import open_input, plan_map, run_tile

    x = np.random.default_rng(2).standard_normal((3, 150, 170)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    source = open_input(tmp_path / "x.npy", 3, 2, None)
    whole = plan_map(str(exports["shapes"]), source, (32, 32), None, workers=2)
    assert len(whole.tiles) == 1 and whole.threads == 2 and whole.tile == (150, 170)
    # a budget of a few tiles' activations: several tiles, one thread each, the same map
    split = plan_map(str(exports["shapes"]), source, (32, 32), None, workers=2, budget=1_000_000)
    assert len(split.tiles) > 2 and split.threads == 1
    stitched = np.zeros(split.shape, np.float32)
    for tile in split.tiles:
        stitched[(slice(None), *tile.output_slices)] = run_tile(split.model, split.input, tile, split.threads)
    np.testing.assert_allclose(stitched, one_pass(exports["shapes"], x), rtol=1e-5, atol=1e-5)


PARTED = [
    ("shapes", (3, 157, 203), 400_000),
    ("residual", (3, 70, 90), 100_000),
    ("shapes-s2", (3, 101, 77), 300_000),
    ("signals", (1, 9000), 200_000),
    ("volume", (1, 27, 33, 22), 20_000),
]


@pytest.mark.parametrize(("name", "shape", "budget"), PARTED, ids=[c[0] for c in PARTED])
def test_a_model_whose_tiles_cannot_hold_their_overlap_is_mapped_in_parts_exactly(
    exports, tmp_path, monkeypatch, name, shape, budget
):
    import fcconv.mapping
    from fcconv.pipeline.events import Note

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = one_pass(exports[name], x)
    # under a budget of a few small tiles' activations, each whole-model tile mostly re-reads its neighbours
    monkeypatch.setattr(fcconv.mapping, "TILE_BUDGET", budget)
    events = []
    result = map_file(exports[name], tmp_path / "x.npy", tmp_path / "map.npy", progress=events.append)
    notes = [e.text for e in events if isinstance(e, Note)]
    assert any(text.startswith("in ") and " parts, cut after each downsampling" in text for text in notes), notes
    assert result.shape == expected.shape
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected, rtol=1e-5, atol=1e-5)
    # the parts and the tensors at their cuts are gone with the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy", "x.npy"]
    # --tile bounds the whole model's tiles: no parts
    events.clear()
    map_file(exports[name], tmp_path / "x.npy", tmp_path / "tiled.npy", tile=str(max(shape[1:]) // 2 + 20),
             progress=events.append)  # fmt: skip
    assert not any("parts" in e.text for e in events if isinstance(e, Note))
    np.testing.assert_allclose(np.load(tmp_path / "tiled.npy"), expected, rtol=1e-5, atol=1e-5)


def test_without_disk_for_the_cuts_tensors_the_model_is_mapped_whole(exports, tmp_path, monkeypatch):
    import shutil

    import fcconv.map_parts
    import fcconv.mapping
    from fcconv.pipeline.events import Note

    x = np.random.default_rng(4).standard_normal((3, 157, 203)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(fcconv.mapping, "TILE_BUDGET", 400_000)
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(fcconv.map_parts.shutil, "disk_usage", lambda path: full)
    events = []
    map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "map.npy", progress=events.append)
    notes = [e.text for e in events if isinstance(e, Note)]
    assert any("no room for the tensors at its cuts: mapped whole" in text for text in notes), notes
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), one_pass(exports["shapes"], x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy", "x.npy"]


def test_models_are_cut_after_each_downsampling_where_one_tensor_carries_everything(exports, tmp_path):
    import onnx

    from fcconv.map_parts import cuts, write_parts

    for name, native, strides in [
        ("shapes", (3, 32, 32), [(2, 2), (4, 4), (8, 8)]),
        ("residual", (3, 32, 32), [(2, 2), (4, 4)]),
        ("signals", (1, 512), [(2,), (4,), (8,), (32,)]),
    ]:
        model = onnx.load(exports[name])
        total = tuple(int(v) for v in {p.key: p.value for p in model.metadata_props}["fcconv.total_stride"].split(","))
        found = cuts(model, native, total)
        assert [c.stride for c in found] == strides, name
        folder = tmp_path / name
        folder.mkdir()
        parts = write_parts(model, native, total, found, folder)
        assert [p.native for p in parts] == [native, *((c.channels, *c.native) for c in found)]
        if name == "residual":
            # the stem's output is read by the block and again by its sum: the cut is before both, not between
            assert "Add" in {node.op_type for node in onnx.load(parts[1].path).graph.node}
    # a model with no downsampling before its head has no cut
    flat = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    import fcconv as package
    from fcconv.export import export_onnx

    export_onnx(package.convert(flat, (1, 8, 8)), tmp_path / "flat.onnx", (1, 8, 8))
    assert cuts(onnx.load(tmp_path / "flat.onnx"), (1, 8, 8), (1, 1)) == []


def test_a_maps_multiply_adds_are_counted_as_torch_counts_them(exports):
    """How a map in parts divides its time: the export's multiply-adds at a tile's size, as torch's own counter
    counts the converted module's (half its FLOPs), for a residual 2D model and a padded 3D one."""
    import onnx
    from torch.utils.flop_counter import FlopCounterMode

    import fcconv as package
    from fcconv.onnx_shapes import multiply_adds, shapes_only

    torch.manual_seed(0)
    volume = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 4, 3, padding=1), nn.MaxPool3d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2 * 2, 3),
    ).eval()  # fmt: skip
    for name, module, native, size in [
        ("residual", Residual().eval(), (3, 32, 32), (3, 70, 90)),
        ("volume", volume, (1, 8, 8, 8), (1, 27, 33, 22)),
    ]:
        converted = package.convert(module, native)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            converted(torch.zeros(1, *size))
        model = onnx.load(exports[name])
        counted = multiply_adds(shapes_only(model), model.graph.input[0].name, (1, *size))
        assert counted == counter.get_total_flops() // 2 > 0, name


def test_the_time_left_counts_the_parts_still_to_come(monkeypatch):
    """Each part's share of the time is its share of the multiply-adds: after a part of 100 of 400, in 10 s,
    30 s are left, not the 0 s its own tiles would say; the rate is the map's positions."""
    import fcconv.mapping
    import fcconv.pipeline.mapping as pipeline
    from fcconv.mapping import InputArray, MapPlan
    from fcconv.tiling import Tile

    def plan(model, channels, positions):
        tiles = tuple(Tile(((2 * k, 2 * k + 2),), ((k, k + 1),), (0,)) for k in range(positions))
        return MapPlan(model, InputArray("x.npy", "npy", (channels, 2 * positions)), (), tiles, (4, positions), (2,))

    first, last = plan("part0.onnx", 3, 4), plan("part1.onnx", 8, 2)
    works = {"part0.onnx": 100, "part1.onnx": 300}
    monkeypatch.setattr(fcconv.mapping, "plan_work", lambda plan: works[plan.model])
    now = [0.0]
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: now[0])
    clock = pipeline._MapClock([first, last])
    for k, tile in enumerate(first.tiles):
        now[0] = 2.5 * (k + 1)
        rate, left = clock.part(0)(tile, first)
    assert (rate, left) == (pytest.approx(2 * 0.25 / 10), pytest.approx(30))
    now[0] = 25
    assert clock.part(1)(last.tiles[0], last) == (pytest.approx(2 * 0.625 / 25), pytest.approx(15))
    now[0] = 40
    assert clock.part(1)(last.tiles[1], last) == (pytest.approx(2 / 40), pytest.approx(0))
    # where the work cannot be counted, each part's tiles' input values stand for it: 3×8 here, 8×4 after
    monkeypatch.setattr(fcconv.mapping, "plan_work", lambda plan: None)
    now[0] = 0.0
    clock = pipeline._MapClock([first, last])
    for tile in first.tiles:
        now[0] += 3
        rate, left = clock.part(0)(tile, first)
    assert left == pytest.approx(12 * 32 / 24)


def test_a_two_worker_dask_cluster_writes_the_same_bytes(exports, tmp_path):
    from distributed import LocalCluster

    x = np.random.default_rng(0).standard_normal((3, 141, 187)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    local = map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "threads.npy", tile="64")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "cluster.npy", tile="64",
                          scheduler=cluster.scheduler_address)  # fmt: skip
    assert local.tiles == remote.tiles > 4
    assert (tmp_path / "threads.npy").read_bytes() == (tmp_path / "cluster.npy").read_bytes()


def test_a_worker_that_dies_mid_run_is_replaced_and_the_map_is_still_exact(exports, tmp_path):
    from distributed import Client, LocalCluster, WorkerPlugin

    class DiesOnce(WorkerPlugin):
        """Kills its worker's process as the first tile of the run starts executing (once, across restarts)."""

        def __init__(self, marker):
            self.marker = marker

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)

    x = np.random.default_rng(1).standard_normal((3, 141, 187)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    marker = tmp_path / "died"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.register_plugin(DiesOnce(str(marker)))
        result = map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "map.npy", tile="64",
                          scheduler=cluster.scheduler_address)  # fmt: skip
    assert marker.exists()  # a worker did die mid-run
    assert result.written and result.tiles > 4
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), one_pass(exports["shapes"], x), rtol=1e-5, atol=1e-5)


def test_pictures_wav_tiff_and_zarr_inputs_read_as_the_model_expects(exports, tmp_path):
    import tifffile
    import zarr
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "picture.png")
    tifffile.imwrite(tmp_path / "picture.tif", pixels, tile=(32, 32))
    meta = {p.key: p.value for p in __import__("onnx").load(exports["shapes"]).metadata_props}
    import json

    spec = json.loads(meta["fcconv.preprocess"])
    mean, std = (np.asarray(spec[k], np.float32)[:, None, None] for k in ("mean", "std"))
    expected = one_pass(exports["shapes"], (np.moveaxis(pixels, -1, 0) / np.float32(255) - mean) / std)
    for name in ("picture.png", "picture.tif"):
        map_file(exports["shapes"], tmp_path / name, tmp_path / "map.npy", tile="64")
        np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected, rtol=1e-5, atol=1e-5)
    array = rng.standard_normal((3, 70, 95)).astype(np.float32)
    zarr.save_array(str(tmp_path / "input.zarr"), array)
    map_file(exports["shapes"], tmp_path / "input.zarr", tmp_path / "map.npy", tile="60")
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), one_pass(exports["shapes"], array), rtol=1e-5, atol=1e-5)
    samples = (rng.standard_normal(6000) * 8000).astype(np.int16)
    with wave.open(str(tmp_path / "signal.wav"), "wb") as audio:
        audio.setnchannels(1), audio.setsampwidth(2), audio.setframerate(16000)
        audio.writeframes(samples.tobytes())
    map_file(exports["signals"], tmp_path / "signal.wav", tmp_path / "map.npy", tile="1500")
    expected = one_pass(exports["signals"], samples[None].astype(np.float32) / 32768)
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected, rtol=1e-5, atol=1e-5)


def test_the_command_writes_the_map_and_says_what_it_tiled(exports, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 80, 100)).astype(np.float32))
    run = fcconv("map", exports["shapes"], tmp_path / "x.npy", "-o", tmp_path / "map.npy", "--tile", "64")
    assert run.returncode == 0, run.stderr
    assert (
        "63 tiles of at most 64×64; each position reads" in run.stdout
        and f"wrote {tmp_path / 'map.npy'} (7×7×9)" in run.stdout
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["{model}", "{tmp}/missing.npy", "-o", "{tmp}/map.npy"], "no such file"),
        (["{model}", "{tmp}/small.npy", "-o", "{tmp}/map.npy"], "smaller than the model's native size 32×32"),
        (
            ["{model}", "{tmp}/x.npy", "-o", "{tmp}/map.npy", "--tile", "20"],
            "--tile 20 is smaller than what one map position reads",
        ),
        (
            ["{model}", "{tmp}/x.npy", "-o", "{tmp}/map.npy", "--tile", "64,64,64"],
            "--tile 64,64,64: the input has two axes; give one value or two",
        ),
        (["{model}", "{tmp}/x.npy", "-o", "{tmp}/x.npy"], "would overwrite an input"),
        (["{model}", "{tmp}/x.npy", "-o", "{tmp}/map.zip"], "name it NAME.npy"),
        (["{model}", "{tmp}/x.txt", "-o", "{tmp}/map.npy"], "not an input fcconv map reads"),
        (["{model}", "{tmp}/x.npy", "-o", "{tmp}/map.npy", "--scheduler", "tcp://127.0.0.1:9"], "no Dask scheduler"),
        (["{tmp}/x.npy", "{tmp}/x.npy", "-o", "{tmp}/map.npy"], "is not a PyTorch checkpoint"),
        (["{model}", "{tmp}/x.npy", "-o", "{tmp}/map.npy", "--stride", "4"], "are for a checkpoint"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(exports, tmp_path, args, says):
    np.save(tmp_path / "x.npy", np.zeros((3, 64, 64), np.float32))
    np.save(tmp_path / "small.npy", np.zeros((3, 20, 64), np.float32))
    (tmp_path / "x.txt").write_text("3 64 64")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("{model}", str(exports["shapes"])).replace("{tmp}", str(tmp_path)) for a in args]
    run = fcconv("map", *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_the_tiles_run_in_the_plans_order_so_that_neighbours_write_the_map_together(
    exports, tmp_path, monkeypatch, workers
):
    import fcconv.mapping
    from fcconv.mapping import open_input, plan_map

    np.save(tmp_path / "x.npy", np.random.default_rng(4).standard_normal((3, 200, 230)).astype(np.float32))
    started = []
    real = fcconv.mapping.run_tile

    def recorded(model, source, tile, threads=1):
        started.append(tile)
        return real(model, source, tile, threads)

    monkeypatch.setattr(fcconv.mapping, "run_tile", recorded)
    map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "map.npy", tile="64", workers=workers)
    planned = list(
        plan_map(str(exports["shapes"]), open_input(tmp_path / "x.npy", 3, 2, None), (32, 32), (64, 64)).tiles
    )
    assert len(planned) > 8 and len(started) == len(planned) and set(started) == set(planned)
    # row after row: exactly on one thread; on two, a tile may start a few places early or late (a thread that
    # takes a tile can be descheduled before it records the start), where hashed keys scatter them by tens
    slack = 1 if workers == 1 else 4
    late = [k for k, tile in enumerate(started) if abs(planned.index(tile) - k) >= slack]
    assert not late, f"tiles started out of the plan's order: {late}"


def test_a_run_that_fails_midway_leaves_nothing_under_the_output_name(exports, tmp_path, monkeypatch):
    import fcconv.mapping

    np.save(tmp_path / "x.npy", np.zeros((3, 150, 150), np.float32))
    calls = []
    real = fcconv.mapping.run_tile

    def failing(model, source, tile, threads=1):
        calls.append(tile)
        if len(calls) == 5:
            raise RuntimeError("a tile failed")
        return real(model, source, tile, threads)

    monkeypatch.setattr(fcconv.mapping, "run_tile", failing)
    with pytest.raises(RuntimeError, match="a tile failed"):
        map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "map.npy", tile="64", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_run_in_parts_that_fails_midway_leaves_nothing_behind(exports, tmp_path, monkeypatch):
    import fcconv.mapping

    np.save(tmp_path / "x.npy", np.zeros((3, 150, 150), np.float32))
    monkeypatch.setattr(fcconv.mapping, "TILE_BUDGET", 400_000)
    models = []
    real = fcconv.mapping.run_tile

    def failing(model, source, tile, threads=1):
        if model not in models:
            models.append(model)
        if len(models) == 3:  # the third part's first tile
            raise RuntimeError("a tile failed")
        return real(model, source, tile, threads)

    monkeypatch.setattr(fcconv.mapping, "run_tile", failing)
    with pytest.raises(RuntimeError, match="a tile failed"):
        map_file(exports["shapes"], tmp_path / "x.npy", tmp_path / "map.npy", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_checkpoint_is_converted_and_verified_first_then_mapped(exports, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 70, 90)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = fcconv("map", SAMPLES / "digits_lenet.pt", tmp_path / "x.npy", "-o", tmp_path / "map.npy", "--tile", "60",
                 "--stride", "2")  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "à trous" in run.stdout and "Verification" in run.stdout  # the conversion's own tables
    export = tmp_path / "digits.s2.onnx"
    assert fcconv("convert", SAMPLES / "digits_lenet.pt", "--stride", "2", "-o", export, "--quiet").returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), one_pass(export, x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.s2.onnx", "map.npy", "x.npy"]


def test_a_pooled_export_has_no_map_to_tile(tmp_path):
    out = tmp_path / "pooled.onnx"
    assert fcconv("convert", SAMPLES / "digits_lenet.pt", "--pool", "avg", "-o", out, "--quiet").returncode == 0
    np.save(tmp_path / "x.npy", np.zeros((1, 64, 64), np.float32))
    with pytest.raises(BadInputError, match="no score map to tile"):
        map_file(out, tmp_path / "x.npy", tmp_path / "map.npy")
