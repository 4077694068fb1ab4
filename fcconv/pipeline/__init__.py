"""The library's transactions, one per command: ``convert_file``, ``verify_file``, ``check_files``,
``inspect_file`` and ``heatmap_file``.

Each checks its arguments before any work, reports its stages to a ``progress`` callback
(:mod:`fcconv.pipeline.events`), raises :class:`~fcconv.errors.BadInputError` (exit 2) or
:class:`~fcconv.errors.NotConvertibleError` (exit 3), and returns a plain result whose ``passed`` is the
command's exit 0 or 1. torch is imported only by the transactions that need it.

    >>> from fcconv.pipeline import convert_file
    >>> result = convert_file("vgg16.pth", "vgg16.fcn.onnx", arch="vgg16")
    >>> result.written, result.report.checks[0].max_rel
"""

from fcconv.pipeline.arguments import parse_shape, parse_sizes
from fcconv.pipeline.convert import convert_file
from fcconv.pipeline.events import (
    Checked,
    Compared,
    DenseModelReady,
    Event,
    HeadFactored,
    HeadRewritten,
    MapScored,
    Note,
    Progress,
    StageAdvanced,
    StageFinished,
    StageStarted,
    TrunkAtrous,
    Warned,
)
from fcconv.pipeline.inspection import heatmap_file, inspect_file
from fcconv.pipeline.mapping import map_file
from fcconv.pipeline.results import ConversionResult, HeatmapResult, InspectResult, MapResult, VerifyResult
from fcconv.pipeline.verification import check_files, verify_file

# What a command line installs around a call so that SIGTERM and SIGHUP stop it as an error does, nothing written.
from fcconv.staging import Terminated, terminations_raised

__all__ = [
    "Checked",
    "Compared",
    "ConversionResult",
    "DenseModelReady",
    "Event",
    "HeadFactored",
    "HeadRewritten",
    "HeatmapResult",
    "InspectResult",
    "MapResult",
    "MapScored",
    "Note",
    "Progress",
    "StageAdvanced",
    "StageFinished",
    "StageStarted",
    "Terminated",
    "TrunkAtrous",
    "VerifyResult",
    "Warned",
    "check_files",
    "convert_file",
    "heatmap_file",
    "inspect_file",
    "map_file",
    "parse_shape",
    "parse_sizes",
    "terminations_raised",
    "verify_file",
]
