"""What tiling costs: ``fcconv map`` against one pass over the whole input, its time against input area, and workers.

    python bench/bench_map.py [--runs 2] [--models digits,shapes,vgg16] [--size 2048]

For each model (the shipped digits and shapes samples, and VGG16 with random weights, converted and exported
here), on a random SIZE×SIZE input held as a ``.npy`` file:

* tiled throughput (input pixels per second, default tiles, this machine's threads) against one pass of the
  same export over the whole input in onnxruntime (all threads), at SIZE and twice the side (where one pass
  still fits in memory);
* the tiled time at twice the side (four times the area) against SIZE: linear is 4×;
* the tiled time with 1, 2 and 4 Dask threads, against 1.

Times are medians of ``--runs`` rounds; within a round every variant runs in turn. The map's extent is measured
once per model, outside the timed calls (``plan_map``), as is writing the input file. The tiled map is checked
against the one-pass map (largest absolute difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _export(name: str, folder: Path) -> tuple[Path, tuple[int, ...]]:
    out = folder / f"{name}.onnx"
    if name == "vgg16":
        import torch
        import torchvision

        import fcconv
        from fcconv.export import export_onnx

        torch.manual_seed(0)
        model = torchvision.models.vgg16(weights=None, num_classes=10).eval()
        export_onnx(fcconv.convert(model, (3, 224, 224)), out, (3, 224, 224))
        return out, (3, 224, 224)
    sample = {"digits": "digits_lenet", "shapes": "shapes_vgg"}[name]
    subprocess.run([sys.executable, "-m", "fcconv", "convert", REPO / "sample_models" / f"{sample}.pt", "-o", out,
                    "--quiet"], check=True)  # fmt: skip
    return out, {"digits": (1, 28, 28), "shapes": (3, 32, 32)}[name]


def _one_pass(model: Path, x: np.ndarray) -> np.ndarray:
    from fcconv.mapping import session_for

    session = session_for(str(model), os.cpu_count() or 1)
    return session.run(None, {session.get_inputs()[0].name: x[None]})[0][0]


def _tiled(plan, out: Path, workers: int | None) -> None:
    import dask

    from fcconv.mapping import map_writer, run_tile

    threads = max(1, (workers or os.cpu_count() or 1) // min(workers or os.cpu_count() or 1, len(plan.tiles)))
    with map_writer(out, plan.shape) as write:
        tasks = [
            dask.delayed(lambda t: write(t, run_tile(plan.model, plan.input, t, threads)))(tile) for tile in plan.tiles
        ]
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="digits,shapes,vgg16")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    from fcconv.mapping import open_input, plan_map

    rows, scaling, workers_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            model, native = _export(name, folder)
            plans, inputs = {}, {}
            for side in (args.size, 2 * args.size):
                x = np.random.default_rng(side).random((native[0], side, side), np.float32)
                path = folder / f"{name}-{side}.npy"
                np.save(path, x)
                inputs[side] = x
                plans[side] = plan_map(str(model), open_input(path, native[0], 2, None), native[1:], None)
                del x
            small, large = plans[args.size], plans[2 * args.size]
            times: dict[str, list[float]] = {}
            calls = {
                "one pass": lambda: _one_pass(model, inputs[args.size]),
                "tiled": lambda: _tiled(small, folder / "map.npy", None),
                "one pass 2×": lambda: _one_pass(model, inputs[2 * args.size]),
                "tiled 2×": lambda: _tiled(large, folder / "map2.npy", None),
                **{
                    f"tiled, {w} thread{'s' * (w > 1)}": (lambda w=w: _tiled(small, folder / "mapw.npy", w))
                    for w in (1, 2, 4)
                },  # fmt: skip
            }
            for call in calls.values():  # warm-up
                call()
            for _ in range(args.runs):
                for label, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times.setdefault(label, []).append(time.perf_counter() - start)
            median = {label: statistics.median(values) for label, values in times.items()}
            diff = float(np.abs(np.load(folder / "map.npy") - _one_pass(model, inputs[args.size])).max())
            diff2 = float(np.abs(np.load(folder / "map2.npy") - _one_pass(model, inputs[2 * args.size])).max())
            for side, plan, suffix in ((args.size, small, ""), (2 * args.size, large, " 2×")):
                pixels, one, tiled = side**2, median["one pass" + suffix], median["tiled" + suffix]
                tile = "×".join(map(str, plan.tile))
                rows.append(f"| {name} | {side}×{side} | {len(plan.tiles)} of {tile} | {pixels / one / 1e6:.2f} "
                            f"| {pixels / tiled / 1e6:.2f} | {one / tiled:.2f}× | {diff if not suffix else diff2:.1e} |")  # fmt: skip
            scaling.append(f"| {name} | {median['tiled']:.2f} s | {median['tiled 2×']:.2f} s | "
                           f"{median['tiled 2×'] / median['tiled']:.2f}× |")  # fmt: skip
            one = median["tiled, 1 thread"]
            workers_rows.append(f"| {name} | {one:.2f} s | " + " | ".join(
                f"{one / median[label]:.2f}×" for label in ("tiled, 2 threads", "tiled, 4 threads")) + " |")  # fmt: skip
            inputs.clear()
    print(f"CPU: {os.cpu_count()} cores; medians of {args.runs} rounds\n")
    print("| model | input | tiles | one pass Mpx/s | tiled Mpx/s | tiled / one pass throughput | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| model | tiled {args.size}² | tiled {2 * args.size}² (4× the area) | ratio |\n|---|---|---|---|")
    print("\n".join(scaling))
    print("\n| model | 1 thread | 2 threads, speedup | 4 threads, speedup |\n|---|---|---|---|")
    print("\n".join(workers_rows))


if __name__ == "__main__":
    main()
