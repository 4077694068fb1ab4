"""What a low-rank head (``--rank R``) saves: VGG16's converted model at full rank and at lower ranks, side by side.

    python bench/bench_rank.py [--ranks 512,256] [--runs 5]

For each rank: the head's weights and multiply-adds per output position, and the median wall time of one
forward pass at batch 1, at the native 224×224 (one position) and at 448×448 (an 8×8 map), in PyTorch eager on
the CPU and in onnxruntime (the ONNX export fcconv writes); on CUDA too where a GPU is present. The weights are
random (no download), which changes nothing here: the cost depends on the rank alone. Ratios are against the
full-rank conversion measured in the same run.
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

SIZES = ((224, 224), (448, 448))


def median_ms(call, runs: int) -> float:
    call()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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
    rows = []
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
        name = session.get_inputs()[0].name
        row = {"rank": rank or "full", "weights": weights, "macs": macs}
        for size in SIZES:
            x = torch.randn(1, 3, *size)
            with torch.inference_mode():
                row[f"torch {size[0]}"] = median_ms(lambda x=x, module=module: module(x), args.runs)
            feed = {name: x.numpy()}
            row[f"ort {size[0]}"] = median_ms(lambda feed=feed, session=session: session.run(None, feed), args.runs)
            if torch.cuda.is_available():
                on_gpu, xc = module.cuda(), x.cuda()

                def run_on_gpu(module=on_gpu, xc=xc) -> None:
                    with torch.inference_mode():
                        module(xc)
                    torch.cuda.synchronize()

                row[f"cuda {size[0]}"] = median_ms(run_on_gpu, 20)
                module.cpu()
        rows.append(row)
        print(row, flush=True)
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
