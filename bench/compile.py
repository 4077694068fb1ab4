"""torch.compile on converted models: compiled converted against compiled original, side by side in one process.

    python bench/compile.py [--runs 5] [--batches 1,8,64] [--models vgg16,resnet50]
    python bench/compile.py --device cuda [--dtypes float32,bfloat16] [--tf32] [--mode max-autotune]

Every module is compiled with ``torch.compile(fullgraph=True, dynamic=True)`` (``--static`` for
``dynamic=False``), with ``--backend`` (default inductor); the first call of each is its compilation,
printed as such. Two comparisons, each the median of paired runs (bench_vgg16.py's timer and pairing):

* the native size (224×224) at each batch: compiled converted / compiled original;
* the dense map (``dense=True``) of one image at twice the native size (448×448) against the compiled
  features alone (the trunk, every layer before the global pooling and the head), next to the FLOP ratio
  dense ÷ features: the features-only FLOP-rate bound of docs/performance.md, met when the time ratio is
  at most the FLOP ratio.

float32 runs with TF32 off (how fcconv verifies) unless ``--tf32``; bfloat16 runs on CUDA only. Models
have random weights (``weights=None``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_vgg16 import DTYPES, flops, paired, timer  # noqa: E402

import fcconv  # noqa: E402

NATIVE = (3, 224, 224)


def trunk(name: str, model: nn.Module) -> nn.Module:
    """The features alone: every layer before the global pooling and the head."""
    if name.startswith("vgg"):
        return model.features
    return nn.Sequential(*list(model.children())[:-2])  # ResNet: up to layer4, without avgpool and fc


def compiled(module: nn.Module, args: argparse.Namespace) -> nn.Module:
    return torch.compile(module, fullgraph=True, dynamic=not args.static, backend=args.backend, mode=args.mode)


def first_call(label: str, fn: Callable[[], object], sync: Callable[[], None]) -> None:
    """Call ``fn`` once (the compilation) and print how long it took."""
    start = time.perf_counter()
    fn()
    sync()
    print(f"| {label} | {time.perf_counter() - start:.1f} |", flush=True)


def measure(name, dtype_name, device, batches, args, native_rows, dense_rows) -> None:
    """Time one model in one dtype: the native size at each batch, and the dense map against the features alone."""
    dtype = DTYPES[dtype_name]
    timed = timer(device, args.reps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().to(device=device, dtype=dtype)
    converted = fcconv.convert(model, NATIVE)
    dense = fcconv.convert(model, NATIVE, dense=True)
    features = trunk(name, model)
    c_model, c_converted = compiled(model, args), compiled(converted, args)
    c_dense, c_features = compiled(dense, args), compiled(features, args)
    label = f"{name}, {dtype_name}"
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, *NATIVE, device=device, dtype=dtype)
            first_call(f"{label}, original, {batch}×224²", lambda: c_model(x), sync)
            first_call(f"{label}, converted, {batch}×224²", lambda: c_converted(x), sync)
            t = paired(timed(lambda: c_model(x)), timed(lambda: c_converted(x)), args.runs)
            native_rows.append((label, batch, *t))
        size = args.dense_size
        x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        first_call(f"{label}, features alone, 1×{size}²", lambda: c_features(x), sync)
        first_call(f"{label}, dense map, 1×{size}²", lambda: c_dense(x), sync)
        bound = flops(lambda: dense(x)) / flops(lambda: features(x))
        t = paired(timed(lambda: c_features(x)), timed(lambda: c_dense(x)), args.runs)
        dense_rows.append((label, size, *t, bound))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--dtypes", default=None, help="comma-separated [default: float32, and bfloat16 on CUDA]")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--dense-size", type=int, default=448, help="the dense map's input size [2× native]")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20, help="calls per CUDA timing")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--tf32", action="store_true", help="let CUDA use TF32 for float32")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--static", action="store_true", help="dynamic=False: one graph per input shape")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    if not cuda and "bfloat16" in dtypes:
        dtypes.remove("bfloat16")  # bfloat16 is measured on CUDA only
    batches = [int(b) for b in args.batches.split(",")]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, backend {args.backend}, mode {args.mode or 'default'}, "
          f"dynamic={not args.static}, fullgraph=True, median of {args.runs} paired runs"
          + (f", {args.reps} calls per timing, TF32 {'on' if args.tf32 else 'off'}" if cuda else ""))  # fmt: skip

    native_rows, dense_rows = [], []
    print("\n## First calls (compilation), s\n\n| model, dtype, module, input | s |\n|---|---|")
    for name in args.models.split(","):
        for dtype_name in dtypes:
            torch._dynamo.reset()
            measure(name, dtype_name, device, batches, args, native_rows, dense_rows)

    print("\n## Native size (224×224): compiled converted / compiled original\n")
    print("| model, dtype | batch | original ms | converted ms | converted / original (median of pairs) |")
    print("|---|---|---|---|---|")
    for label, batch, original, converted, ratio in native_rows:
        print(f"| {label} | {batch} | {original * 1e3:.3f} | {converted * 1e3:.3f} | {ratio:.3f} |")
    print("\n## Dense map of one image against the features alone, both compiled (goal: ratio ≤ FLOP ratio)\n")
    print("| model, dtype | input | features ms | dense map ms | dense / features (median of pairs) | FLOP ratio |")
    print("|---|---|---|---|---|---|")
    for label, size, features, dense_t, ratio, bound in dense_rows:
        met = "met" if ratio <= bound else "not met"
        print(f"| {label} | {size}×{size} | {features * 1e3:.3f} | {dense_t * 1e3:.3f} | {ratio:.3f} | "
              f"{bound:.3f} ({met}) |")  # fmt: skip


if __name__ == "__main__":
    main()
