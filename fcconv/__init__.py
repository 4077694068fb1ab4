"""fcconv: turn a trained classifier's fully connected head into convolutions, exactly."""

from fcconv.errors import BadInputError, FcconvError, NotConvertibleError
from fcconv.export import export_onnx
from fcconv.rewrite import Conversion, HeadGeometry, RewrittenLayer, analyze, convert, rewrite, truncate
from fcconv.verify import SizeCheck, VerificationReport, sliding_window_reference, verify

__version__ = "0.1.0"

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
