"""What a low-rank head (``--rank R``) saves: VGG16's converted model at full rank and at lower ranks, side by side.

    python bench/bench_rank.py [--ranks 512,256] [--runs 5]

For each rank: the head's weights and multiply-adds per output position, and the median wall time of one
forward pass at batch 1, at the native 224×224 (one position) and at 448×448 (an 8×8 map), in PyTorch eager on
the CPU and in onnxruntime (the ONNX export fcconv writes), on CUDA too where a GPU is present; and the
head alone in PyTorch on the trunk's feature map at those sizes, where the trunk does not dilute the rank's
effect. The weights are random (no download), which changes nothing here: the cost depends on the rank
alone. Ratios are against the full-rank conversion, every variant timed in turn within each round.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

SIZES = ((224, 224), (448, 448))


def _calls(module: torch.nn.Module, session, head: torch.nn.Module) -> dict:
    """One forward pass of each kind, by the column it is timed in."""
    name = session.get_inputs()[0].name
    calls = {}
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        calls[f"torch {size[0]}"] = lambda x=x: _no_grad(module, x)
        calls[f"ort {size[0]}"] = lambda feed={name: x.numpy()}: session.run(None, feed)
        if torch.cuda.is_available():
            on_gpu = copy.deepcopy(module).cuda()
            calls[f"cuda {size[0]}"] = lambda x=x.cuda(), m=on_gpu: _on_gpu(m, x)
    for cells in (7, 14):
        features = torch.randn(1, 512, cells, cells)
        calls[f"head torch {cells * 32}"] = lambda f=features: _no_grad(head, f)
    return calls


def _no_grad(module: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        module(x)


def _on_gpu(module: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        module(x)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="512,256")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime as ort

    from fcconv.export import export_onnx
    from fcconv.low_rank import factor_head
    from fcconv.rewrite import rewrite

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    folder = Path(tempfile.mkdtemp())
    rows, calls = [], []
    for rank in [None, *(int(r) for r in args.ranks.split(","))]:
        conversion = rewrite(model, (3, 224, 224))
        if rank is None:
            weights = sum(layer.parameters for layer in conversion.layers)
            macs = sum(conversion.module.get_submodule(layer.name).weight.numel() for layer in conversion.layers)
        else:
            factored = factor_head(conversion, rank)
            weights = sum(f.factored_parameters for f in factored)
            macs = sum(f.factored_macs for f in factored)
        path = folder / f"vgg16.{rank or 'full'}.onnx"
        export_onnx(conversion.module, path, (3, 224, 224))
        module, session = conversion.module, ort.InferenceSession(str(path))
        # the head alone, on the trunk's feature map (512×7×7 at the native size, 512×14×14 at 448×448)
        layers = [module.get_submodule(f"classifier.{index}") for index in (0, 3, 6)]
        head = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        rows.append({"rank": rank or "full", "weights": weights, "macs": macs})
        calls.append(_calls(module, session, head))
    # every variant is timed in turn within each round, so that a change in the machine's load falls on all alike
    for key in calls[0]:
        runs = 4 * args.runs if key.startswith("head") else args.runs
        times = [[] for _ in calls]
        for call in calls:
            call[key]()  # warm-up: allocations, kernel choice
        for _ in range(runs):
            for index, call in enumerate(calls):
                start = time.perf_counter()
                call[key]()
                times[index].append(time.perf_counter() - start)
        for row, measured in zip(rows, times):
            row[key] = 1000 * statistics.median(measured)
        print(key, [round(row[key], 1) for row in rows], flush=True)
    full = rows[0]
    timed = [key for key in full if key not in ("rank", "weights", "macs")]
    print("\n| head rank | head weights | multiply-adds per position | " + " | ".join(f"{k} ms" for k in timed) + " |")
    print("|---" * (3 + len(timed)) + "|")
    for row in rows:
        cells = [f"{row[k]:.1f} ({row[k] / full[k]:.2f}×)" for k in timed]
        print(
            f"| {row['rank']} | {row['weights']:,} ({row['weights'] / full['weights']:.1%}) | "
            f"{row['macs']:,} ({row['macs'] / full['macs']:.1%}) | " + " | ".join(cells) + " |"
        )
    print(f"\ntorch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
