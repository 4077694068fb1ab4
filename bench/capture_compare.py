"""How the rewriter's plan of every torchvision classifier depends on the capture: torch.fx, torch.export, fcconv's order.

    python bench/capture_compare.py [--models alexnet,vgg11] [--captures fx,export] [--out capture.md] [--timeout 300]
    python bench/capture_compare.py --render a.jsonl,b.jsonl --out capture.md   # the table of earlier runs

For each model (``fcconv.load.torchvision_classifier_names()``: the classifiers and the
video classifiers), built on the meta device (no weights) at its native input size, a
child process runs ``fcconv.rewrite.analyze`` once per capture:

* ``fx``: ``fcconv.capture.trace`` (torch.fx symbolic tracing) alone;
* ``export``: ``fcconv.capture.export_graph`` (torch.export, non-strict, batch and
  spatial axes dynamic, lowered by ``lower_exported_program`` with the calls of the
  modules fx keeps whole put back) alone, without its time limit;
* ``fcconv``: fcconv's own order (``fcconv.capture.captures``: the export first, the
  trace where the export fails, runs past ``FCCONV_EXPORT_SECONDS``, fixes an axis or
  is refused), recording the capture the plan came from.

and records what the plan reports (layers, removed, geometry, notes), the refusal
message, or the capture error, and the seconds each took. A plan is the same when all
four fields are equal. ``--captures fx,fcconv`` measures what fcconv's order changes
against fx alone. Results go to a JSON-lines file beside the output, and the
Markdown table is rewritten at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CAPTURES = ("fx", "export", "fcconv")


def plan_with(name: str, capture: str) -> dict[str, Any]:
    """The plan of ``name`` analysed with ``capture`` standing in for fcconv's capture, as JSON-ready values."""
    import importlib

    from fcconv.capture import export_graph, trace
    from fcconv.errors import NotConvertibleError
    from fcconv.load import build_architecture, native_input_shape

    rewrite = importlib.import_module("fcconv.rewrite")
    shape = native_input_shape(name) or (3, 224, 224)
    chosen = {
        "fx": lambda model, _shape: iter([trace(model)]),
        "export": lambda model, shape: iter([export_graph(model, shape, seconds=0)]),
        "fcconv": rewrite.captures,
    }[capture]
    original = rewrite.captures
    rewrite.captures = chosen
    start = time.perf_counter()
    try:
        conversion = rewrite.analyze(build_architecture(name), shape)
    except NotConvertibleError as exc:
        return {"result": "refused", "reason": str(exc), "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - a capture that fails is a result here
        reason = " ".join(str(exc).split())[:300]
        return {"result": "failed", "reason": f"{type(exc).__name__}: {reason}", "seconds": time.perf_counter() - start}
    finally:
        rewrite.captures = original
    return {
        "result": "planned",
        "layers": [dataclasses.asdict(layer) for layer in conversion.layers],
        "removed": list(conversion.removed),
        "geometry": dataclasses.asdict(conversion.geometry),
        "notes": list(conversion.notes),
        "captured_by": conversion.captured_by,
        "seconds": time.perf_counter() - start,
    }


def child(name: str, capture: str) -> None:
    print(json.dumps(plan_with(name, capture), default=list))


def run(name: str, capture: str, timeout: float) -> dict[str, Any]:
    """One plan in a fresh process (a dynamic export can run for hours: the timeout bounds it)."""
    command = [sys.executable, __file__, "--child", name, "--capture", capture]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"result": "timeout", "reason": f"no plan within {timeout:.0f} s", "seconds": timeout}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.split())[-300:]
        return {"result": "crashed", "reason": tail, "seconds": time.perf_counter() - start}
    return json.loads(lines[-1])


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two plans report the same thing (refusals: the same message)."""
    if a["result"] != b["result"]:
        return False
    if a["result"] != "planned":
        return a["reason"] == b["reason"]
    return all(a[key] == b[key] for key in ("layers", "removed", "geometry", "notes"))


def difference(fx: dict[str, Any], ex: dict[str, Any], names: tuple[str, str] = ("fx", "export")) -> str:
    """One line saying how the second capture's plan differs from the first's."""
    if same(fx, ex):
        return "same"
    if fx["result"] != ex["result"]:
        return f"{names[0]} {fx['result']}, {names[1]} {ex['result']}: {ex.get('reason', '')[:160]}"
    if fx["result"] != "planned":
        return f"both {fx['result']}, other reason: {ex['reason'][:160]}"
    parts = []
    for key in ("layers", "removed", "geometry", "notes"):
        if fx[key] != ex[key]:
            parts.append(f"{key}: {_short(fx[key])} → {_short(ex[key])}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = [f"{v['name']}:{v['after']}@{tuple(v['kernel'])}" for v in value]
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k in ("window", "stride", "feature_shape")}
    text = json.dumps(value, default=list, ensure_ascii=False)
    return text if len(text) <= 140 else text[:137] + "..."


def table(records: list[dict[str, Any]], names: tuple[str, str]) -> str:
    a, b = names
    by = " | captured by" if b == "fcconv" else ""
    lines = [
        f"| model | {a} | {b}{by} | {a} s | {b} s | difference |",
        "|---|---|---|" + ("---|" if by else "") + "---:|---:|---|",
    ]
    for r in records:
        first, second = r[a], r[b]
        cell = difference(first, second, names).replace("|", "\\|")
        captured = f" | {second.get('captured_by') or '–'}" if by else ""
        lines.append(
            f"| {r['model']} | {first['result']} | {second['result']}{captured} | {first['seconds']:.1f} | "
            f"{second['seconds']:.1f} | {cell} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: every torchvision classifier)")
    parser.add_argument("--out", default=str(REPO / "bench" / "capture_compare.md"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model and capture")
    parser.add_argument("--captures", default="fx,export", help="the two captures compared (fx, export, fcconv)")
    parser.add_argument("--render", help="comma-separated JSON-lines files of earlier runs: write their table only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--capture", choices=CAPTURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = tuple(args.captures.split(","))
    if len(names) != 2 or not set(names) <= set(CAPTURES):
        parser.error(f"--captures takes two of {', '.join(CAPTURES)}")
    if args.child:
        child(args.child, args.capture)
        return
    if args.render:
        lines = [line for path in args.render.split(",") for line in Path(path).read_text().splitlines()]
        latest = {record["model"]: record for record in map(json.loads, lines)}  # a later run of a model wins
        write_table([latest[name] for name in sorted(latest)], Path(args.out), names)
        return
    from fcconv.load import torchvision_classifier_names

    models = sorted(torchvision_classifier_names())
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    records = []
    for name in models:
        record = {"model": name, **{c: run(name, c, args.timeout) for c in names}}
        records.append(record)
        with jsonl.open("a") as f:
            f.write(json.dumps(record, default=list) + "\n")
        print(f"{name}: {difference(record[names[0]], record[names[1]], names)}", flush=True)
    write_table(records, out, names)


def write_table(records: list[dict[str, Any]], out: Path, names: tuple[str, str]) -> None:
    same_count = sum(same(r[names[0]], r[names[1]]) for r in records)
    out.write_text(f"{same_count} of {len(records)} plans the same\n\n{table(records, names)}\n")


if __name__ == "__main__":
    main()
