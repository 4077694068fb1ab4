"""The timm and Hugging Face zoos through fcconv: the smallest model of each timm family, every transformers image classifier.

    python bench/zoo_timm_hf.py [--models timm:resnet18,hf:ResNetForImageClassification] [--out docs/zoo-timm-hf.md]
                                [--timeout 900] [--resume] [--threads N]

The models:

- **timm**: one per family (a module of ``timm.models``, ``timm.list_modules()``): the one
  with the fewest parameters, counted on the meta device, leaving out timm's ``test_*``
  models;
- **Hugging Face**: every ``*ForImageClassification`` class the installed ``transformers``
  exports, built from its configuration class's defaults with ``num_labels=10`` and made
  small: one block per stage (``depths``), or two layers (``num_hidden_layers``, ``depth``).

Each runs in a fresh process, as in ``bench/zoo.py``: built with random weights after
``torch.manual_seed(0)`` in float32 and eval mode, rewritten by ``fcconv.rewrite`` at the
input size its configuration gives (``fcconv.zoos.zoo_input_shape``), and verified by
``fcconv.verify`` at ``fcconv.verify.verification_sizes``. A refusal is the
``NotConvertibleError`` message; anything else raised is a crash and counts as failed.

Each model's kind is measured from one forward pass at its input size: **attention** when
it multiplies two activations (``matmul``, ``bmm``, ``einsum``, scaled-dot-product or
multi-head attention), **token-mixing MLP** when a ``Linear`` runs across the token axis
(over a transposed three-axis tensor), **recurrent** with an RNN layer, and
**convolutional** otherwise. Only a convolutional model has a sliding-window reading to
convert to; the others are expected to be refused, with their real reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from zoo import fmt_size, head_pattern, machine, reads, run_in_child  # noqa: E402

KINDS = ("convolutional", "attention", "token-mixing MLP", "recurrent")


# --- the models --------------------------------------------------------------------------------------


def timm_families() -> dict[str, str]:
    """Each timm family (module) and its model with the fewest parameters, counted on the meta device."""
    import timm
    import torch

    chosen: dict[str, str] = {}
    for module in sorted(timm.list_modules()):
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=module):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - a model timm cannot build without extra packages
                continue
            count = sum(p.numel() for p in model.parameters())
            if best is None or count < best[0]:
                best = (count, name)
        if best is not None:
            chosen[module] = best[1]
    return chosen


def hf_classes() -> list[str]:
    """Every image classification class the installed transformers exports."""
    import transformers

    return sorted(
        name
        for name in dir(transformers)
        if name.endswith("ForImageClassification") and not name.startswith(("TF", "Flax", "Auto"))
    )


def build(model_id: str) -> Any:
    """``timm:NAME`` or ``hf:CLASS`` built with random weights, float32, eval mode."""
    import torch

    zoo, _, name = model_id.partition(":")
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import transformers

    cls = getattr(transformers, name)
    return cls(small_config(cls.config_class(num_labels=10))).eval()


def small_config(config: Any) -> Any:
    """``config`` with one block per stage (``depths``), or else two layers (``num_hidden_layers``, ``depth``): the
    same layers and head, in a fraction of the time. A configuration with stages keeps its layer count, which some
    read as the number of stages."""
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and depths:
        if all(isinstance(v, int) for v in depths):
            config.depths = [1] * len(depths)
        return config
    for key in ("num_hidden_layers", "depth"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            setattr(config, key, 2)
    return config


# --- one model, in the child process ---------------------------------------------------------------


def kind_of(model: Any, shape: tuple[int, ...]) -> str:
    """What mixes the positions of ``model``'s map, from the calls one forward pass makes."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    if any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        return "recurrent"
    products = {
        torch.matmul, torch.bmm, torch.baddbmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__, torch.Tensor.bmm, F.scaled_dot_product_attention, F.multi_head_attention_forward,
    }  # fmt: skip
    found: set[str] = set()

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            flat = [b for a in args for b in (a if isinstance(a, (list, tuple)) else (a,))]  # einsum(eq, [q, k])
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            if func in products and len(tensors) >= 2 and not any(isinstance(t, torch.nn.Parameter) for t in tensors):
                found.add("attention")
            if func is F.multi_head_attention_forward or func is F.scaled_dot_product_attention:
                found.add("attention")
            if func is F.linear and tensors and tensors[0].dim() == 3 and tensors[0].stride(-1) != 1:
                found.add("token-mixing MLP")
            return func(*args, **kwargs)

    with torch.no_grad(), Calls():
        model(torch.randn(1, *shape))
    return next((k for k in KINDS if k in found), "convolutional")


def run_one(model_id: str, batch: int) -> dict[str, Any]:
    import fcconv
    from fcconv.verify import verification_sizes
    from fcconv.zoos import zoo_input_shape

    start = time.perf_counter()
    try:
        model = build(model_id)
    except ImportError as exc:  # a class that needs a package this machine does not have: no model to try
        return {"model": model_id, "result": "not built", "reason": " ".join(str(exc).split())[:200]}
    shape = zoo_input_shape(model) or (3, 224, 224)
    result: dict[str, Any] = {"model": model_id, "input": list(shape)}
    try:
        result["kind"] = kind_of(model, shape)
    except Exception as exc:  # noqa: BLE001 - a model that does not run at its own size
        result["kind"] = f"does not run ({type(exc).__name__})"
    built = time.perf_counter()
    try:
        conversion = fcconv.rewrite(model, shape)
    except fcconv.NotConvertibleError as exc:
        return {**result, "result": "refused", "reason": str(exc), "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - start}  # fmt: skip
    rewritten = time.perf_counter()
    sizes = verification_sizes(conversion, shape)
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, batch=batch, conversion=conversion)
    checks = []
    for size in sizes:
        at = [c for c in report.checks if tuple(c.input_size) == tuple(size)]
        checks.append({
            "size": list(size),
            "max_rel": max(c.max_rel for c in at),
            "passed": all(c.passed for c in at),
            "message": "; ".join(c.message for c in at if c.message),
        })  # fmt: skip
    done = time.perf_counter()
    return {
        **result,
        "result": "converted" if report.passed else "failed",
        "reason": ""
        if report.passed
        else "verification failed: "
        + "; ".join(
            f"{'×'.join(map(str, c.input_size))} against the {c.reference}: {c.message or f'max error {c.max_rel:.1e}'}"
            for c in report.checks
            if not c.passed
        )[:300],
        "pattern": head_pattern(conversion),
        "reads": reads(conversion),
        "captured_by": conversion.captured_by,
        "head_parameters": conversion.head_parameters,
        "total_parameters": conversion.total_parameters,
        "checks": checks,
        "seconds": done - start,
        "seconds_build": built - start,
        "seconds_rewrite": rewritten - built,
        "seconds_verify": done - rewritten,
    }


def commit() -> str:
    """The fcconv commit a model ran on (``+`` where the work tree differed from it), or ``?``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "fcconv"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "?"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else "?"


def child(model_id: str, batch: int, threads: int | None) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    try:
        record = run_one(model_id, batch)
    except Exception as exc:  # noqa: BLE001 - whatever goes wrong is the model's result, reported in one line
        text = " ".join(str(exc).split())[:300]
        record = {"model": model_id, "result": "failed", "reason": f"crash: {type(exc).__name__}: {text}"}
    peak = next((line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")), None)
    record["peak_mb"] = int(peak) / 1024 if peak else None
    record["commit"] = commit()
    print("ZOO-RESULT " + json.dumps(record), flush=True)


# --- the whole sweep, in the parent process --------------------------------------------------------


def summary(records: list[dict[str, Any]], zoo: str) -> str:
    """``60 models; convolutional 41: 40 converted, 1 refused, 0 failed; ...``: each kind's results."""
    mine = [r for r in records if r["model"].startswith(zoo + ":")]
    unbuilt = [r for r in mine if r["result"] == "not built"]
    mine_built = [r for r in mine if r["result"] != "not built"]
    parts = []
    for kind in (*KINDS, None):
        of_kind = [r for r in mine_built if r.get("kind") == kind or (kind is None and r.get("kind") not in KINDS)]
        if not of_kind:
            continue
        counts = {k: sum(r["result"] == k for r in of_kind) for k in ("converted", "refused", "failed")}
        label = kind or "kind not measured (the model does not run at its own size, or crashed first)"
        parts.append(
            f"{label} {len(of_kind)}: {counts['converted']} converted, {counts['refused']} refused, "
            f"{counts['failed']} failed"
        )
    if unbuilt:
        parts.append(f"{len(unbuilt)} not built (a package this machine does not have)")
    return f"{len(mine)} models; " + "; ".join(parts)


def render(records: list[dict[str, Any]], args: argparse.Namespace, wall: float, versions: dict[str, str]) -> str:
    lines = [
        "# The timm and Hugging Face zoos",
        "",
        "The smallest model of each timm family and every `*ForImageClassification` class of the installed "
        "transformers, through fcconv. The torchvision zoo is [zoo.md](zoo.md).",
        "",
        f"- **timm**: {summary(records, 'timm')}",
        f"- **Hugging Face**: {summary(records, 'hf')}",
        "",
        "How it was produced:",
        "",
        "```bash",
        f"python bench/zoo_timm_hf.py{' ' + ' '.join(args.argv) if args.argv else ''}",
        "```",
        "",
        f"- torch {versions['torch']}, timm {versions['timm']}, transformers {versions['transformers']}, "
        f"Python {platform.python_version()}",
        f"- fcconv: commit {', '.join(sorted({r.get('commit', '?') for r in records}))} (each model's is in "
        f"`{Path(args.out).with_suffix('.jsonl').name}`)",
        f"- machine: {machine()}; {args.threads or versions['threads']} torch threads; one model at a time, "
        "each in a fresh process; the models' wall times added up to "
        f"{wall / 60:.1f} min",
        "- timm: of each module of `timm.models` (`timm.list_modules()`), the model with the fewest parameters "
        "(counted on the meta device; timm's `test_*` models left out), built with `pretrained=False` and its "
        "default classes, at its pretrained configuration's `input_size`",
        "- Hugging Face: each class built from its configuration class's defaults with `num_labels=10`, made small "
        "(one block per stage where the configuration has `depths`, two layers where it has `num_hidden_layers` or "
        "`depth`), at the configuration's `image_size`",
        "- every model: random weights after `torch.manual_seed(0)`, float32, eval mode, rewritten from the model "
        f"object with `fcconv.rewrite`, verified with `fcconv.verify` (seed 0, batch {args.batch}) at "
        "`fcconv.verify.verification_sizes`: the native size and two larger ones the trunk takes, each against "
        "the sliding-window reading of the original's head; the error is the max error relative to the "
        "reference's largest magnitude",
        "- kind, measured from one forward pass: **attention** when the model multiplies two activations "
        "(`matmul`, `bmm`, `einsum`, scaled-dot-product or multi-head attention), **token-mixing MLP** when a "
        "`Linear` runs across the token axis, **recurrent** with an RNN layer, **convolutional** otherwise. "
        "A model whose head starts at a global pooling converts whatever its kind (its trunk runs as it is, at "
        "every size its layers take); one where every position is mixed with every other before the map "
        "collapses, or whose layers are fixed to the native size, is refused with the reason",
        "- a failed verification is fcconv catching a capture that computes something else than the eager model "
        "at another size (Hugging Face's MobileNets compute TensorFlow-style padding from the input's size in "
        "Python, and the capture keeps the padding of the native size's parity); `fcconv convert` then writes "
        "nothing and exits 1",
        "- refused: the `NotConvertibleError` message, which `fcconv convert` prints with exit code 3; failed: "
        "a verification that did not pass, a crash (anything else raised), or the time limit",
        "",
        "| model | kind | input | result | head pattern | reads | captured by | native | larger | largest | s |",
        "|---|---|---|---|---|---|---|---|---|---|---:|",
    ]
    for r in records:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "–"
        size = fmt_size(r["input"][1:]) if "input" in r else "–"
        kind = r.get("kind", "–")
        if "checks" not in r:
            reason = " ".join(r.get("reason", "").split()).replace("|", "\\|")
            lines.append(
                f"| {r['model']} | {kind} | {size} | {r['result']}: {reason} | – | – | – | – | – | – | {seconds} |"
            )
            continue
        errors = [f"{fmt_size(c['size'])}: {c['max_rel']:.1e}{'' if c['passed'] else ' ✗'}" for c in r["checks"]]
        errors = (errors + ["–"] * 3)[:3]
        result = r["result"] if r["result"] == "converted" else f"{r['result']}: {r.get('reason', '')}"
        lines.append(
            f"| {r['model']} | {kind} | {size} | {result} | {r['pattern']} | {r['reads']} | {r['captured_by']} | "
            f"{' | '.join(errors)} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm:NAME and hf:CLASS (default: the whole sweep)")
    parser.add_argument(
        "--out", default="docs/zoo-timm-hf.md", help="the Markdown report (default docs/zoo-timm-hf.md)"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per model (default 900)")
    parser.add_argument("--batch", type=int, default=2, help="verification batch (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads per model (default: torch's own)")
    parser.add_argument("--resume", action="store_true", help="keep results already in the JSON-lines file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.threads)
        return
    args.argv = [a for a in sys.argv[1:] if a != "--resume"]

    import timm
    import torch
    import transformers

    versions = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                "threads": str(torch.get_num_threads())}  # fmt: skip
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if not m.startswith(("timm:", "hf:"))]
        if unknown:
            parser.error(f"not timm:NAME or hf:CLASS: {', '.join(unknown)}")
    else:
        names = [f"timm:{name}" for name in timm_families().values()] + [f"hf:{name}" for name in hf_classes()]
    out = Path(args.out)
    results_path = out.with_suffix(".jsonl")
    records: dict[str, dict[str, Any]] = {}
    if args.resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            if record["model"] in names:
                records[record["model"]] = record
    else:
        results_path.write_text("")
    for index, name in enumerate(names, 1):
        if name in records:
            continue
        started = time.perf_counter()
        record = run_in_child(name, args, __file__)
        record["wall"] = time.perf_counter() - started
        records[name] = record
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        detail = record.get("reason", "") if record["result"] != "converted" else record.get("pattern", "")
        print(f"[{index}/{len(names)}] {name} ({record.get('kind', '?')}): {record['result']} "
              f"in {record.get('seconds', 0):.1f} s: {' '.join(detail.split())[:200]}", flush=True)  # fmt: skip
        ordered = [records[n] for n in names if n in records]
        out.write_text(render(ordered, args, sum(r.get("wall", 0.0) for r in ordered), versions))
    ordered = [records[n] for n in names if n in records]
    out.write_text(render(ordered, args, sum(r.get("wall", 0.0) for r in ordered), versions))
    print(f"wrote {out} and {results_path}")


if __name__ == "__main__":
    main()
