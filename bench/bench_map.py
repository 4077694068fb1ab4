"""What tiling costs: ``fcconv map`` against one pass over the whole input, its time against input area, and workers.

    python bench/bench_map.py [--runs 2] [--models digits,shapes,vgg16] [--size 2048]
    python bench/bench_map.py --memory 2048,8192,20000

For each model (the shipped digits and shapes samples, and VGG16 with random weights, converted and exported
here), on a random SIZE×SIZE input held as a ``.npy`` file:

* tiled throughput (input pixels per second, default tiles, or the model's parts where ``fcconv map`` would cut
  it, this machine's threads; from the ``.npy`` input to the ``.npy`` map) against one pass of the same export
  over the whole input in onnxruntime (all threads, a session of its own): the run alone, and the same job from
  file to file (the input loaded, the map saved); at SIZE and twice the side (where one pass's activations are
  at most ``--one-pass-share`` of this machine's memory, a quarter by default);
* the tiled time at twice the side (four times the area) against SIZE: linear is 4×; beside it, how many times as
  many map positions the larger input has (more than 4×: a position needs a receptive field of input, so the
  map grows by (2·SIZE − field) / (SIZE − field) per axis, and a model's head runs once per position);
* the tiled time with 1, 2 and 4 Dask threads, against 1.

With ``--memory 2048,8192,20000``, instead: ``fcconv map`` of the digits sample over random inputs of those sides (a
20,000×20,000 input is 400 megapixels, 1.6 GB as float32), each in a process of its own whose resident memory is
sampled every 20 ms: the peak of its anonymous memory (what the run holds; the input and map are memory-mapped
files, whose pages the kernel may drop) and of all its resident memory, and the time.

Times are medians of ``--runs`` rounds; within a round every variant runs in turn, after a warm-up round (without
``--no-warmup``: the tiles' sessions stay open from one map to the next, and one pass is timed on the third
run of its session, so that neither pays for its first run's allocations). Each input's tiles are planned
(``plan_map``: the extent measured) once, outside the timed calls, just before its first tiled run, as
``fcconv map`` plans the one input it maps; the input files are written first. The tiled map is checked
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


def _one_pass(model: Path, path: Path, timing: dict[str, float] | None = None, warm: bool = False) -> np.ndarray:
    """The export run once over the input at ``path`` on all threads, in a session of its own, closed after (its
    memory arena holds the run's activations: VGG16's at 4096×4096 are 8 GiB). In ``timing``: the run's seconds,
    and those of the same job from file to file (the input loaded, run, the map saved beside it). ``warm``: timed
    on a third run in the session (its first two grow its memory arena: the shapes sample at 2048×2048 took 0.65
    and 0.62 s, then 0.32 s), as the tiles' sessions are warm after their first map."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(2 if warm else 0):
        session.run(None, {name: np.load(path)[None]})
    start = time.perf_counter()
    x = np.load(path)[None]
    loaded = time.perf_counter()
    scores = session.run(None, {name: x})[0][0]
    ran = time.perf_counter()
    np.save(path.with_name("one-pass-map.npy"), scores)
    if timing is not None:
        timing.update(run=ran - loaded, files=time.perf_counter() - start)
    return scores


def _plan(model: Path, path: Path, native: tuple[int, ...], folder: Path) -> list:
    """The plans ``fcconv map`` makes: the whole model's default tiles, or its parts' where those are too small."""
    from fcconv.map_parts import needs_parts, plan_parts
    from fcconv.mapping import open_input, plan_map

    whole = plan_map(str(model), open_input(path, native[0], 2, None), native[1:], None)
    if not needs_parts(whole):
        return [whole]
    folder.mkdir(exist_ok=True)
    return plan_parts(whole, native, folder) or [whole]


def _tiled(plans: list, out: Path, workers: int | None) -> None:
    """The plans run as ``fcconv map`` runs them: each part's tiles into the file the next part reads."""
    from fcconv.mapping import map_writer, run_tiles
    from fcconv.tiling import threads_per_tile

    for k, plan in enumerate(plans):
        target = Path(plans[k + 1].input.path) if k + 1 < len(plans) else out
        threads = threads_per_tile(workers or os.cpu_count() or 1, len(plan.tiles))
        with map_writer(target, plan.shape) as write:
            run_tiles(plan, write, workers, threads)
        if k:
            Path(plan.input.path).unlink()


def _tiles(plans: list) -> str:
    each = "; ".join(f"{len(p.tiles)} of {'×'.join(map(str, p.tile))}" for p in plans)
    return each if len(plans) == 1 else f"{len(plans)} parts: {each}"


def _memory(sides: list[int]) -> None:
    """Peak memory of ``fcconv map`` against the input's size (see the module's docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, _ = _export("digits", folder)
        for side in sides:
            path = folder / "x.npy"
            x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1, side, side))
            rng = np.random.default_rng(side)
            for row in range(0, side, 1024):  # written in strips: the bench itself holds no whole input
                x[0, row : row + 1024] = rng.random((min(1024, side - row), side), np.float32)
            x.flush()
            del x
            command = [sys.executable, "-m", "fcconv", "map", model, path, "-o", folder / "map.npy", "--quiet"]
            start = time.perf_counter()
            child = subprocess.Popen(command)
            peak = {"RssAnon": 0, "VmRSS": 0}
            while child.poll() is None:
                try:
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    break
                for line in status.splitlines():
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]) * 1024)
                time.sleep(0.02)
            child.wait()
            elapsed = time.perf_counter() - start
            assert child.returncode == 0, child.returncode
            size = path.stat().st_size
            rows.append(f"| {side}×{side} | {side * side / 1e6:,.0f} | {size / 1e9:.2f} GB | {elapsed:.1f} s | "
                        f"{peak['RssAnon'] / 1e6:,.0f} MB | {peak['VmRSS'] / 1e6:,.0f} MB |")  # fmt: skip
            path.unlink()
            (folder / "map.npy").unlink()
    print("| input | megapixels | input file | time | peak anonymous memory | peak resident memory |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="digits,shapes,vgg16")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4", help="thread counts to compare ('' for none)")
    parser.add_argument("--no-warmup", action="store_true", help="for long runs, where sessions' start is noise")
    parser.add_argument("--one-pass-share", type=float, default=0.25,
                        help="one pass runs where its activations are at most this share of memory")  # fmt: skip
    parser.add_argument("--memory", help="sides, comma-separated: measure peak memory against input size instead")
    args = parser.parse_args()
    if args.memory:
        _memory([int(side) for side in args.memory.split(",")])
        return
    from fcconv.memory import activation_bytes, machine_memory

    rows, scaling, workers_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            model, native = _export(name, folder)
            plans: dict[int, list] = {}
            paths = {}
            for side in (args.size, 2 * args.size):
                paths[side] = folder / f"{name}-{side}.npy"
                np.save(paths[side], np.random.default_rng(side).random((native[0], side, side), np.float32))

            def planned(side: int) -> list:
                """The input's plans, made before its first tiled run, as ``fcconv map`` plans the one input it maps
                (VGG16's first 2048×2048 run took 18.6 s after the 4096×4096 parts were planned, 16.3 s without)."""
                if side not in plans:
                    plans[side] = _plan(model, paths[side], native, folder / f"{name}-{side}-parts")
                return plans[side]

            # one pass only where its activations fit in --one-pass-share of this machine's memory
            fits, fits_small = (
                (activation_bytes(str(model), (1, native[0], side, side), 4) or (0,))[0]
                <= machine_memory() * args.one_pass_share
                for side in (2 * args.size, args.size)
            )
            counts = [int(w) for w in args.workers.split(",") if w]
            warm = not args.no_warmup
            times: dict[str, list[float]] = {}
            run: dict[str, float] = {}
            calls = {
                **({"one pass": lambda: _one_pass(model, paths[args.size], run, warm)} if fits_small else {}),
                "tiled": lambda: _tiled(plans[args.size], folder / "map.npy", None),
                **({"one pass 2×": lambda: _one_pass(model, paths[2 * args.size], run, warm)} if fits else {}),
                "tiled 2×": lambda: _tiled(plans[2 * args.size], folder / "map2.npy", None),
                **{
                    f"tiled, {w} thread{'s' * (w > 1)}": (lambda w=w: _tiled(plans[args.size], folder / "mapw.npy", w))
                    for w in counts
                },  # fmt: skip
            }
            side_of = {label: 2 * args.size if label.endswith("2×") else args.size for label in calls}
            for label, call in calls.items() if warm else ():  # warm-up (a one pass warms its own session)
                if not label.startswith("one pass"):
                    planned(side_of[label])
                    call()
            for _ in range(args.runs):
                for label, call in calls.items():
                    if not label.startswith("one pass"):
                        planned(side_of[label])  # not timed
                    run.clear()  # a one pass's own times, its session's making left out
                    start = time.perf_counter()
                    call()
                    times.setdefault(label, []).append(run["run"] if run else time.perf_counter() - start)
                    if run:
                        times.setdefault(label + ", files", []).append(run["files"])
            median = {label: statistics.median(values) for label, values in times.items()}
            diff = (
                float(np.abs(np.load(folder / "map.npy") - _one_pass(model, paths[args.size])).max())
                if fits_small
                else None
            )
            diff2 = (
                float(np.abs(np.load(folder / "map2.npy") - _one_pass(model, paths[2 * args.size])).max())
                if fits
                else None
            )
            for side, plan, suffix in ((args.size, plans[args.size], ""), (2 * args.size, plans[2 * args.size], " 2×")):
                pixels, tiled = side**2, median["tiled" + suffix]
                if "one pass" + suffix not in median:
                    rows.append(f"| {name} | {side}×{side} | {_tiles(plan)} | – (past --one-pass-share of memory) | – "
                                f"| {pixels / tiled / 1e6:.2f} | – | – | – |")  # fmt: skip
                    continue
                one, files = median["one pass" + suffix], median["one pass" + suffix + ", files"]
                rows.append(f"| {name} | {side}×{side} | {_tiles(plan)} | {pixels / one / 1e6:.2f} "
                            f"| {pixels / files / 1e6:.2f} | {pixels / tiled / 1e6:.2f} | {one / tiled:.2f}× "
                            f"| {files / tiled:.2f}× | {diff if not suffix else diff2:.1e} |")  # fmt: skip
            grown = plans[2 * args.size][-1].positions / plans[args.size][-1].positions
            scaling.append(f"| {name} | {median['tiled']:.2f} s | {median['tiled 2×']:.2f} s | "
                           f"{median['tiled 2×'] / median['tiled']:.2f}× | {grown:.2f}× |")  # fmt: skip
            if counts:
                one = median[f"tiled, {counts[0]} thread{'s' * (counts[0] > 1)}"]
                workers_rows.append(f"| {name} | {one:.2f} s | " + " | ".join(
                    f"{one / median[f'tiled, {w} threads']:.2f}×" for w in counts[1:]) + " |")  # fmt: skip
    print(f"CPU: {os.cpu_count()} cores; medians of {args.runs} rounds\n")
    print("| model | input | tiles | one pass Mpx/s | one pass, file to file | tiled Mpx/s | tiled / one pass "
          "| tiled / one pass, file to file | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| model | tiled {args.size}² | tiled {2 * args.size}² (4× the area) | ratio | map positions ratio |"
          "\n|---|---|---|---|---|")  # fmt: skip
    print("\n".join(scaling))
    if workers_rows:
        print(f"\n| model | {counts[0]} thread(s) | " + " | ".join(f"{w} threads, speedup" for w in counts[1:]) + " |")
        print("|---|---|" + "---|" * len(counts[1:]))
        print("\n".join(workers_rows))


if __name__ == "__main__":
    main()
