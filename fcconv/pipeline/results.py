"""What the pipeline's transactions return: plain records the CLI renders and a caller can inspect."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ConversionResult:
    """A verified conversion: ``target`` was written only when ``report`` passed (``written``); ``data_file`` is
    the external weights file beside it, if one was written; ``warnings``, what to check by other means.
    ``report`` is a
    :class:`~fcconv.verify.VerificationReport`."""

    target: Path
    report: Any
    written: bool
    data_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    """What the conversion could not decide and the user should check (each also reported as it was found)."""
    low_rank: Any = None
    """With ``rank``: the :class:`~fcconv.pipeline.events.HeadFactored` event, the factored layers and how far the
    model is from the original at each verification size."""

    @property
    def passed(self) -> bool:
        return self.written


@dataclass
class VerifyResult:
    """``model`` compared with ``reference``: ``report`` (a :class:`~fcconv.verify.VerificationReport`), or,
    where the file's weights could not even be placed in the reference's module, ``mismatch`` says why."""

    model: Path
    reference: Path
    report: Any = None
    mismatch: str | None = None

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed


@dataclass
class InspectResult:
    """The head as a conversion would rewrite it (``conversion``), for an ONNX classifier when ``onnx``."""

    conversion: Any
    onnx: bool
    pool: str | None = None


@dataclass
class HeatmapResult:
    """A heatmap of ``image``: ``written`` the files written (the PNG, then the map), empty when the in-memory
    conversion did not match the original (``check``, a :class:`~fcconv.verify.VerificationReport`)."""

    image: Path
    check: Any
    scores: Any = None
    peaks: list = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed


@dataclass
class MapResult:
    """``fcconv map``: the map (``shape``: K, *positions) written to ``target`` from ``tiles`` tiles."""

    target: Path
    shape: tuple[int, ...]
    tiles: int
    written: bool
    report: Any = None
    """For a checkpoint converted first: the conversion's verification (nothing is mapped when it failed)."""

    @property
    def passed(self) -> bool:
        return self.written
