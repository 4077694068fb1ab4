"""What ``--stride S`` costs against shift-and-stitch: a stride-S score map from one pass à trous, or from many.

    python bench/bench_stride.py [--models vgg16,resnet50] [--strides 16,8] [--size 448] [--runs 3] [--threads 2]

A converted VGG16 or ResNet-50 scores one window every T = 32 input pixels. For an output stride S that
divides T there are two ways to a map with one score vector every S pixels:

* à trous: the conversion made with ``stride=S`` (:mod:`fcconv.atrous`), one forward pass;
* shift-and-stitch: the default conversion (stride T) run on the (T/S)² inputs shifted by multiples of S pixels
  along each axis (``x[..., a*S:, b*S:]`` for a, b in 0 … T/S - 1), the maps interleaved (the map of shift
  (a, b) fills the positions a, b modulo T/S).

For each model and S, at batch 1 on a SIZE×SIZE input, on the CPU: the multiply-adds of each way (every
convolution, dilated or not, and every GEMM, the head's included, counted by ``FlopCounterMode`` from its
output and kernel sizes: a dilated kernel costs what the undilated one does), and the median wall time of
each way in PyTorch eager (``torch.inference_mode()``) and in onnxruntime (each conversion exported once to a
temporary folder; shift-and-stitch runs the default conversion's session on every shifted input). The
interleaving is part of the timed shift-and-stitch call; the shifted inputs are made beforehand. Within each
round the four variants of a row are timed in turn, so that a change in the machine's load falls on all alike.
VGG16 is converted at its native 224×224; ResNet-50 with ``dense=True`` (its global pooling dropped).

The weights are random (no download), which changes nothing here: the cost depends on the shapes alone. A
second table checks each row: the à-trous map and the stitched map have the same shape, and the à-trous map
read every (T/S)-th position is the default conversion's map at stride T (the largest absolute difference, in
PyTorch and in onnxruntime, beside the largest absolute score for scale). The stitched map itself differs from
the à-trous map near the borders: a shifted input's trunk pads its own, cropped borders where the unshifted
input has pixels. That changes no cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

NATIVE = (3, 224, 224)
MODELS = {
    "vgg16": (lambda: torchvision.models.vgg16(weights=None), False),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), True),
}
"""Name → (the classifier, whether the conversion is dense)."""
VARIANTS = ("torch à trous", "torch stitch", "ort à trous", "ort stitch")


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


def _stitch(maps: list, ratio: int):
    """Interleave the ratio² maps of the shifted inputs (shift (a, b) at index a·ratio + b) into one map."""
    heights = [maps[a * ratio].shape[2] for a in range(ratio)]
    widths = [maps[b].shape[3] for b in range(ratio)]
    height = max(a + ratio * (h - 1) + 1 for a, h in enumerate(heights))
    width = max(b + ratio * (w - 1) + 1 for b, w in enumerate(widths))
    shape = (*maps[0].shape[:2], height, width)
    out = maps[0].new_empty(shape) if isinstance(maps[0], torch.Tensor) else np.empty(shape, maps[0].dtype)
    for index, piece in enumerate(maps):
        a, b = divmod(index, ratio)
        out[:, :, a::ratio, b::ratio] = piece  # a shape mismatch raises: every position is filled exactly once
    return out


def _macs(module: torch.nn.Module, inputs: list[torch.Tensor]) -> int:
    """Multiply-adds of one forward pass of ``module`` on each of ``inputs``, summed."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        for x in inputs:
            module(x)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as two


def _session(ort, module: torch.nn.Module, path: Path, threads: int):
    from fcconv.export import export_onnx

    export_onnx(module, path, NATIVE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def _time(calls: dict, runs: int) -> tuple[dict, dict]:
    """Each call's first output (the warm-up's) and its median wall time in ms, the calls timed in turn."""
    outputs = {key: call() for key, call in calls.items()}  # warm-up: allocations, kernel choice
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(runs):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return outputs, {key: 1000 * statistics.median(measured) for key, measured in times.items()}


def _bench_model(name: str, strides: list[int], size: int, runs: int, threads: int, folder: Path, ort) -> list:
    from fcconv.rewrite import rewrite

    build, dense = MODELS[name]
    model = build().eval()
    default = rewrite(model, NATIVE, dense=dense)
    base, base_input = _session(ort, default.module, folder / f"{name}.onnx", threads)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        coarse = default.module(x)  # the stride-T map
    coarse_ort = base.run(None, {base_input: x.numpy()})[0]
    rows = []
    for stride in strides:
        conversion = rewrite(model, NATIVE, dense=dense, stride=stride)
        plan = conversion.atrous
        ratio, total = plan.dilation[0], plan.total[0]
        session, input_name = _session(ort, conversion.module, folder / f"{name}.s{stride}.onnx", threads)
        shifted = [
            x[..., a * stride :, b * stride :].contiguous() for a in range(ratio) for b in range(ratio)
        ]  # index a·ratio + b
        shifted_np = [s.numpy() for s in shifted]
        atrous, module = conversion.module, default.module
        calls = {
            "torch à trous": lambda: _forward(atrous, x),
            "torch stitch": lambda: _stitch([_forward(module, s) for s in shifted], ratio),
            "ort à trous": lambda: session.run(None, {input_name: x.numpy()})[0],
            "ort stitch": lambda: _stitch([base.run(None, {base_input: s})[0] for s in shifted_np], ratio),
        }
        outputs, ms = _time(calls, runs)
        row = {
            "model": name,
            "stride": stride,
            "total": total,
            "passes": ratio**2,
            "map": tuple(outputs["torch à trous"].shape[2:]),
            "macs à trous": _macs(atrous, [x]),
            "macs stitch": _macs(module, shifted),
            "shapes": {key: tuple(out.shape) for key, out in outputs.items()},
            "torch subgrid": (outputs["torch à trous"][..., ::ratio, ::ratio] - coarse).abs().max().item(),
            "ort subgrid": float(np.abs(outputs["ort à trous"][..., ::ratio, ::ratio] - coarse_ort).max()),
            "scale": coarse.abs().max().item(),
            **ms,
        }
        print(
            f"{name} S={stride}: " + ", ".join(f"{key} {ms[key]:.0f} ms" for key in VARIANTS) + f"; map {row['map']}",
            flush=True,
        )
        rows.append(row)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--strides", default="16,8")
    parser.add_argument("--size", type=int, default=448, help="the input's height and width")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's and onnxruntime's intra-op threads")
    args = parser.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    strides = [int(s) for s in args.strides.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows += _bench_model(name, strides, args.size, args.runs, args.threads, Path(folder), ort)
    print(f"\n{args.size}×{args.size} input, batch 1, median of {args.runs} runs, {args.threads} threads\n")
    print(
        "| model | S | shifted passes | map positions | G multiply-adds à trous | shift-and-stitch | ratio "
        "| torch ms à trous | shift-and-stitch | ratio | onnxruntime ms à trous | shift-and-stitch | ratio |"
    )
    print("|---" * 13 + "|")
    for row in rows:
        macs = [row["macs à trous"] / 1e9, row["macs stitch"] / 1e9]
        cells = [f"{macs[0]:.1f}", f"{macs[1]:.1f}", _ratio(*macs)]
        for kind in ("torch", "ort"):
            pair = [row[f"{kind} à trous"], row[f"{kind} stitch"]]
            cells += [f"{pair[0]:.0f}", f"{pair[1]:.0f}", _ratio(*pair)]
        height, width = row["map"]
        print(
            f"| {row['model']} | {row['stride']} | {row['passes']} | {height}×{width} ({height * width}) | "
            + " | ".join(cells)
            + " |"
        )
    print(
        "\n| model | S | à-trous map | stitched map | same shape | max abs diff, subgrid [::T/S] vs stride-T map: "
        "torch | onnxruntime | largest abs score |"
    )
    print("|---" * 8 + "|")
    for row in rows:
        shapes = row["shapes"]
        same = len(set(shapes.values())) == 1
        shown = ["×".join(map(str, shapes[key][1:])) for key in ("torch à trous", "torch stitch")]
        print(
            f"| {row['model']} | {row['stride']} | {shown[0]} | {shown[1]} | {'yes' if same else 'NO'} | "
            f"{row['torch subgrid']:.1e} | {row['ort subgrid']:.1e} | {row['scale']:.3g} |"
        )
    print(f"\ntorch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
