"""Input shapes and sizes: parsed, bounded, and the sizes a verification or a check runs at.

Imports neither torch nor onnx: ``fcconv check`` and the CLI parse shapes with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fcconv.errors import BadInputError

__all__ = [
    "batched_shape", "check_tensor_size", "default_sizes", "parse_counts", "parse_input_shape", "spatial_size",
    "spatial_start",
]  # fmt: skip


def parse_counts(text: str | int | Sequence[int], option: str, example: str) -> tuple[int, ...]:
    """``"16"`` or ``"2,16,16"`` -> whole numbers of at least 1, one for every axis or one per axis (``--stride``,
    ``--tile``); refused in one line naming ``option`` and an ``example``."""
    values = [text] if isinstance(text, int) else text.split(",") if isinstance(text, str) else list(text)
    shown = text if isinstance(text, str) else ",".join(map(str, values))
    try:
        parsed = tuple(int(str(v).strip()) for v in values)
    except ValueError:
        raise BadInputError(f"{option} {shown}: not a whole number, or one per axis (such as {example})") from None
    if any(v < 1 for v in parsed):
        raise BadInputError(f"{option} {shown}: each value is a whole number of at least 1")
    return parsed


def parse_input_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224); accepts (L,), (C, L), (C, H, W) and (C, D, H, W).

    A single number is a channel-free input: the model takes (N, L) and adds its axes itself.
    """
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"--input-shape {text!r} is not a list of integers like 3,224,224") from None
    if not 1 <= len(shape) <= 4 or any(s <= 0 for s in shape):
        raise BadInputError(
            f"--input-shape {text!r} must be L (no channel axis), or C,L or C,H,W or C,D,H,W with positive sizes"
        )
    check_tensor_size(shape, f"--input-shape {text!r}")
    return shape


def spatial_size(input_shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial part of a per-sample input shape: all of a channel-free (L,), otherwise all but its C."""
    shape = tuple(int(s) for s in input_shape)
    return shape if len(shape) == 1 else shape[1:]


def spatial_start(input_shape: Sequence[int]) -> int:
    """The axis of a batched input where the spatial axes begin: 1 for a channel-free (N, L), otherwise 2."""
    return 1 if len(input_shape) == 1 else 2


def batched_shape(input_shape: Sequence[int], size: Sequence[int], batch: int) -> tuple[int, ...]:
    """A batch of inputs at spatial ``size``: (N, *size) for a channel-free input, otherwise (N, C, *size)."""
    channels = () if len(input_shape) == 1 else (int(input_shape[0]),)
    return (int(batch), *channels, *(int(s) for s in size))


# Tensors count their elements in a signed 64-bit integer; fcconv runs inputs in batches of two.
MAX_TENSOR_ELEMENTS = 2**63 - 1
INPUT_BATCH = 2


def check_tensor_size(shape: Sequence[int], what: str) -> None:
    """Refuse an input shape no tensor can have: a batch of two such inputs holds more than 2^63 - 1 values.

    ``shape`` is a per-sample shape (C, H, W) or, for ``--sizes``, its spatial part alone.
    """
    values = INPUT_BATCH * math.prod(shape)
    if values > MAX_TENSOR_ELEMENTS:
        raise BadInputError(
            f"{what} is larger than any tensor can be: a batch of two such inputs holds "
            f"{values:.2e} values, more than the 2^63 - 1 a tensor can hold"
        )


def default_sizes(input_shape: Sequence[int], step: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The native spatial size, a larger odd non-square one, and twice the native size.

    With ``step`` (per axis), for a trunk that takes only sizes a whole number of steps above the
    native one (it adds an upsampled map to a skip connection): the native size plus the multiples
    of the step nearest to those, a larger non-square one and about twice the native size.
    """
    native = spatial_size(input_shape)
    factors = [1.25 if axis % 2 == 0 else 1.5 for axis in range(len(native))]
    if step is None:
        odd = tuple(max(s + 1, round(s * f)) | 1 for s, f in zip(native, factors))
        double = tuple(2 * s for s in native)
        return [native, odd, double]
    larger = [max(1, round(s * (f - 1) / k)) for s, f, k in zip(native, factors, step)]
    for axis in range(1, len(native)):  # non-square where the native size is square
        if native[axis] == native[0] and larger[axis] * step[axis] == larger[0] * step[0]:
            larger[axis] += 1
    twice = [max(1, round(s / k)) for s, k in zip(native, step)]
    if twice == larger:  # one axis, or a non-square native size: three sizes all the same
        twice = [n + 1 for n in twice]
    return [native, *(tuple(s + n * k for s, n, k in zip(native, counts, step)) for counts in (larger, twice))]
