"""Every torchvision classifier through fcconv: converted and verified, or refused with the reason.

    python bench/zoo.py [--models vgg16,resnet18] [--out docs/zoo.md] [--timeout 1800] [--resume]

Each model runs in a fresh process, one after another (the largest hold several GB):

1. its architecture is built on the meta device and analysed at its native input
   size (``fcconv.load.native_input_shape``); a refusal (``NotConvertibleError``, exit
   code 3 on the command line) is recorded with its message and needs no weights;
2. otherwise it is built with ``weights=None`` after ``torch.manual_seed(0)``, with its
   default 1000 classes, in float32 and eval mode, rewritten with ``fcconv.rewrite``
   and verified with ``fcconv.verify`` at the native size and at the two larger sizes of
   ``fcconv.verify.default_sizes`` (a larger odd non-square size and twice the native).

Results are appended to a JSON-lines file beside the output (``docs/zoo.jsonl``) as
each model finishes, and the Markdown table is rewritten after every model, so an
interrupted run leaves a valid document; ``--resume`` keeps the models already in
the JSON-lines file and runs the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# --- one model, in the child process ---------------------------------------------------------------


def _name(node: Any, modules: dict[str, Any]) -> str:
    """How a head node is written in the pattern: a module's class, a function's or method's name."""
    if node.op == "call_module":
        module = modules[node.target]
        kind = type(module).__name__
        if hasattr(module, "output_size"):
            return f"{kind}({_pooled(module.output_size, kind)})"
        return kind
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if name.startswith("adaptive_") and len(node.args) > 1:
            return f"{name}({_pooled(node.args[1], name)})"
        return name
    if node.target in ("mean", "amax"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return f".{node.target}({list(dims) if isinstance(dims, (list, tuple)) else dims})"
    return f".{node.target}()"


def _pooled(size: Any, kind: str) -> str:
    """An adaptive pooling's output size as ``7×7``, whether it was given as 7 or (7, 7)."""
    rank = next((int(d) for d in ("1", "2", "3") if kind.endswith(f"{d}d")), 1)
    sizes = [size] * rank if isinstance(size, int) else list(size)
    return "×".join("any" if s is None else str(s) for s in sizes)


COLLAPSES = {"flatten", "view", "reshape", "Flatten", ".flatten()", ".view()", ".reshape()"}
REDUCTIONS = (".mean(", ".amax(", "mean", "amax")


def head_pattern(conversion: Any) -> str:
    """The head as the rewriter cut it, e.g. ``AdaptiveAvgPool2d(1) → flatten → Dropout–Linear``.

    Read from the original's head graph (``Conversion.head``): the layers up to the
    collapse of the feature map, joined by arrows, then the layers after it, joined by
    dashes. A head with no Linear layer is already fully convolutional.
    """
    modules = dict(conversion.head.named_modules())
    nodes = [n for n in conversion.head.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    names = [_name(n, modules) for n in nodes]
    collapses = [i for i, name in enumerate(names) if name in COLLAPSES or name.startswith(REDUCTIONS)]
    cut = collapses[0] if collapses else len(names) - 1
    collapse, after = names[: cut + 1], names[cut + 1 :]
    text = " → ".join(collapse + (["–".join(after)] if after else []))
    if not conversion.layers:
        return f"already fully convolutional ({text})"
    return text


def reads(conversion: Any) -> str:
    """What one output position reads: a window of the feature map, or all of it through the kept pooling."""
    g = conversion.geometry
    shape = "×".join(map(str, g.feature_shape))
    if g.window is None:
        return f"global pool of {shape}"
    window = "×".join(map(str, g.window))
    stride = "" if all(s == 1 for s in g.stride) else f", stride {'×'.join(map(str, g.stride))}"
    return f"{window} window of {shape}{stride}"


def run_one(name: str, batch: int) -> dict[str, Any]:
    import torch
    import torchvision

    import fcconv
    from fcconv.load import build_architecture, native_input_shape
    from fcconv.verify import default_sizes

    start = time.perf_counter()
    shape = native_input_shape(name) or (3, 224, 224)
    result: dict[str, Any] = {"model": name, "input": list(shape)}
    try:
        fcconv.analyze(build_architecture(name), shape)
    except fcconv.NotConvertibleError as exc:
        return {**result, "result": "refused", "reason": str(exc), "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - start}  # fmt: skip
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # as `fcconv convert --arch` builds them; eval mode never runs the aux heads
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs).eval()
    built = time.perf_counter()
    try:
        conversion = fcconv.rewrite(model, shape)
    except fcconv.NotConvertibleError as exc:  # the analysis passed; a refusal here would be a difference
        return {**result, "result": "refused", "reason": str(exc), "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - start}  # fmt: skip
    rewritten = time.perf_counter()
    sizes = default_sizes(shape)
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, batch=batch, conversion=conversion)
    checks = []
    for size in sizes:
        at = [c for c in report.checks if tuple(c.input_size) == tuple(size)]
        checks.append({
            "size": list(size),
            "max_rel": max(c.max_rel for c in at),
            "max_abs": max(c.max_abs for c in at),
            "scale": min(c.scale for c in at),
            "passed": all(c.passed for c in at),
            "readings": [c.reference for c in at],
            "output": list(at[-1].output_shape),
            "message": "; ".join(c.message for c in at if c.message),
        })  # fmt: skip
    done = time.perf_counter()
    return {
        **result,
        "result": "converted" if report.passed else "failed",
        "reason": "" if report.passed else "verification failed",
        "pattern": head_pattern(conversion),
        "reads": reads(conversion),
        "layers": [layer.name for layer in conversion.layers],
        "head_parameters": conversion.head_parameters,
        "total_parameters": conversion.total_parameters,
        "rtol": report.rtol,
        "checks": checks,
        "seconds": done - start,
        "seconds_build": built - start,
        "seconds_rewrite": rewritten - built,
        "seconds_verify": done - rewritten,
    }


def child(name: str, batch: int, threads: int | None) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    try:
        record = run_one(name, batch)
    except Exception as exc:  # noqa: BLE001 - whatever goes wrong is the model's result, reported in one line
        text = " ".join(str(exc).split())[:300]
        record = {"model": name, "result": "failed", "reason": f"{type(exc).__name__}: {text}"}
    peak = next((line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")), None)
    record["peak_mb"] = int(peak) / 1024 if peak else None
    print("ZOO-RESULT " + json.dumps(record), flush=True)


# --- the whole zoo, in the parent process ----------------------------------------------------------


def run_in_child(name: str, args: argparse.Namespace, script: str = __file__) -> dict[str, Any]:
    """``script --child name`` in a fresh process, and the record it prints (or why it printed none)."""
    command = [sys.executable, script, "--child", name, "--batch", str(args.batch)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "result": "failed", "reason": f"time limit of {args.timeout} s reached",
                "seconds": time.perf_counter() - start}  # fmt: skip
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("ZOO-RESULT "):
            return json.loads(line[len("ZOO-RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    why = "killed (out of memory?)" if done.returncode == -9 else f"exit code {done.returncode}"
    return {"model": name, "result": "failed", "reason": f"the process ended without a result, {why}: {tail}",
            "seconds": time.perf_counter() - start}  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        memory_text = f", {memory / 2**20:.0f} GiB memory"
    except (OSError, StopIteration):
        memory_text = ""
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores{memory_text}"


def fmt_size(size: list[int]) -> str:
    return "×".join(map(str, size))


def render(records: list[dict[str, Any]], args: argparse.Namespace, wall: float, versions: dict[str, str]) -> str:
    counts = {kind: sum(r["result"] == kind for r in records) for kind in ("converted", "refused", "failed")}
    threads = args.threads or versions["threads"]
    lines = [
        "# The torchvision zoo",
        "",
        "Every classification model of the installed torchvision "
        "(`torchvision.models.list_models(module=torchvision.models)`) through fcconv. timm's families and "
        "Hugging Face's image classifiers: [zoo-timm-hf.md](zoo-timm-hf.md).",
        "",
        f"**{len(records)} models: {counts['converted']} converted and verified, {counts['refused']} refused "
        f"(exit code 3), {counts['failed']} failed.**",
        "",
        "How it was produced:",
        "",
        "```bash",
        f"python bench/zoo.py{' ' + ' '.join(args.argv) if args.argv else ''}",
        "```",
        "",
        f"- torch {versions['torch']}, torchvision {versions['torchvision']}, Python {platform.python_version()}",
        f"- machine: {machine()}; {threads} torch threads; one model at a time, each in a fresh process",
        f"- the models' wall times added up: {wall / 60:.1f} min, each process's start and imports included",
        "- each model: built with `weights=None` after `torch.manual_seed(0)`, its default 1000 classes, "
        "float32, eval mode, at its native input size (`fcconv.load.native_input_shape`: the smallest crop "
        "of its published weights)",
        "- refusals come from analysing the architecture built on the meta device (no weights are needed to "
        "refuse); the reason is the `NotConvertibleError` message, which `fcconv convert` prints with exit code 3",
        f"- verification: `fcconv.verify` on random inputs (seed 0, batch {args.batch}) at the native size "
        "(against the original's output and the sliding-window reading) and at the two larger sizes of "
        "`fcconv.verify.default_sizes` (a larger odd non-square size, and twice the native size), each against "
        "the sliding-window reading of the original head; a check passes when the max absolute error is at most "
        "rtol (1e-4) × the reference's largest magnitude",
        "- error columns: the max error relative to the reference's largest magnitude, as the verifier "
        "reports it (`SizeCheck.max_rel`), the worst over the readings at that size; 0 means bit-identical: "
        "the converted model runs the original's trunk unchanged and computes each converted layer with the "
        "same `F.linear` GEMM as the original `Linear` on the same rows; where it runs over a map of windows "
        "(another memory layout or row count than the reference's), the rounding differs by about 1e-7",
        "- parameters: those of the layers the rewriter turned into convolutions (`Conversion.head_parameters`), "
        "and their share of the whole model",
        "- seconds: the model's whole process (build, rewrite, verification at three sizes); ONNX export is "
        "not part of this run. The machine is shared with other work, so a model's seconds can vary several "
        "times over between runs",
        "",
        "Head pattern: the original's head as the rewriter cut it (`Conversion.head`): the layers up to the "
        "collapse of the feature map, joined by arrows, then the layers after it, joined by dashes. "
        "Reads: what one output position of the converted model reads, a window of the feature map "
        "(C×H×W at the native size) or the whole map through the global pooling the head keeps.",
        "",
        "| model | input | head pattern | reads | result | converted parameters | native | larger | largest | s |",
        "|---|---|---|---|---|---:|---|---|---|---:|",
    ]
    for r in records:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "–"
        size = fmt_size(r["input"][1:]) if "input" in r else "–"
        if r["result"] == "refused" or "checks" not in r:
            reason = r.get("reason", "").replace("|", "\\|")
            lines.append(f"| {r['model']} | {size} | – | – | {r['result']}: {reason} | – | – | – | – | {seconds} |")
            continue
        share = r["head_parameters"] / r["total_parameters"] if r["total_parameters"] else 0.0
        params = f"{r['head_parameters']:,} ({100 * share:.1f}%)"
        errors = []
        for check in r["checks"]:
            mark = "" if check["passed"] else " ✗"
            errors.append(f"{fmt_size(check['size'])}: {check['max_rel']:.1e}{mark}")
        result = r["result"] if r["result"] == "converted" else f"{r['result']}: {r.get('reason', '')}"
        lines.append(
            f"| {r['model']} | {size} | {r['pattern']} | {r['reads']} | {result} | {params} | "
            f"{' | '.join(errors)} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated torchvision model names (default: all)")
    parser.add_argument("--out", default="docs/zoo.md", help="the Markdown report (default docs/zoo.md)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per model (default 1800)")
    parser.add_argument("--batch", type=int, default=2, help="verification batch (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads per model (default: torch's own)")
    parser.add_argument("--resume", action="store_true", help="keep results already in the JSON-lines file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-model lines")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.threads)
        return
    args.argv = [a for a in sys.argv[1:] if a not in ("--resume", "--quiet")]

    import torch
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        chosen = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in names]
        if unknown:
            parser.error(f"not torchvision classification models: {', '.join(unknown)}")
        names = chosen
    out = Path(args.out)
    results_path = out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    if args.resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            if record["model"] in names:
                records[record["model"]] = record
    else:
        results_path.write_text("")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(highlight=False, quiet=args.quiet)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        task = progress.add_task("torchvision classifiers", total=len(names))
        for name in names:
            if name in records:
                console.print(f"{name}: kept from {results_path}", markup=False)
                progress.advance(task)
                continue
            progress.update(task, description=f"converting {name}")
            started = time.perf_counter()
            record = run_in_child(name, args)
            record["wall"] = time.perf_counter() - started  # with the process's start and imports
            records[name] = record
            with results_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            detail = record.get("reason", "") if record["result"] != "converted" else record.get("pattern", "")
            console.print(f"{name}: {record['result']} in {record.get('seconds', 0):.1f} s: {detail}", markup=False)
            progress.advance(task)
            ordered = [records[n] for n in names if n in records]
            out.write_text(render(ordered, args, sum(r.get("wall", 0.0) for r in ordered), versions))
    ordered = [records[n] for n in names if n in records]
    out.write_text(render(ordered, args, sum(r.get("wall", 0.0) for r in ordered), versions))
    print(f"wrote {out} and {results_path}")


if __name__ == "__main__":
    main()
