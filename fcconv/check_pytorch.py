"""Check a converted model written for PyTorch on its own: a ``.pt2`` program, or ``.safetensors`` weights.

The same checks as :func:`fcconv.check.check_onnx`, where they apply, in the same
:class:`~fcconv.check.CheckReport`:

* a program (:func:`check_program`): ``free spatial axes`` (the program's range
  constraints on its spatial axes: from the native size up, with no upper bound),
  ``weights digest``, then per size ``runs`` and ``output size``, and ``reference
  output`` on the recorded probe input;
* weights alone (:func:`check_weights`): ``weights digest``. A state_dict does not
  run by itself, so the checks that run the model are reported as skipped, with
  the reason, unless the module is rebuilt from the original checkpoint
  (``rebuilt_from``), when they run on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcconv.check import (
    _check_sizes,
    _first_line,
    _native_shape,
    digest_verdict,
    refuse_runs_beyond_memory,
    run_checks,
)
from fcconv.check_result import FAIL, PASS, REFERENCE, SKIP, CheckReport, CheckResult
from fcconv.metadata import SPATIAL_AXIS_NAMES
from fcconv.outputs import named_outputs
from fcconv.sizes import default_sizes, spatial_size, spatial_start
from fcconv.torch_export import ProgramModel, read_weights, read_weights_metadata, rebuild
from fcconv.weights_digest import state_dict_digest

__all__ = ["check_program", "check_weights"]


def check_program(
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    trust: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check the ExportedProgram at ``path`` (written by ``fcconv convert -o NAME.pt2``) without a reference."""
    path = Path(path)
    step = on_step or (lambda _: None)
    step("Loading the program…")
    program = ProgramModel(path, trust=trust)
    meta = program.metadata
    input_shape, source = _native_shape(path, input_shape, meta, [])
    sizes = _check_sizes(sizes or default_sizes(input_shape), input_shape)
    refuse_runs_beyond_memory(program.module, input_shape, sizes, batch, program.dtype.itemsize)
    report = CheckReport(str(path), input_shape, input_shape_source=source)
    report.results.append(_free_axes(program.spatial_ranges(spatial_start(input_shape)), input_shape))
    step("Hashing the weights…")
    report.results.append(digest_verdict(state_dict_digest(program.program.state_dict), meta, "tensors"))
    run = _on_arrays(program, program.dtype)
    report.results.extend(
        run_checks(
            run, _name(program.dtype), input_shape, sizes, batch, seed, meta, report, atol, rtol, step, "the program"
        )
    )
    return report


def check_weights(
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    rebuilt_from: Any = None,
    on_step: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check the state_dict at ``path`` (written by ``fcconv convert -o NAME.safetensors``).

    ``rebuilt_from`` is the original, a :class:`~fcconv.load.LoadedModel`: the module
    is rebuilt from it with the file's weights (:func:`fcconv.torch_export.rebuild`)
    and run. Without it only the weights digest is checked.
    """
    path = Path(path)
    step = on_step or (lambda _: None)
    meta = read_weights_metadata(path)
    from_reference = input_shape is None and rebuilt_from is not None and "fcconv.input_shape" not in meta
    if from_reference:
        input_shape = rebuilt_from.input_shape
    input_shape, source = _native_shape(path, input_shape, meta, [])
    sizes = _check_sizes(sizes or default_sizes(input_shape), input_shape)
    report = CheckReport(str(path), input_shape, input_shape_source=REFERENCE if from_reference else source)
    step("Hashing the weights…")
    tensors = read_weights(path)
    report.results.append(digest_verdict(state_dict_digest(tensors), meta, "tensors"))
    del tensors
    if rebuilt_from is None:
        why = "a state_dict does not run by itself: give --reference (and --arch) to rebuild the module"
        report.results.append(CheckResult("free spatial axes", SKIP, why))
        report.results += [CheckResult(name, SKIP, why, size) for size in sizes for name in ("runs", "output size")]
        report.results.append(CheckResult("reference output", SKIP, why))
        return report
    step("Rebuilding the module…")
    try:
        module = rebuild(rebuilt_from.module, input_shape, meta, path)
    except Exception as exc:  # noqa: BLE001 - weights that do not fit fail every check that runs them
        why = f"the module could not be rebuilt: {_first_line(exc)}"
        report.results.append(CheckResult("runs", FAIL, why))
        return report
    report.results.append(
        CheckResult("free spatial axes", PASS, "a fully convolutional module: it takes any size from the native one")
    )
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    refuse_runs_beyond_memory(module, input_shape, sizes, batch, dtype.itemsize)

    run = _on_arrays(module, dtype)
    report.results.extend(
        run_checks(run, _name(dtype), input_shape, sizes, batch, seed, meta, report, atol, rtol, step, "the module")
    )
    return report


def _free_axes(ranges: list[tuple[int, int | None]], input_shape: tuple[int, ...]) -> CheckResult:
    """The program's spatial axes take every size from the native one up."""
    native = spatial_size(input_shape)
    names = SPATIAL_AXIS_NAMES.get(len(native), tuple(f"axis {2 + i}" for i in range(len(native))))
    if len(ranges) != len(native):
        return CheckResult(
            "free spatial axes", FAIL, f"the program takes {len(ranges)} spatial axes, not {len(native)}"
        )
    problems = []
    for name, (lower, upper), n in zip(names, ranges, native):
        if upper is not None and upper == lower:
            problems.append(f"fixes {name} to {lower}")
        elif upper is not None:
            problems.append(f"bounds {name} at {upper}")
        elif lower > n:
            problems.append(f"takes {name} from {lower} only, above the native {n}")
    if problems:
        return CheckResult("free spatial axes", FAIL, f"the program {' and '.join(problems)}")
    shown = ", ".join(f"{name} ≥ {lower}" for name, (lower, _) in zip(names, ranges))
    return CheckResult("free spatial axes", PASS, f"range constraints: {shown}")


def _on_arrays(module: Callable[[torch.Tensor], Any], dtype: torch.dtype) -> Callable[[np.ndarray], Any]:
    """``module`` as :func:`~fcconv.check.run_checks` calls a runner: an array in (cast to ``dtype``), and its
    output as an array, or a dict of arrays by output name for several outputs."""

    def run(x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = named_outputs(module(torch.from_numpy(x).to(dtype)))
        # numpy has no bfloat16: its values are exact in float32
        arrays = {name: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy() for name, t in outputs}
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays

    return run


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
