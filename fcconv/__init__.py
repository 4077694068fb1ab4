"""fcconv: turn a trained classifier's fully connected head into convolutions, exactly.

The names below are imported when first used, so that ``import fcconv`` (and the command line,
and ``fcconv check`` on ONNX files) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from fcconv.errors import BadInputError, FcconvError, NotConvertibleError

__version__ = "0.1.0"

_LAZY = {
    "export_onnx": "fcconv.export",
    **dict.fromkeys(
        ("Conversion", "HeadGeometry", "RewrittenLayer", "analyze", "convert", "rewrite", "truncate"), "fcconv.rewrite"
    ),
    **dict.fromkeys(("SizeCheck", "VerificationReport", "sliding_window_reference", "verify"), "fcconv.verify"),
}

__all__ = [
    "BadInputError",
    "Conversion",
    "FcconvError",
    "HeadGeometry",
    "NotConvertibleError",
    "RewrittenLayer",
    "SizeCheck",
    "VerificationReport",
    "analyze",
    "convert",
    "export_onnx",
    "rewrite",
    "sliding_window_reference",
    "truncate",
    "verify",
]


class _Package(types.ModuleType):
    """``fcconv.rewrite`` and ``fcconv.verify`` stay the functions once their modules are imported (the import
    system would otherwise set each attribute to its module), as when this file imported them eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("rewrite", "verify") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fcconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
