"""What the pipeline reports while it runs: small event records handed to a ``progress`` callback.

A stage is a step of a transaction (``load``, ``rewrite``, ``export``, ``references``, ``compare``...):
it starts, may advance (bytes written, the input size being run, the check being made) and finishes.
Results worth showing before the transaction ends (the rewritten head, a verification
report, one file's checks) arrive as their own events, so that a caller can show them as they come.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageStarted:
    """``stage`` began. ``text`` says what it does (None: nothing worth showing); ``total`` is the amount of work
    in ``unit`` (``"sizes"``, ``"bytes"``) when it is known to advance, None for a stage that only runs."""

    stage: str
    text: str | None
    total: float | None = None
    unit: str = "sizes"


@dataclass(frozen=True)
class StageAdvanced:
    """``stage`` reached ``done`` of its work (``total`` when it became known), now doing ``text``;
    ``size`` is the input size whose run starts, on the stages that run the model at each size."""

    stage: str
    done: float
    total: float | None = None
    text: str | None = None
    size: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StageFinished:
    """``stage`` ended (also when it failed: the error follows)."""

    stage: str


@dataclass(frozen=True)
class Note:
    """A line worth telling the user: an architecture detected, a dtype converted in."""

    text: str


@dataclass(frozen=True)
class Warned:
    """A warning about the model that the result cannot show (the command prints it on stderr, also when quiet).

    Without a ``progress`` callback it is issued as a :class:`~fcconv.errors.FcconvWarning` instead."""

    text: str


@dataclass(frozen=True)
class HeadRewritten:
    """The head was rewritten (``conversion``: a :class:`~fcconv.rewrite.Conversion` or an ONNX conversion).

    ``title`` names the model for a table; ``onnx`` says the graph was an ONNX classifier's;
    ``pool`` is the pooling appended to the score map, if any. The conversion holds the models: a callback
    that keeps the event keeps them in memory while the written file is verified."""

    conversion: Any
    title: str
    onnx: bool = False
    pool: str | None = None


@dataclass(frozen=True)
class HeadFactored:
    """``--rank`` made each fully connected layer of the head two convolutions (``layers``, each a
    :class:`~fcconv.conversion.FactoredLayer`); ``deviation`` holds, per verification size, how far the original
    with those weights truncated (the model the export equals) reads from the original: ``max_abs``, ``max_rel``
    (to the original's largest magnitude) and ``top1_agreement`` (the share of positions with the same top class)."""

    layers: list[Any]
    deviation: list[dict[str, Any]]


@dataclass(frozen=True)
class TrunkAtrous:
    """``--stride`` rewrote the trunk à trous: ``plan`` (an :class:`~fcconv.atrous.AtrousPlan`) holds the output
    stride asked for, the model's own, and the layers that lost their stride or were dilated."""

    plan: Any


@dataclass(frozen=True)
class Compared:
    """The file written (or given) was compared with the original: ``report`` is a
    :class:`~fcconv.verify.VerificationReport`."""

    report: Any


@dataclass(frozen=True)
class Checked:
    """One file's checks are done: ``report`` is a :class:`~fcconv.check.CheckReport`."""

    report: Any


@dataclass(frozen=True)
class DenseModelReady:
    """The heatmap's model is loaded: ``description`` says what it is, ``check`` is the report of the in-memory
    conversion against the original at the native size (None for an ONNX file, run as it is)."""

    description: str
    check: Any


@dataclass(frozen=True)
class MapScored:
    """The picture ``image`` was run: ``scores`` is the :class:`~fcconv.heatmap.ScoreMap`, ``peaks`` the panels."""

    image: Path
    scores: Any
    peaks: list


Event = (
    StageStarted
    | StageAdvanced
    | StageFinished
    | Note
    | Warned
    | HeadRewritten
    | HeadFactored
    | TrunkAtrous
    | Compared
    | Checked
    | DenseModelReady
    | MapScored
)
Progress = Callable[[Event], None]


class Reporter:
    """Sends events to ``progress`` (when one is given) and brackets stages."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def __call__(self, event: Event) -> None:
        if self.progress is not None:
            self.progress(event)

    def warn(self, text: str) -> None:
        """A :class:`Warned` event, or where nobody listens to events, a :class:`~fcconv.errors.FcconvWarning`."""
        if self.progress is not None:
            self.progress(Warned(text))
        else:
            import warnings

            from fcconv.errors import FcconvWarning

            warnings.warn(text, FcconvWarning, stacklevel=4)

    @contextlib.contextmanager
    def stage(
        self, stage: str, text: str | None = None, total: float | None = None, unit: str = "sizes"
    ) -> Iterator[Callable[..., None]]:
        """Bracket ``stage`` with started/finished events; yields ``advance(done, total=None, text=None)``."""
        self(StageStarted(stage, text, total, unit))

        def advance(done: float, total: float | None = None, text: str | None = None) -> None:
            self(StageAdvanced(stage, done, total, text))

        try:
            yield advance
        finally:
            self(StageFinished(stage))

    @contextlib.contextmanager
    def per_size(self, stage: str, text: str, step: str, total: int) -> Iterator[Callable[[tuple[int, ...]], None]]:
        """A stage of one run per input size; yields the ``on_size`` callback :mod:`fcconv.verify` calls as each
        size starts."""
        with self.stage(stage, text, total):
            done = 0

            def on_size(size: tuple[int, ...]) -> None:
                nonlocal done
                self(StageAdvanced(stage, done, text=f"{step} at {'×'.join(map(str, size))}", size=tuple(size)))
                done += 1

            yield on_size
            self(StageAdvanced(stage, total))
