"""Machine-readable reports of ``fcconv check`` and ``fcconv verify``: JSON (``fcconv.report/1``) and JUnit XML.

Both are built from one document, a dict that follows ``report.schema.json`` (in
this package): the command, whether it passed, the tolerances, and for each model
one entry per check and input size. The JUnit file holds one testsuite with one
testcase per entry, a ``<failure>`` for each failed one and ``<skipped>`` for each
skipped one. Files are written under a temporary name and renamed into place, so a
reader never sees half a report.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv._version import __version__
from fcconv.check_result import CheckReport
from fcconv.staging import staged_path

if TYPE_CHECKING:  # named in annotations only: a check's report needs no torch
    from fcconv.verify import VerificationReport

__all__ = ["SCHEMA", "SCHEMA_PATH", "check_document", "junit_tree", "verification_document", "write_report"]

SCHEMA = "fcconv.report/1"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def check_document(reports: Sequence[CheckReport]) -> dict[str, Any]:
    """The report of ``fcconv check`` on one or more models; tolerances are those of the ``reference output`` check."""
    models = [
        {
            "model": report.model,
            "reference": None,
            "input_shape": list(report.input_shape),
            "input_shape_source": report.input_shape_source,
            "passed": report.passed,
            "checks": [
                _entry(
                    check=r.check,
                    input_size=r.input_size,
                    expected_shape=r.expected_shape,
                    actual_shape=r.actual_shape,
                    verdict=r.verdict,
                    message=r.message,
                    max_abs=r.max_abs,
                    max_rel=r.max_rel,
                    tolerance=r.tolerance,
                    output=r.output,
                )
                for r in report.results
            ],
        }
        for report in reports
    ]
    compared = [report for report in reports if report.rtol is not None]
    tolerances = {"rtol": compared[0].rtol, "atol": compared[0].atol, "dtype": compared[0].dtype} if compared else None
    return _document("check", models, tolerances=tolerances)


def verification_document(
    report: VerificationReport, model: str | Path, reference: str | Path, input_shape: Sequence[int]
) -> dict[str, Any]:
    """The report of ``fcconv verify``: one entry per reading (original, sliding window) and input size."""
    checks = []
    several = len({c.output for c in report.checks}) > 1
    for c in report.checks:
        ran = c.reference != "-"
        checks.append(
            _entry(
                check=c.reference if ran else "run",
                input_size=c.input_size,
                expected_shape=c.expected_shape or None,
                actual_shape=c.output_shape or None,
                max_abs=c.max_abs if ran else None,
                mean_abs=c.mean_abs if ran else None,
                max_rel=c.max_rel if ran else None,
                mean_rel=c.mean_rel if ran else None,
                scale=c.scale if ran else None,
                tolerance=c.tolerance if ran else None,
                worst_at=c.worst or None,
                verdict="pass" if c.passed else "fail",
                message=c.message or _error_message(c.max_abs, c.tolerance, c.passed),
                output=c.output if several else None,
            )
        )
    entry = {
        "model": str(model),
        "reference": str(reference),
        "input_shape": [int(s) for s in input_shape],
        "input_shape_source": None,
        "passed": report.passed,
        "checks": checks,
    }
    tolerances = {"rtol": report.rtol, "atol": report.atol, "dtype": report.dtype}
    return _document("verify", [entry], tolerances)


def _error_message(max_abs: float, tolerance: float, passed: bool) -> str:
    relation = "within" if passed else "above"
    return f"max abs error {max_abs:.1e} {relation} the tolerance {tolerance:.1e}"


def _document(command: str, models: list[dict[str, Any]], tolerances: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "command": command,
        "fcconv_version": __version__,
        "passed": bool(models) and all(m["passed"] for m in models),
        "tolerances": tolerances,
        "models": models,
    }


def _entry(
    *,
    check: str,
    input_size: Sequence[int] | None,
    expected_shape: Sequence[int | None] | None,
    actual_shape: Sequence[int] | None,
    verdict: str,
    message: str,
    max_abs: float | None = None,
    mean_abs: float | None = None,
    max_rel: float | None = None,
    mean_rel: float | None = None,
    scale: float | None = None,
    tolerance: float | None = None,
    worst_at: Sequence[int] | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """One check at one size, with every field present (null where it does not apply)."""
    return {
        "check": check,
        "input_size": _ints(input_size),
        "expected_shape": None if expected_shape is None else [None if d is None else int(d) for d in expected_shape],
        "actual_shape": _ints(actual_shape),
        "max_abs": _number(max_abs),
        "mean_abs": _number(mean_abs),
        "max_rel": _number(max_rel),
        "mean_rel": _number(mean_rel),
        "scale": _number(scale),
        "tolerance": _number(tolerance),
        "worst_at": _ints(worst_at),
        "verdict": verdict,
        "message": message,
        "output": output,
    }


def _ints(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


def _number(value: float | None) -> float | None:
    """JSON has no infinity or NaN: an error that is not finite is null, and the message says why."""
    return None if value is None or not math.isfinite(value) else float(value)


def junit_tree(document: dict[str, Any]) -> ET.ElementTree:
    """JUnit XML for ``document``: ``<testsuites>`` holding one ``<testsuite>``, one testcase per check and size."""
    cases = [(model, check) for model in document["models"] for check in model["checks"]]
    failures = sum(check["verdict"] == "fail" for _, check in cases)
    skipped = sum(check["verdict"] == "skip" for _, check in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": str(skipped)}
    root = ET.Element("testsuites", counts)
    suite = ET.SubElement(root, "testsuite", {"name": f"fcconv {document['command']}", **counts})
    for model, check in cases:
        where = "" if check["input_size"] is None else " at " + "×".join(map(str, check["input_size"]))
        if check.get("output"):
            where += f" ({check['output']})"
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": f"fcconv.{document['command']}", "name": f"{model['model']}: {check['check']}{where}"},
        )
        if check["verdict"] == "fail":
            failure = ET.SubElement(case, "failure", {"message": check["message"] or "failed", "type": check["check"]})
            failure.text = _failure_details(check)
        elif check["verdict"] == "skip":
            ET.SubElement(case, "skipped", {"message": check["message"]})
    ET.indent(root)
    return ET.ElementTree(root)


def _failure_details(check: dict[str, Any]) -> str:
    lines = [check["message"]]
    for key in ("expected_shape", "actual_shape", "max_abs", "max_rel", "tolerance", "worst_at"):
        if check[key] is not None:
            lines.append(f"{key}: {check[key]}")
    return "\n".join(lines)


def write_report(document: dict[str, Any], json_path: Path | None = None, junit_path: Path | None = None) -> None:
    """Write ``document`` as JSON and/or JUnit XML, each file renamed into place once complete."""
    if json_path is not None:
        with staged_path(json_path) as tmp:
            tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if junit_path is not None:
        with staged_path(junit_path) as tmp:
            junit_tree(document).write(tmp, encoding="utf-8", xml_declaration=True)
