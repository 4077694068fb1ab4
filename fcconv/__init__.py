"""fcconv: turn a trained classifier's fully connected head into convolutions, exactly.

The converter needs PyTorch (``pip install 'fcconv[torch]'``); ``fcconv check`` on ONNX
files does not. So the names below that live in torch-side modules are imported on
first use, and ``import fcconv`` (or ``fcconv.__version__``) works without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from fcconv._version import __version__
from fcconv.errors import BadInputError, FcconvError, NotConvertibleError

__all__ = [
    "BadInputError",
    "Conversion",
    "FcconvError",
    "HeadGeometry",
    "NotConvertibleError",
    "RewrittenLayer",
    "SizeCheck",
    "VerificationReport",
    "__version__",
    "analyze",
    "convert",
    "export_onnx",
    "rewrite",
    "sliding_window_reference",
    "truncate",
    "verify",
]

_TORCH_SIDE = {
    "export_onnx": "fcconv.export",
    **dict.fromkeys(
        ("Conversion", "HeadGeometry", "RewrittenLayer", "analyze", "convert", "rewrite", "truncate"), "fcconv.rewrite"
    ),
    **dict.fromkeys(("SizeCheck", "VerificationReport", "verify"), "fcconv.verify"),
    "sliding_window_reference": "fcconv.readings",
}


def __getattr__(name: str) -> Any:
    """The converter's public names, imported with torch when first used."""
    if name not in _TORCH_SIDE:
        raise AttributeError(f"module 'fcconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_TORCH_SIDE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``fcconv.verify`` and ``fcconv.rewrite`` name functions, as before the imports were lazy.

    Importing the submodule of the same name binds the module on the package; the
    function it defines is bound instead, once the submodule has run.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _TORCH_SIDE:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
