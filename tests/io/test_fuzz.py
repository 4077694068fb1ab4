"""Corrupted and foreign checkpoints: exit 2 with one line on stderr, never a traceback, nothing written.

Two parts:

1. A hypothesis fuzz test that mutates the bytes of three valid checkpoints of the shipped digits
   classifier (the zip-format sample itself, a legacy-format ``torch.save(...,
   _use_new_zipfile_serialization=False)`` copy and a safetensors copy, each beside its model card)
   by truncation, flipping or overwriting a byte range, inserting bytes, or replacing the whole
   file, and runs ``fcconv inspect`` / ``fcconv convert`` on the result.
2. A table of bad inputs the table in test_cli.py does not cover, run through inspect, convert and
   ``verify --reference``.

What the fuzz test expects is decided by an oracle that reads the mutated file on its own
(``torch.load(weights_only=True)``, for a zip both memory-mapped as fcconv reads it and not, or
``safetensors.torch.load_file``):

- it cannot be read, is not a mapping of tensors, or its keys or shapes differ from the original:
  exit 2, exactly one line on stderr starting ``fcconv: error:``;
- it reads back with the original keys, shapes and dtype (float32): the mutation only changed
  weights (a flip inside a tensor's bytes, say), so it is a valid checkpoint of a different model.
  ``inspect`` must exit 0. ``convert`` must exit 0 when every weight is finite and at most 1e6 in
  magnitude: this LeNet cannot overflow float32 then, and the converted model must match the
  original. Only with a non-finite or larger weight may ``convert`` exit 1 instead (the original's
  own output may then be inf or NaN, and verification must fail rather than call NaN equal);
- it reads back with the original keys and shapes but another dtype: 0 or 2 (and 1 for convert);
- the two zip readers disagree (mmap skips the local headers): either one's outcome.

In every case: no exception escapes, "Traceback" is not on stderr, the input's bytes are unchanged,
nothing but ``NAME.fcn.onnx`` after a ``convert`` that exits 0 appears in the directory, exit 1
comes with "FAIL" in the table and the one "verification failed" line, exit 0 with no error line.

The CLI runs in-process through typer's CliRunner (typer 0.29 keeps stderr apart from stdout), under
the warning filters of a fresh ``python -m fcconv`` process with warnings written to the captured
stderr, as a real run shows them (pytest would otherwise swallow them).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import tarfile
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fcconv.cli import app

# Examples per checkpoint format (three formats). About a minute for the whole file on 2 cores.
FUZZ_INSPECT_EXAMPLES = 200
FUZZ_CONVERT_EXAMPLES = 30
# Every fuzz test sees the same cases on every run, and none is failed for being slow.
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
# Largest weight magnitude at which this LeNet's float32 outputs cannot overflow (see the docstring).
SAFE_WEIGHT = 1e6

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"
CARD = REPO / "sample_models" / "digits_lenet.json"
SUFFIX = {"zip": ".pt", "legacy": ".pt", "safetensors": ".safetensors"}
FORMATS = tuple(SUFFIX)
RUNNER = CliRunner()
_names = count()


# --- running the command line ---------------------------------------------------------------------


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def invoke(*args):
    """Run ``fcconv ARGS`` in-process as a fresh process would; fail on anything that would be a traceback."""
    saved_path = list(sys.path)
    with warnings.catch_warnings():
        # Python's default filters (python -m, no -W): UserWarning and friends are shown once per location.
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _show_on_stderr
        try:
            result = RUNNER.invoke(app, [str(a) for a in args])
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - e.g. a pyo3 PanicException, which is no Exception
            raise AssertionError(
                f"fcconv {' '.join(map(str, args))}: {type(exc).__name__} escaped the command "
                f"(a traceback in a real run): {exc!r}"
            ) from exc
        finally:
            sys.path[:] = saved_path  # fcconv puts the model card's folder on sys.path
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"fcconv {' '.join(map(str, args))}: uncaught exception (a traceback):\n{trace}")
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str | None]:
    """Each entry of ``folder`` and, for a readable file, its digest."""
    return {p.name: (digest(p) if p.is_file() and os.access(p, os.R_OK) else None) for p in folder.iterdir()}


def assert_refused(result, what, expected=()):
    """Exit 2 and exactly one line on stderr, ``fcconv: error: ...`` naming each of ``expected``."""
    assert "Traceback" not in result.stderr, (what, result.stderr)
    assert result.exit_code == 2, (what, result.exit_code, result.stderr, result.stdout[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, (what, result.stderr)
    assert lines[0].startswith("fcconv: error:"), (what, result.stderr)
    for text in expected:
        alternatives = text if isinstance(text, tuple) else (text,)
        assert any(t in lines[0] for t in alternatives), (what, text, lines[0])


# --- the valid checkpoints and where their structure lies ------------------------------------------


class Source:
    """A valid checkpoint's bytes and the byte ranges that hold its structure (headers, pickles, sizes)."""

    def __init__(self, fmt: str, data: bytes, regions: tuple[tuple[int, int], ...]) -> None:
        self.fmt, self.data, self.regions = fmt, data, regions

    def __repr__(self) -> str:
        return f"<{self.fmt} checkpoint, {len(self.data)} bytes>"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints it in a falsifying example
        printer.text(repr(self))


def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(SAMPLE, map_location="cpu", weights_only=True)


def save(state, path: Path, fmt: str) -> Path:
    if fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _zip_regions(data: bytes) -> list[tuple[int, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        regions = [(info.header_offset, info.header_offset + 96) for info in infos]
        pickled = next(info for info in infos if info.filename.endswith("data.pkl"))
        regions.append((pickled.header_offset, pickled.header_offset + 96 + pickled.file_size))
        regions.append((archive.start_dir, len(data)))
    return regions


class _Anything:
    """Stands in for every global of a pickle, so that its bytes can be walked without torch."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass


class _Skim(pickle.Unpickler):
    def find_class(self, module, name):
        return _Anything

    def persistent_load(self, pid):
        return pid


def _legacy_regions(data: bytes) -> list[tuple[int, int]]:
    """The five pickles up front, then each storage's 8-byte element count (its float32 data follows)."""
    f = io.BytesIO(data)
    for _ in range(4):  # magic number, protocol version, system info, the state_dict
        _Skim(f).load()
    keys = pickle.load(f)
    regions = [(0, f.tell())]
    for _ in keys:
        regions.append((f.tell(), f.tell() + 8))
        elements = int.from_bytes(f.read(8), "little")
        f.seek(4 * elements, 1)
    assert f.tell() == len(data), "legacy layout not understood"
    return regions


def _safetensors_regions(data: bytes) -> list[tuple[int, int]]:
    return [(0, 8 + int.from_bytes(data[:8], "little"))]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Source]:
    folder = tmp_path_factory.mktemp("sources")
    state = state_dict()
    result = {}
    for fmt in FORMATS:
        path = SAMPLE if fmt == "zip" else save(state, folder / f"digits{SUFFIX[fmt]}", fmt)
        data = path.read_bytes()
        regions = {"zip": _zip_regions, "legacy": _legacy_regions, "safetensors": _safetensors_regions}[fmt](data)
        result[fmt] = Source(fmt, data, tuple((lo, min(hi, len(data))) for lo, hi in regions))
    return result


# --- mutations --------------------------------------------------------------------------------------

# Values for size, offset and header fields: zero, all ones, 2^31, 2^32+1, 2^62, 2^40, 1e9, INT32_MAX, then
# text and pickle bytes that break JSON headers and pickles.
SPECIAL = [
    b"\x00" * 8,
    b"\xff" * 8,
    (2**31).to_bytes(8, "little"),
    (2**32 + 1).to_bytes(8, "little"),
    (2**62).to_bytes(8, "little"),
    (2**40).to_bytes(8, "little"),
    (10**9).to_bytes(8, "little"),
    b"\xff\xff\xff\x7f",
    b"9999999999",
    b"-1",
    b'"',
    b"}",
    b"\x80\x02",
]


def offsets(source: Source, upper: int):
    """Anywhere in the file, or (as often) inside a region holding structure."""
    upper = max(upper, 0)
    inside = st.sampled_from(source.regions).flatmap(
        lambda r: st.integers(min(r[0], upper), min(max(r[1] - 1, r[0]), upper))
    )
    return st.one_of(st.integers(0, upper), inside)


@dataclass(frozen=True)
class Mutation:
    kind: str  # truncate, xor, overwrite, insert, replace
    at: int = 0
    blob: bytes = b""

    def apply(self, data: bytes) -> bytes:
        at, blob = self.at, self.blob
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "xor":
            flipped = bytes(b ^ m for b, m in zip(data[at : at + len(blob)], blob))
            return data[:at] + flipped + data[at + len(flipped) :]
        if self.kind == "overwrite":
            return data[:at] + blob + data[at + len(blob) :]
        if self.kind == "insert":
            return data[:at] + blob + data[at:]
        return blob

    def __repr__(self) -> str:
        if self.kind == "truncate":
            return f"truncate at {self.at}"
        if self.kind == "replace":
            return f"replace with {len(self.blob)} bytes {self.blob[:32].hex()}…"
        return f"{self.kind} {self.blob.hex()} at {self.at}"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@st.composite
def mutations(draw, source: Source) -> Mutation:
    n = len(source.data)
    kind = draw(st.sampled_from(["truncate", "xor", "overwrite", "insert", "replace"]))
    if kind == "truncate":
        return Mutation(kind, draw(offsets(source, n - 1)))
    if kind == "xor":
        masks = draw(st.lists(st.integers(1, 255), min_size=1, max_size=16))
        return Mutation(kind, draw(offsets(source, n - 1)), bytes(masks))
    if kind in ("overwrite", "insert"):
        blob = draw(st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=64)))
        return Mutation(kind, draw(offsets(source, n - 1 if kind == "overwrite" else n)), blob)
    return Mutation(kind, blob=draw(st.binary(min_size=0, max_size=4096)))


# --- the oracle -------------------------------------------------------------------------------------


def _classify(obj, original: dict[str, torch.Tensor]) -> str:
    if not isinstance(obj, dict) or set(obj) != set(original):
        return "invalid"
    if not all(isinstance(v, torch.Tensor) and v.shape == original[k].shape for k, v in obj.items()):
        return "invalid"
    if any(v.dtype != torch.float32 for v in obj.values()):
        return "other dtype"
    for v in obj.values():
        if not bool(torch.isfinite(v).all()) or (v.numel() and float(v.abs().max()) > SAFE_WEIGHT):
            return "wild"
    return "safe"


def oracle(path: Path, fmt: str, original: dict[str, torch.Tensor]) -> set[str]:
    """How each of torch's readers sees the file: 'invalid', 'other dtype', 'safe' (float32, finite,
    |w| <= SAFE_WEIGHT) or 'wild' (float32, other weights).

    A zip checkpoint is read twice, as fcconv reads it (memory-mapped: torch then takes each record's
    place from the central directory and skips the local headers) and without mmap (miniz checks the
    local headers too); where the two disagree, either outcome is right.
    """
    if fmt == "safetensors":
        readers = [lambda: safetensors.torch.load_file(str(path))]
    else:
        readers = [lambda: torch.load(path, map_location="cpu", weights_only=True)]
        if zipfile.is_zipfile(path):
            readers.append(lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    seen = set()
    for read in readers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = read()
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - whatever fails to read is not a checkpoint
            seen.add("invalid")
            continue
        seen.add(_classify(obj, original))
        del obj
    return seen


ALLOWED = {
    ("inspect", "invalid"): {2},
    ("inspect", "other dtype"): {0, 2},
    ("inspect", "safe"): {0},
    ("inspect", "wild"): {0},
    ("convert", "invalid"): {2},
    ("convert", "other dtype"): {0, 1, 2},
    ("convert", "safe"): {0},
    ("convert", "wild"): {0, 1},
}


@functools.cache
def original() -> dict[str, torch.Tensor]:
    return state_dict()


def check_mutation(command: str, source: Source, mutation: Mutation | None, folder: Path) -> None:
    """Run ``command`` on the mutated checkpoint (the source itself for None) and check the outcome."""
    label = repr(mutation) if mutation else "unmutated"
    data = mutation.apply(source.data) if mutation else source.data
    stem = f"m{next(_names)}"
    path = folder / f"{stem}{SUFFIX[source.fmt]}"
    card = folder / f"{stem}.json"
    path.write_bytes(data)
    shutil.copyfile(CARD, card)
    output = folder / f"{stem}.fcn.onnx"
    try:
        before = listing(folder)
        expected = oracle(path, source.fmt, original())
        result = invoke(command, path)
        what = (source.fmt, command, label, expected)
        assert "Traceback" not in result.stderr, (what, result.stderr)
        allowed = set().union(*(ALLOWED[command, seen] for seen in expected))
        assert result.exit_code in allowed, (what, result.exit_code, result.stderr)
        assert path.read_bytes() == data, (what, "the input was modified")
        after = listing(folder)
        if command == "convert" and result.exit_code == 0:
            assert output.is_file(), what
            del after[output.name]
        assert after == before, (what, sorted(set(after) - set(before)))
        if result.exit_code == 2:
            assert_refused(result, what)
        elif result.exit_code == 1:
            assert "FAIL" in result.stdout, what
            assert result.stderr.splitlines() == [f"fcconv: verification failed; {output} was not written"], (
                what,
                result.stderr,
            )
        else:
            assert "fcconv: error" not in result.stderr, (what, result.stderr)
    finally:
        for leftover in (path, card, output):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_unmutated_checkpoints_convert(fmt, sources, fuzz_folder):
    """The fuzz test's starting points are valid: inspect and convert exit 0."""
    assert oracle(SAMPLE, "zip", original()) == {"safe"}
    for command in ("inspect", "convert"):
        check_mutation(command, sources[fmt], None, fuzz_folder)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(FUZZ, max_examples=FUZZ_INSPECT_EXAMPLES)
@given(data=st.data())
def test_inspect_of_a_mutated_checkpoint_exits_2_in_one_line_or_reads_it(fmt, sources, fuzz_folder, data):
    source = sources[fmt]
    check_mutation("inspect", source, data.draw(mutations(source), label="mutation"), fuzz_folder)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(FUZZ, max_examples=FUZZ_CONVERT_EXAMPLES)
@given(data=st.data())
def test_convert_of_a_mutated_checkpoint_writes_nothing_unless_it_verifies(fmt, sources, fuzz_folder, data):
    source = sources[fmt]
    check_mutation("convert", source, data.draw(mutations(source), label="mutation"), fuzz_folder)


# --- the table --------------------------------------------------------------------------------------


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "not a checkpoint\n")


def _tar_of_sample(path: Path, mode: str) -> None:
    with tarfile.open(path, mode) as archive:
        archive.add(SAMPLE, arcname=SAMPLE.name)


def _lists(path: Path, protocol: int) -> None:
    path.write_bytes(pickle.dumps({k: v.tolist() for k, v in state_dict().items()}, protocol=protocol))


def _without(key):
    return lambda path, fmt: save({k: v for k, v in state_dict().items() if k != key}, path, fmt)


def _with_extra(path: Path, fmt: str) -> None:
    save({**state_dict(), "fc3.weight": torch.zeros(10, 10)}, path, fmt)


def _misshaped(path: Path, fmt: str) -> None:
    save({**state_dict(), "fc1.weight": torch.zeros(64, 255)}, path, fmt)


NOT_A_CHECKPOINT = ("not a PyTorch checkpoint", "no state_dict of tensors")

# name -> (write the file at the path given, what the one line must say)
TABLE = {
    "empty file beside its model card": (lambda p: p.write_bytes(b""), ["empty"]),
    "directory named like a checkpoint": (lambda p: p.mkdir(), ["directory"]),
    "nonexistent path beside a model card": (lambda p: None, ["no such file"]),
    "zip archive of a text file": (_zip_of_text, ["not a PyTorch checkpoint"]),
    "tar archive of the checkpoint": (lambda p: _tar_of_sample(p, "w"), ["not a PyTorch checkpoint"]),
    "gzipped tar of the checkpoint": (lambda p: _tar_of_sample(p, "w:gz"), ["not a PyTorch checkpoint"]),
    "gzipped checkpoint": (lambda p: p.write_bytes(gzip.compress(SAMPLE.read_bytes())), ["not a PyTorch checkpoint"]),
    "JSON named .pt": (lambda p: p.write_text(json.dumps({"fc1.weight": [[0.5]]})), ["not a PyTorch checkpoint"]),
    "pickled dict of lists, protocol 2": (lambda p: _lists(p, 2), [NOT_A_CHECKPOINT]),
    "pickled dict of lists, default protocol": (lambda p: _lists(p, pickle.DEFAULT_PROTOCOL), [NOT_A_CHECKPOINT]),
    "torch.save of a dict of lists": (
        lambda p: torch.save({k: v.tolist() for k, v in state_dict().items()}, p),
        ["no state_dict of tensors"],
    ),
    "a lone tensor": (lambda p: torch.save(torch.zeros(3), p), ["no state_dict of tensors"]),
    "int64 tensors": (lambda p: torch.save({k: v.long() for k, v in state_dict().items()}, p), ["int64"]),
    # what one flipped bit in the pickle makes of a key: the line must stay one line
    "a key holding a newline": (
        lambda p: torch.save({k.replace("conv1.", "conv1\n"): v for k, v in state_dict().items()}, p),
        ["conv1.weight", "missing"],
    ),
}
for _fmt in FORMATS:
    TABLE[f"missing tensor ({_fmt})"] = (lambda p, f=_fmt: _without("conv2.weight")(p, f), ["conv2.weight", "missing"])
    TABLE[f"extra tensor ({_fmt})"] = (lambda p, f=_fmt: _with_extra(p, f), ["fc3.weight", "unexpected"])
    TABLE[f"mis-shaped tensor ({_fmt})"] = (
        lambda p, f=_fmt: _misshaped(p, f),
        ["fc1.weight", "(64, 255)", "(64, 256)"],
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A good export of the sample, for ``verify --reference BAD``."""
    out = tmp_path_factory.mktemp("export") / "digits.onnx"
    result = invoke("convert", SAMPLE, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_checkpoint_exits_2_in_one_line_naming_the_problem(case, tmp_path, exported):
    write, expected = TABLE[case]
    suffix = ".safetensors" if "(safetensors)" in case else ".pt"
    path = tmp_path / f"model{suffix}"
    write(path)
    shutil.copyfile(CARD, tmp_path / "model.json")  # arch and input shape: the path alone must do
    for args in (["inspect", path], ["convert", path], ["verify", exported, "--reference", path]):
        before = listing(tmp_path)
        result = invoke(*args)
        assert_refused(result, (case, args[0]), expected)
        assert listing(tmp_path) == before, (case, args[0])


def test_a_missing_path_with_a_newline_in_its_name_still_gets_one_line(tmp_path):
    result = invoke("inspect", tmp_path / "no\nsuch.pt")
    assert_refused(result, "newline in the path", ["no such file"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its permissions")
def test_an_unreadable_checkpoint_exits_2_in_one_line(tmp_path):
    path = tmp_path / "model.pt"
    shutil.copyfile(SAMPLE, path)
    shutil.copyfile(CARD, tmp_path / "model.json")
    path.chmod(0)
    try:
        for command in ("inspect", "convert"):
            before = sorted(p.name for p in tmp_path.iterdir())
            result = invoke(command, path)
            assert_refused(result, command, ["permission denied"])
            assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        path.chmod(0o644)
    assert digest(path) == digest(SAMPLE)


def test_nan_weights_inspect_but_never_verify(tmp_path, exported):
    """A NaN-filled state_dict fits the architecture, so inspect shows it; but NaN outputs are no match:
    convert must fail verification (exit 1, nothing written) and so must verify against a good export."""
    path = save({k: torch.full_like(v, math.nan) for k, v in state_dict().items()}, tmp_path / "nan.pt", "zip")
    shutil.copyfile(CARD, tmp_path / "nan.json")
    before = listing(tmp_path)

    shown = invoke("inspect", path)
    assert shown.exit_code == 0, shown.stderr
    assert "fc1" in shown.stdout and shown.stderr == ""

    converted = invoke("convert", path)
    assert converted.exit_code == 1, (converted.exit_code, converted.stderr)
    assert "FAIL" in converted.stdout and " ok " not in converted.stdout
    assert converted.stderr.splitlines() == [
        f"fcconv: verification failed; {tmp_path / 'nan.fcn.onnx'} was not written"
    ]

    checked = invoke("verify", exported, "--reference", path)
    assert checked.exit_code == 1, (checked.exit_code, checked.stderr)
    assert "FAIL" in checked.stdout
    assert len(checked.stderr.splitlines()) == 1 and "does not match" in checked.stderr
    assert listing(tmp_path) == before


# --- exported programs ----------------------------------------------------------------------------

FUZZ_PT2_EXAMPLES = 40


@pytest.fixture(scope="module")
def exported_program(tmp_path_factory):
    from test_loading import ViewBatchNormSoftmax, save_exported

    folder = tmp_path_factory.mktemp("pt2")
    model = ViewBatchNormSoftmax().eval()
    return save_exported(folder / "model.pt2", model, torch.randn(2, 1, 8, 10))


@settings(FUZZ, max_examples=FUZZ_PT2_EXAMPLES)
@given(data=st.data())
def test_a_mutated_exported_program_is_read_or_refused_in_one_line(exported_program, tmp_path_factory, data):
    """Anything but exit 0 (the mutation left a loadable program) or 2 with one line is a failure."""
    original = exported_program.read_bytes()
    size = len(original)
    start = data.draw(st.integers(0, size - 1), label="start")
    length = data.draw(st.integers(1, 64), label="length")
    kind = data.draw(st.sampled_from(["truncate", "xor"]), label="kind")
    mutated = bytearray(original[:start] if kind == "truncate" else original)
    if kind == "xor":
        for i in range(start, min(start + length, size)):
            mutated[i] ^= 0xA5
    folder = tmp_path_factory.mktemp("mutated")
    path = folder / "model.pt2"
    path.write_bytes(bytes(mutated))
    result = invoke("inspect", path)
    assert "Traceback" not in result.stderr
    if result.exit_code != 0:
        assert_refused(result, f"{kind} at {start}")
    assert path.read_bytes() == bytes(mutated)
    assert [p.name for p in folder.iterdir()] == ["model.pt2"]
