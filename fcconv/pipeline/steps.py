"""Steps the transactions share: loading a checkpoint, the original's references, comparing, freeing memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import parse_shape
from fcconv.pipeline.events import Compared, HeadFactored, Note, Reporter, StageFinished, StageStarted


def load_checkpoint(
    path: Path, arch: str | None, input_shape: str | None, trust: bool, dtype: str | None, report: Reporter
) -> Any:
    """The model in ``path`` as a :class:`~fcconv.load.LoadedModel`; bfloat16 weights are converted in float32,
    where each of them is exact (ONNX has no bfloat16 convolution)."""
    import torch

    from fcconv.load import load_model

    shape = parse_shape(input_shape)
    if dtype == "bfloat16":
        raise BadInputError("--dtype bfloat16: ONNX has no bfloat16 convolution; use float32 or float16")
    text = (
        f"Loading {path}…" if arch is not None else f"Loading {path} and matching it against torchvision's classifiers…"
    )
    with report.stage("load", text):
        loaded = load_model(path, arch, shape, trust=trust, dtype=dtype)
    if loaded.detected:
        report(Note(f"architecture: {loaded.arch} (detected from the state_dict's keys and shapes)"))
    if loaded.dtype == torch.bfloat16:
        loaded.module.to(torch.float32)
        report(
            Note(
                "bfloat16 weights: converting in float32, where each of them is exact (ONNX has no bfloat16 convolution)"
            )
        )
    return loaded


def truncated(loaded: Any, logits: bool, until: str | None) -> Any:
    """``loaded`` with its module ended as ``logits``/``until`` say (the module itself when neither is given)."""
    from fcconv.rewrite import truncate

    if logits or until:
        loaded.module = truncate(loaded.module, loaded.input_shape, logits=logits, until=until)
    return loaded


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def references(
    loaded, dense, sizes, rtol, atol, device, report: Reporter, conversion=None, pool=None, stride=None
) -> Any:
    """The original's outputs on the verification inputs (:func:`~fcconv.verify.reference_outputs`)."""
    from fcconv.verify import default_sizes, reference_outputs

    # unless given, the sizes are chosen with the trunk in hand (verification_sizes): as many as default_sizes
    count = len(sizes or default_sizes(loaded.input_shape))
    with report.per_size("references", "Running the original", "Running the original", count) as on_size:
        return reference_outputs(
            loaded.module, loaded.input_shape, sizes=sizes, dense=dense, pool=pool, rtol=rtol, atol=atol, device=device,
            conversion=conversion, on_size=on_size, stride=stride,
        )  # fmt: skip


def references_and_probe(loaded: Any, conversion: Any, report: Reporter, **verifying: Any) -> tuple[Any, Any, Any]:
    """The original's references and its probe output, both of the model the export must equal: with a low-rank
    head (``--rank``), the original with its factored layers' weights truncated, after the original itself has
    run on the same inputs so that the deviation of the truncation is measured and reported (the third item, a
    :class:`~fcconv.pipeline.events.HeadFactored`; None without ``--rank``)."""
    if not conversion.factored:
        made = references(loaded, **verifying, report=report, conversion=conversion)
        return made, probe_output(conversion, loaded.input_shape, made), None
    from fcconv.low_rank import deviation, truncated_original

    exact = references(loaded, **verifying, report=report, conversion=conversion)
    with truncated_original(conversion):
        made = references(loaded, **verifying, report=report, conversion=conversion)
        probe = probe_output(conversion, loaded.input_shape, made)
    factored = HeadFactored(list(conversion.factored), deviation(exact, made))
    del exact
    report(factored)
    return made, probe, factored


def probe_output(conversion: Any, input_shape: tuple[int, ...], references: Any) -> Any:
    """The original's reading of :func:`~fcconv.verify.probe_input`, recorded in the export for ``fcconv check``
    (with ``--stride``, its layers read à trous)."""
    import torch

    from fcconv.readings import atrous_reference, sliding_window_reference
    from fcconv.verify import full_float32_precision, probe_input

    probe = probe_input(input_shape, references.dtype).to(references.device)
    reading = atrous_reference if references.subgrids else sliding_window_reference
    with torch.inference_mode(), full_float32_precision():
        return reading(conversion, probe)


def compare(exported: Any, references: Any, report: Reporter) -> Any:
    """Run ``exported`` on the reference inputs; returns (and reports) the
    :class:`~fcconv.verify.VerificationReport`."""
    from fcconv.verify import compare_outputs

    stage = ("compare", "Verifying against the original", "Verifying", len(references.cases))
    with report.per_size(*stage) as on_size:
        result = compare_outputs(exported, references, on_size=on_size)
    report(Compared(result))
    return result


class Mismatch(Exception):
    """Raised inside a staging block to leave it without moving the file into place."""


@contextlib.contextmanager
def committed(staging: contextlib.AbstractContextManager, report: Reporter) -> Iterator[Any]:
    """``staging`` (from :mod:`fcconv.staging`) with its move into place reported as the ``commit`` stage."""
    with staging as staged:
        yield staged
        report(StageStarted("commit", None))
    report(StageFinished("commit"))
