"""Arguments checked before any work is done: sizes, pooling, and the files a command would write."""

from __future__ import annotations

import os
from pathlib import Path

from fcconv.errors import BadInputError

PYTORCH_SUFFIXES = {".pt2": "a torch.export program", ".safetensors": "the converted state_dict"}
OUTPUT_SUFFIXES = (".onnx", *PYTORCH_SUFFIXES)  # what convert writes, told by the output's suffix


def parse_sizes(text: str | None) -> list[tuple[int, ...]] | None:
    """``--sizes`` text (``224x224,320x480``) as spatial sizes; None when empty."""
    if not text:
        return None
    from fcconv.sizes import check_tensor_size

    sizes = []
    for item in text.split(","):
        try:
            size = tuple(int(p) for p in item.lower().replace("×", "x").split("x"))
        except ValueError:
            raise BadInputError(f"--sizes {text!r}: {item!r} is not a size like 224x224") from None
        if not size or any(s <= 0 for s in size):
            raise BadInputError(f"--sizes {text!r}: {item!r} is not a positive size")
        check_tensor_size(size, f"--sizes {text!r}: {item!r}")  # too large whatever the channel count
        sizes.append(size)
    return sizes


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape`` text (``3,224,224``) as a shape; None when not given."""
    from fcconv.sizes import parse_input_shape

    return parse_input_shape(text) if text else None


def check_pool(pool: str | None) -> str | None:
    if pool is not None and pool not in ("avg", "max"):
        raise BadInputError(f"--pool {pool!r} is not avg or max")
    return pool


def check_report_paths(inputs: list[Path], *reports: Path | None) -> None:
    """Refuse report files that could not be written, or would overwrite an input, before any work is done."""
    given = [r for r in reports if r is not None]
    if len({r.resolve() for r in given}) < len(given):
        raise BadInputError("--json and --junit name the same file")
    for report in given:
        option = "--json" if report is reports[0] else "--junit"
        refuse_unwritable(option, report)
        if any(report.resolve() == path.resolve() for path in inputs):
            raise BadInputError(f"{option} {report} would overwrite an input")


def default_output(path: Path) -> Path:
    """Where ``convert`` writes when ``-o`` is not given: NAME.fcn.onnx beside the checkpoint."""
    if not path.name:  # '' (which arrives as '.') or a folder such as '/'
        raise BadInputError(f"{path}: is a directory, not a checkpoint")
    return path.with_name(f"{path.name.split('.')[0]}.fcn.onnx")


def convert_target(model: Path, output: Path | None, onnx_only: dict[str, bool], external_data: bool) -> Path:
    """The file ``convert`` writes, refused when it cannot be written or would overwrite the input, or when an
    option of ``onnx_only`` (flag: given) is given for PyTorch output."""
    from fcconv.external_data import external_data_path

    if output is not None and output.name in ("", ".."):  # an empty path arrives as '.'
        raise BadInputError(
            f"-o {str(output)!r} is empty or a folder, not a file name: give the file to write, such as "
            f"{default_output(model).name}"
        )
    target = output or default_output(model)
    for written in (target, external_data_path(target)):
        if written.exists() and written.resolve() == model.resolve():
            raise BadInputError(f"-o {target} would overwrite the input")
    refuse_unwritable("-o", target)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:  # -o out.txt would otherwise be written as ONNX
        given = f"not {target.suffix!r}" if target.suffix else "and the name has none"
        raise BadInputError(
            f"-o {target}: the suffix picks what is written and must be one of {', '.join(OUTPUT_SUFFIXES)}, {given}"
        )
    given = [flag for flag, on in {**onnx_only, "--external-data": external_data}.items() if on]
    if target.suffix.lower() in PYTORCH_SUFFIXES and given:
        flag = given[0]
        raise BadInputError(
            f"{flag} applies to ONNX output; -o {target} writes {PYTORCH_SUFFIXES[target.suffix.lower()]}"
        )
    return target


def check_output(path: Path, suffix: str, option: str, inputs: tuple[Path, ...]) -> None:
    """Refuse an output path that would overwrite an input, is a folder, or lies in a folder that cannot be written."""
    if path.suffix.lower() != suffix:
        raise BadInputError(f"{option} {path}: the file is written as {suffix[1:].upper()}; name it NAME{suffix}")
    if (
        path.exists()
        and not path.is_dir()
        and any(path.resolve() == given.resolve() for given in inputs if given.exists())
    ):
        raise BadInputError(f"{option} {path} would overwrite an input")
    refuse_unwritable(option, path)


def refuse_unwritable(option: str, path: Path) -> None:
    """Refuse an output ``path`` that is a folder or lies in a folder that is missing or cannot be written."""
    if path.is_dir():
        raise BadInputError(f"{option} {path}: is a directory")
    if not path.parent.is_dir():
        raise BadInputError(f"{option} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BadInputError(f"{option} {path}: directory {path.parent} is not writable")
