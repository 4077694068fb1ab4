"""VGG16: converted against original, side by side in one process; prints medians and ratios.

    python bench/bench_vgg16.py [--runs 7] [--threads 2] [--skip-onnx] [--skip-dense]

Every figure is the median of paired runs (original and converted alternate), so
drifts of a shared machine hit both sides alike. Ratios are converted / original
for latency, and crops / dense for the dense-map speedup, next to the FLOP ratio
counted with torch.utils.flop_counter.
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
import torchvision
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fcconv  # noqa: E402
from fcconv.export import OnnxModel  # noqa: E402


def paired(a: Callable[[], object], b: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """Medians of ``runs`` alternating timings of a and b (after one warm-up each), and the median of b/a per pair."""
    a(), b()
    ta, tb = [], []
    for _ in range(runs):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
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
    print(f"| {name} | {original * 1e3:.1f} | {converted * 1e3:.1f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--dense-sizes", default="448,896", help="large input sizes for the dense-map comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    conversion = fcconv.rewrite(model, (3, 224, 224))
    converted = conversion.module
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} paired runs\n")

    print("## Native size (224×224): latency, ms\n")
    print("| runtime, batch | original | converted | converted / original (median of pairs) |\n|---|---|---|---|")
    with torch.inference_mode():
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            row(f"PyTorch eager, batch {batch}", paired(lambda: model(x), lambda: converted(x), args.runs))

    if not args.skip_onnx:
        tmp = Path(tempfile.mkdtemp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp / "original.onnx"), dynamo=False,
                              input_names=["input"], output_names=["scores"],
                              dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}})  # fmt: skip
        fcconv.export_onnx(converted, tmp / "converted.onnx", (3, 224, 224))
        fcconv.export_onnx(converted, tmp / "gemm.onnx", (3, 224, 224), head_format="gemm")
        # onnxruntime's default optimization level, as a deployment would run it
        ort_orig, ort_conv = OnnxModel(tmp / "original.onnx", "all"), OnnxModel(tmp / "converted.onnx", "all")
        ort_gemm = OnnxModel(tmp / "gemm.onnx", "all")
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            row(
                f"onnxruntime CPU, batch {batch}, Conv head",
                paired(lambda: ort_orig(x), lambda: ort_conv(x), args.runs),
            )
            row(
                f"onnxruntime CPU, batch {batch}, gemm head",
                paired(lambda: ort_orig(x), lambda: ort_gemm(x), args.runs),
            )

    if args.skip_dense:
        return
    print("\n## Dense map against crops: one large image against all its 224×224 crops at stride 32\n")
    print("| runtime, input | crops | crops ms | dense ms | speedup | FLOP ratio |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for size in [int(s) for s in args.dense_sizes.split(",")]:
            x = torch.randn(1, 3, size, size)
            batch = crops(x, 224, 32)
            chunks = batch.split(64)
            ratio = flops(lambda: [model(c) for c in chunks]) / flops(lambda: converted(x))
            t_crops, t_dense, _ = paired(
                lambda: [model(c) for c in chunks], lambda: converted(x), max(3, args.runs // 2)
            )
            print(f"| PyTorch eager, {size}×{size} | {len(batch)} | {t_crops * 1e3:.0f} | {t_dense * 1e3:.0f} | "
                  f"{t_crops / t_dense:.1f} | {ratio:.1f} |")  # fmt: skip
            if not args.skip_onnx:
                for label, dense in (("Conv head", ort_conv), ("--head-format gemm", ort_gemm)):
                    t_crops, t_dense, _ = paired(
                        lambda: [ort_orig(c) for c in chunks], lambda: dense(x), max(3, args.runs // 2)
                    )
                    print(f"| onnxruntime CPU, {size}×{size}, {label} | {len(batch)} | {t_crops * 1e3:.0f} | "
                          f"{t_dense * 1e3:.0f} | {t_crops / t_dense:.1f} | {ratio:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
