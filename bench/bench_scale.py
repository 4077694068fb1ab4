"""Scale: a classifier whose head alone is 3 GB converts and exports within the memory bound.

    python bench/bench_scale.py [--hidden 29000]

Builds a small convolutional trunk (3×224×224 → 512×7×7) with a two-layer head,
25088 → HIDDEN → 1000, saves its state_dict (about 3 GB at the default width),
then runs ``fcconv convert`` on it in a fresh process. The export passes protobuf's
2 GiB limit, so its weights go to ONNX external data beside the file; the
verification reads them back in onnxruntime. Reports wall time and peak resident
memory against 1.5 × the checkpoint's size plus an idle ``import torch``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

HIDDEN = int(os.environ.get("FCCONV_BENCH_HIDDEN", "29000"))


class WideHeadClassifier(nn.Module):
    """Four strided convolutions to a 512×7×7 map, then flatten and a Linear chain with a very wide layer."""

    def __init__(self, hidden: int = HIDDEN, classes: int = 1000) -> None:
        super().__init__()
        widths = [3, 64, 128, 256, 512]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7))
        self.fc1 = nn.Linear(512 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def main() -> None:
    from bench_convert import CONVERT, IDLE, measure

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    checkpoint = tmp / "wide_head.pt"
    torch.manual_seed(0)
    with torch.no_grad():
        model = WideHeadClassifier(args.hidden)
        # A scaled uniform fill is much faster than the default initialisation at this size.
        for p in model.parameters():
            p.uniform_(-1, 1).mul_(p.shape[-1] ** -0.5 if p.dim() > 1 else 0.01)
    torch.save(model.state_dict(), checkpoint)
    del model
    head_gb = (25088 * args.hidden + args.hidden * 1001 + args.hidden) * 4 / 1e9
    size_mb = checkpoint.stat().st_size / 2**20
    idle_wall, idle_mb = measure(IDLE, [], tmp)
    os.environ["FCCONV_BENCH_HIDDEN"] = str(args.hidden)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    target = tmp / "wide_head.fcn.onnx"
    convert_wall, convert_mb = measure(
        CONVERT,
        ["convert", str(checkpoint), "--arch", "bench_scale:WideHeadClassifier", "-o", str(target),
         "--sizes", "224x224,257x320,448x448"],
        tmp,
    )  # fmt: skip
    data = target.with_name(target.name + ".data")
    budget = 1.5 * size_mb + idle_mb
    print(f"head {head_gb:.2f} GB; checkpoint {size_mb:.0f} MB; idle `import torch` {idle_mb:.0f} MB\n")
    print("| step | wall s | peak MB |\n|---|---|---|")
    print(f"| fcconv convert (3 sizes verified) | {convert_wall:.1f} | {convert_mb:.0f} |")
    print(f"\nwritten: {target.name} {target.stat().st_size / 2**20:.2f} MB, "
          f"{data.name} {data.stat().st_size / 2**20:.0f} MB")  # fmt: skip
    print(f"memory: convert peak / (1.5 × checkpoint + idle) = {convert_mb / budget:.2f} (goal ≤ 1)")
    for item in tmp.iterdir():
        item.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
