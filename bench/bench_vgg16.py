"""VGG16: converted against original, side by side in one process; prints medians and ratios.

    python bench/bench_vgg16.py [--runs 7] [--threads 2] [--skip-onnx] [--skip-dense]
    python bench/bench_vgg16.py --device cuda [--dtypes float32,bfloat16] [--batches 1,8,64] [--cuda-graphs]

Every figure is the median of paired runs (original and converted alternate), so
drifts of a shared machine hit both sides alike. Ratios are converted / original
for latency, and crops / dense for the dense-map speedup, next to the FLOP ratio
counted with torch.utils.flop_counter. On CUDA each timing is ``--reps`` calls
followed by one synchronization, float32 runs with TF32 off unless ``--tf32``
(the setting fcconv verifies with), and the dense map is also compared with the
features alone, the goal there being the FLOP rate of the convolutional part.
With ``--cuda-graphs`` both sides are captured into CUDA graphs and replayed,
which times the GPU's work alone: eager calls on one image are often paced by
the host that issues the kernels rather than by the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fcconv  # noqa: E402
from fcconv.layers import gather_windows  # noqa: E402
from fcconv.runtime import OnnxRunner  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph; the returned callable replays it (the GPU's work, without the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timer(
    device: torch.device, reps: int, graphs: bool = False
) -> Callable[[Callable[[], object]], Callable[[], float]]:
    """Wrap ``fn`` into a timing of one call (on CUDA: the mean of ``reps`` calls, synchronized, or graph replays)."""

    def wrap(fn: Callable[[], object]) -> Callable[[], float]:
        if graphs:
            fn = cuda_graph(fn)
        if device.type != "cuda":

            def once() -> float:
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start

            return once

        def repeated() -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) / reps

        return repeated

    return wrap


def paired(a: Callable[[], float], b: Callable[[], float], runs: int) -> tuple[float, float, float]:
    """Medians of ``runs`` alternating timings of a and b (after one warm-up each), and the median of b/a per pair."""
    a(), b()
    ta, tb = [], []
    for _ in range(runs):
        ta.append(a())
        tb.append(b())
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb))


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def crops(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Every size×size crop of x at ``stride``, as one batch (N·positions, C, size, size)."""
    windows = x.unfold(2, size, stride).unfold(3, size, stride)  # N, C, h, w, size, size
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size)


def row(name: str, timings: tuple[float, float, float]) -> None:
    original, converted, ratio = timings
    print(f"| {name} | {original * 1e3:.3f} | {converted * 1e3:.3f} | {ratio:.2f} |", flush=True)


def head_kernels(conv: torch.nn.Module, device: torch.device, dtype: torch.dtype, runs: int, timed) -> None:
    """fc6 alone, computed each way the converted layer could compute it, on maps of growing size."""
    weight, bias = conv.weight, conv.bias
    flat = weight.reshape(weight.shape[0], -1)

    def gather_gemm(x: torch.Tensor) -> torch.Tensor:
        rows = gather_windows(x, tuple(weight.shape[2:]))
        return F.linear(rows, flat, bias).permute(0, 3, 1, 2)

    def im2col_gemm(x: torch.Tensor) -> torch.Tensor:
        columns = F.unfold(x, tuple(weight.shape[2:]))  # N, C·k·k, L
        y = torch.matmul(flat, columns) + bias[:, None]
        h, w = x.shape[2] - weight.shape[2] + 1, x.shape[3] - weight.shape[3] + 1
        return y.reshape(x.shape[0], -1, h, w)

    print("\n## fc6 alone (512×7×7 → 4096): convolution against its GEMM forms, ms\n")
    print("| map, batch | convolution | gathered windows + GEMM | F.unfold + GEMM | layer's choice |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for size, batch in ((7, 1), (7, 8), (14, 1), (14, 8), (28, 1)):
            x = torch.randn(batch, 512, size, size, device=device, dtype=dtype)
            plain = timed(lambda: F.conv2d(x, weight, bias))
            ways = [timed(lambda: gather_gemm(x)), timed(lambda: im2col_gemm(x)), timed(lambda: conv(x))]
            medians = [paired(plain, way, runs)[:2] for way in ways]
            cells = [f"{medians[0][0] * 1e3:.3f}"] + [f"{b * 1e3:.3f}" for _, b in medians]
            print(f"| {size}×{size}, {batch} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--batches", default=None, help="native-size batches [default: 1,8 on CPU, 1,8,64 on CUDA]")
    parser.add_argument("--reps", type=int, default=20, help="calls per CUDA timing")
    parser.add_argument("--tf32", action="store_true", help="let CUDA use TF32 for float32 (its cuDNN default)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA graph replays of both sides: the GPU's time, not the host's",
    )
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="also time fc6 alone in each of its forms")
    parser.add_argument("--dense-sizes", default="448,896", help="large input sizes for the dense-map comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    batches = [int(b) for b in (args.batches or ("1,8,64" if cuda else "1,8")).split(",")]
    timed = timer(device, args.reps, graphs=cuda and args.cuda_graphs)
    torch.manual_seed(0)
    cpu_model = torchvision.models.vgg16(weights=None).eval()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, median of {args.runs} paired runs", end="")
    graphs = ", CUDA graph replays" if args.cuda_graphs else ""
    print(f", {args.reps} calls per timing, TF32 {'on' if args.tf32 else 'off'}{graphs}" if cuda else "")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        model = cpu_model.to(device=device, dtype=dtype)
        converted = fcconv.rewrite(model, (3, 224, 224)).module
        run_dtype(args, model, converted, device, dtype, dtype_name, batches, timed)
        del model, converted
        cpu_model = torchvision.models.vgg16(weights=None).eval() if cuda else cpu_model


def run_dtype(args, model, converted, device, dtype, dtype_name, batches, timed) -> None:
    cuda = device.type == "cuda"
    runtime = "PyTorch, CUDA graphs" if cuda and args.cuda_graphs else "PyTorch eager"
    runtime += f", CUDA {dtype_name}" if cuda else ""
    print(f"\n## Native size (224×224), {dtype_name}: latency, ms\n")
    print("| runtime, batch | original | converted | converted / original (median of pairs) |\n|---|---|---|---|")
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            row(f"{runtime}, batch {batch}", paired(timed(lambda: model(x)), timed(lambda: converted(x)), args.runs))

    if args.kernels:
        head_kernels(converted.get_submodule("classifier.0"), device, dtype, args.runs, timed)

    onnx = not args.skip_onnx and not cuda
    if onnx:
        tmp = Path(tempfile.mkdtemp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp / "original.onnx"), dynamo=False,
                              input_names=["input"], output_names=["scores"],
                              dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}})  # fmt: skip
        fcconv.export_onnx(converted, tmp / "converted.onnx", (3, 224, 224))
        fcconv.export_onnx(converted, tmp / "gemm.onnx", (3, 224, 224), head_format="gemm")
        # onnxruntime's default optimization level, as a deployment would run it
        ort_orig, ort_conv = OnnxRunner(tmp / "original.onnx", "all"), OnnxRunner(tmp / "converted.onnx", "all")
        ort_gemm = OnnxRunner(tmp / "gemm.onnx", "all")
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)
            for label, ort in (("Conv head", ort_conv), ("gemm head", ort_gemm)):
                row(
                    f"onnxruntime CPU, batch {batch}, {label}",
                    paired(timed(lambda: ort_orig(x)), timed(lambda: ort(x)), args.runs),
                )

    if args.skip_dense:
        return
    print(f"\n## Dense map against crops, {dtype_name}: one large image against all its 224×224 crops at stride 32\n")
    print("| runtime, input | crops | crops ms | dense ms | speedup | FLOP ratio |\n|---|---|---|---|---|---|")
    features_rows = []
    with torch.inference_mode():
        for size in [int(s) for s in args.dense_sizes.split(",")]:
            x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
            batch = crops(x, 224, 32)
            chunks = batch.split(64)
            ratio = flops(lambda: [model(c) for c in chunks]) / flops(lambda: converted(x))
            runs = max(5, args.runs // 2) if not cuda else args.runs
            t_crops, t_dense, _ = paired(timed(lambda: [model(c) for c in chunks]), timed(lambda: converted(x)), runs)
            print(f"| {runtime}, {size}×{size} | {len(batch)} | {t_crops * 1e3:.1f} | {t_dense * 1e3:.1f} | "
                  f"{t_crops / t_dense:.1f} | {ratio:.1f} |", flush=True)  # fmt: skip
            if onnx:
                for label, dense in (("Conv head", ort_conv), ("--head-format gemm", ort_gemm)):
                    t_crops, t_dense, _ = paired(
                        timed(lambda: [ort_orig(c) for c in chunks]), timed(lambda: dense(x)), runs
                    )
                    print(f"| onnxruntime CPU, {size}×{size}, {label} | {len(batch)} | {t_crops * 1e3:.0f} | "
                          f"{t_dense * 1e3:.0f} | {t_crops / t_dense:.1f} | {ratio:.1f} |", flush=True)  # fmt: skip
            if cuda:
                goal = flops(lambda: converted(x)) / flops(lambda: model.features(x))
                t_features, t_dense, per_pair = paired(
                    timed(lambda: model.features(x)), timed(lambda: converted(x)), args.runs
                )
                features_rows.append((size, t_features, t_dense, per_pair, goal))
    if features_rows:
        print(f"\n## Dense map against the features alone, {dtype_name} (goal: ratio ≤ FLOP ratio)\n")
        print("| input | features ms | dense map ms | dense / features (median of pairs) | FLOP ratio |")
        print("|---|---|---|---|---|")
        for size, t_features, t_dense, per_pair, goal in features_rows:
            print(f"| {size}×{size} | {t_features * 1e3:.3f} | {t_dense * 1e3:.3f} | {per_pair:.3f} | {goal:.3f} |")


if __name__ == "__main__":
    main()
