"""What a conversion costs: wall time and peak memory of `fcconv convert`, against a plain export.

    python bench/bench_convert.py [--arch vgg16]

Each step runs in a fresh process, one after another, and reports its wall time and
peak resident memory (the child's VmHWM):

* idle: ``import torch`` and nothing else;
* plain export: load the state_dict into the torchvision model, ``torch.onnx.export`` it;
* fcconv convert: the whole command (load, rewrite, export, verification at three sizes),
  with the default ONNX exporter (torch.export-based) and with ``--onnx-exporter torchscript``.

The goals compare fcconv convert with the plain export (time) and with the
checkpoint's size plus the idle process (memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDLE = "import torch"
CONVERT = "import sys; sys.argv[0] = 'fcconv'; from fcconv.cli import run; run()"
PLAIN_EXPORT = """
import sys, warnings, torch, torchvision
torch.set_num_threads(2)
model = torchvision.models.get_model(sys.argv[1], weights=None, num_classes=int(sys.argv[4]))
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
model.eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), sys.argv[3])
"""


# VmHWM, the peak resident set of this process's address space. (ru_maxrss would not
# do: Linux carries it over fork and exec, so a child would report the parent's peak.)
REPORT_PEAK = (
    "import atexit, os\n"
    "def _report_peak():\n"
    "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
    "    open(os.environ['PEAK_FILE'], 'w').write(hwm)\n"
    "atexit.register(_report_peak)\n"
)


def measure(code: str, argv: list[str], tmp: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB of ``code`` run in a fresh interpreter with ``argv``."""
    peak_file = tmp / "peak"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", REPORT_PEAK + code, *argv],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PEAK_FILE": str(peak_file)},
    )  # fmt: skip
    wall = time.perf_counter() - start
    return wall, int(peak_file.read_text()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    import torch
    import torchvision

    tmp = Path(tempfile.mkdtemp())
    checkpoint = tmp / f"{args.arch}.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(args.arch, weights=None, num_classes=args.classes).state_dict(), checkpoint)
    size_mb = checkpoint.stat().st_size / 2**20
    idle_wall, idle_mb = measure(IDLE, [], tmp)
    plain_wall, plain_mb = measure(
        PLAIN_EXPORT, [args.arch, str(checkpoint), str(tmp / "plain.onnx"), str(args.classes)], tmp
    )
    convert = ["convert", str(checkpoint), "--arch", args.arch]
    convert_wall, convert_mb = measure(CONVERT, [*convert, "-o", str(tmp / "fcn.onnx")], tmp)
    script_wall, script_mb = measure(
        CONVERT, [*convert, "--onnx-exporter", "torchscript", "-o", str(tmp / "ts.onnx")], tmp
    )
    budget = 1.5 * size_mb + idle_mb
    print(f"checkpoint {size_mb:.0f} MB; idle `import torch` {idle_mb:.0f} MB, {idle_wall:.1f} s\n")
    print("| step | wall s | peak MB |\n|---|---|---|")
    print(f"| plain torch.onnx.export | {plain_wall:.1f} | {plain_mb:.0f} |")
    print(f"| fcconv convert (3 sizes verified) | {convert_wall:.1f} | {convert_mb:.0f} |")
    print(f"| fcconv convert --onnx-exporter torchscript | {script_wall:.1f} | {script_mb:.0f} |")
    print(f"\nwall: convert / plain export = {convert_wall / plain_wall:.2f} (goal ≤ 2)")
    print(f"memory: convert peak / (1.5 × checkpoint + idle) = {convert_mb / budget:.2f} (goal ≤ 1)")
    print(
        f"exporters: default / torchscript = {convert_wall / script_wall:.2f} wall, {convert_mb / script_mb:.2f} peak"
    )


if __name__ == "__main__":
    main()
