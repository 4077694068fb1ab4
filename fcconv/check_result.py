"""What ``fcconv check`` finds, as plain data: one :class:`CheckResult` per check (per input size for the runs),
gathered in a :class:`CheckReport` per file; the checks themselves are in :mod:`fcconv.check`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CHECKS",
    "DECLARED",
    "FAIL",
    "GIVEN",
    "METADATA",
    "PASS",
    "REFERENCE",
    "SKIP",
    "SOURCES",
    "CheckReport",
    "CheckResult",
]

PASS, FAIL, SKIP = "pass", "fail", "skip"
CHECKS = (
    "onnx checker",
    "free spatial axes",
    "no collapse",
    "weights digest",
    "runs",
    "output size",
    "reference output",
)
GIVEN, METADATA, DECLARED, REFERENCE = "given", "metadata", "declared", "reference"
SOURCES = (GIVEN, METADATA, DECLARED, REFERENCE)
"""Where a check's native input shape came from: ``--input-shape`` (the ``input_shape`` argument), the
``fcconv.input_shape`` metadata, the fixed sizes the ONNX graph's input declares, or the ``--reference``
checkpoint that rebuilds a ``.safetensors`` file."""


@dataclass(frozen=True)
class CheckResult:
    """One check of an ONNX file: for the whole file, or (``runs``, ``output size``) at one input size.

    ``verdict`` is ``pass``, ``fail`` or ``skip``; ``message`` says why. Shapes hold
    None where a dimension is not predicted.
    """

    check: str
    verdict: str
    message: str = ""
    input_size: tuple[int, ...] | None = None
    expected_shape: tuple[int | None, ...] | None = None
    actual_shape: tuple[int, ...] | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None
    """``reference output`` only: the largest errors and the allowed absolute error."""
    output: str | None = None
    """For checks that read the model's outputs: which one (a model with several heads has one check per output)."""

    @property
    def passed(self) -> bool:
        return self.verdict == PASS


@dataclass
class CheckReport:
    """Every :class:`CheckResult` for one ONNX file, with the native input shape they used."""

    model: str
    input_shape: tuple[int, ...]
    results: list[CheckResult] = field(default_factory=list)
    input_shape_source: str = GIVEN
    """Where ``input_shape`` came from, one of :data:`SOURCES`."""
    rtol: float | None = None
    atol: float = 0.0
    dtype: str = "float32"
    """The tolerances and input dtype of the ``reference output`` check (``rtol`` None when it did not compare)."""

    @property
    def passed(self) -> bool:
        """No check failed and at least one passed (skipped ones neither pass nor fail the model)."""
        return all(r.verdict != FAIL for r in self.results) and any(r.verdict == PASS for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.verdict == FAIL]
