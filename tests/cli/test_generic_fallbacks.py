"""Inputs that once ended in the catch-all line ``fcconv: error: <ExceptionType>: ...`` get a line of their own.

Each is refused with exactly one line on stderr that says what is wrong in the user's
terms (never the name of a Python exception), exit 2, or 3 where the model cannot be
made fully convolutional, and nothing is written. Sizes whose verification cannot fit
in memory are refused before anything is allocated, with the estimate.

The command line runs in-process (typer's CliRunner), from a folder holding a copy of
the shipped digits classifier, its model card and its architecture, so that an
``--arch module:callable`` written there is importable.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

import fcconv.memory
from fcconv.cli import app

SAMPLES = REPO / "sample_models"
# A size no machine can verify at: its random inputs alone are 8 TB (two samples of 10^12 float32 pixels).
HUGE = "1000000x1000000"
EXCEPTION_NAME = re.compile(r"\b\w*(Error|Exception|Exit)\b:")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder with the digits sample (checkpoint and card), as the current directory."""
    for name in ("digits_lenet.pt", "digits_lenet.json"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the card's folder and the cwd on it
    monkeypatch.syspath_prepend(tmp_path)  # for the modules the tests write there
    return tmp_path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The digits sample converted to ONNX and to a .pt2 program."""
    out = tmp_path_factory.mktemp("exported")
    for name in ("digits_lenet.pt", "digits_lenet.json"):
        shutil.copy(SAMPLES / name, out / name)
    saved_path = list(sys.path)
    try:
        for suffix in (".onnx", ".pt2"):
            result = CliRunner().invoke(app, ["convert", str(out / "digits_lenet.pt"), "-o", str(out / f"d{suffix}")])
            assert result.exit_code == 0, result.stderr
    finally:
        sys.path[:] = saved_path
    return out


def listing(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def refused(folder, *args, code=2):
    """Run ``fcconv ARGS``; assert the exit code, one specific stderr line and an unchanged folder; return the line."""
    before = listing(folder)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("fcconv: error: "), line
    assert not EXCEPTION_NAME.search(line), line
    assert "--debug" not in line, line  # the catch-all's hint
    assert listing(folder) == before
    return line


def write_module(folder, name, source):
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


# --- -o "" -------------------------------------------------------------------------------------------


def test_an_empty_output_path_is_refused_as_no_file_name(folder):
    line = refused(folder, "convert", "digits_lenet.pt", "-o", "")
    assert "-o" in line and "not a file name" in line and "digits_lenet.fcn.onnx" in line


# --- --input-shape beyond int64 ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_an_input_shape_beyond_int64_is_refused_as_larger_than_any_tensor(folder, command):
    line = refused(folder, command, "digits_lenet.pt", "--input-shape", "99999999999999999999,224,224")
    assert "--input-shape '99999999999999999999,224,224' is larger than any tensor can be" in line


# --- sizes beyond the machine's memory ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "verify", "check onnx", "check pt2"])
def test_sizes_beyond_memory_are_refused_before_allocating_with_an_estimate(folder, exported, command):
    args = {
        "convert": ["convert", "digits_lenet.pt"],
        "verify": ["verify", exported / "d.onnx", "--reference", "digits_lenet.pt"],
        "check onnx": ["check", exported / "d.onnx"],
        "check pt2": ["check", exported / "d.pt2"],
    }[command]
    line = refused(folder, *args, "--sizes", f"28x28,{HUGE}")
    doing = "checking" if command.startswith("check") else "verifying"
    estimate = re.search(rf"{doing} at 1000000×1000000 needs at least ([\d,]+) GB of memory, more than the", line)
    assert estimate, line
    assert int(estimate[1].replace(",", "")) >= 8000  # at least its random inputs: 2 × 10^12 float32 values
    assert "--sizes" in line


def test_default_sizes_that_do_not_fit_are_refused_naming_the_size(folder, monkeypatch):
    """A model that takes any size, at a native 2000×2000: the native size fits a 500 MB machine, twice it does not."""
    write_module(
        folder,
        "anysize",
        """
        import torch
        from torch import nn

        class AnySize(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3)
                self.pool = nn.AdaptiveAvgPool2d(2)
                self.fc = nn.Linear(16, 3)

            def forward(self, x):
                return self.fc(torch.flatten(self.pool(self.conv(x)), 1))
        """,
    )
    import anysize

    torch.manual_seed(0)
    torch.save(anysize.AnySize().state_dict(), folder / "anysize.pt")
    monkeypatch.setattr(fcconv.memory, "machine_memory", lambda: 500_000_000)
    line = refused(folder, "convert", "anysize.pt", "--arch", "anysize:AnySize", "--input-shape", "1,2000,2000")
    assert "verifying at 4000×4000 needs at least" in line and "more than the 0.5 GB this machine has" in line
    assert "smaller sizes (--sizes)" in line


def test_a_native_size_beyond_memory_says_no_size_would_do(folder):
    write_module(
        folder,
        "anysize_native",
        """
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
        """,
    )
    import anysize_native

    torch.save(anysize_native.build().state_dict(), folder / "anysize_native.pt")
    args = ["--arch", "anysize_native:build", "--input-shape", "1,1000000,1000000"]
    line = refused(folder, "convert", "anysize_native.pt", *args)
    assert "verifying at 1000000×1000000 needs at least" in line and "even the native size does not fit" in line


def test_a_heatmap_of_a_picture_beyond_memory_is_drawn_in_tiles_or_refused_before_running(folder, monkeypatch):
    """A map that slides is cut into tiles that fit; one that does not (no tile reproduces it) is refused."""
    import numpy as np
    from custom_models import MeanPooled
    from PIL import Image

    Image.new("L", (3000, 2000)).save(folder / "wide.png")
    monkeypatch.setattr(fcconv.memory, "machine_memory", lambda: 200_000_000)
    drawn = CliRunner().invoke(app, ["heatmap", "digits_lenet.pt", "wide.png", "--save-map", "map.npy", "-q"])
    assert drawn.exit_code == 0, drawn.stderr
    assert np.load(folder / "map.npy").shape == (10, (2000 - 28) // 4 + 1, (3000 - 28) // 4 + 1)

    torch.manual_seed(0)
    torch.save(MeanPooled().state_dict(), folder / "pooled.pt")
    line = refused(folder, "heatmap", "pooled.pt", "wide.png", "--arch", "custom_models:MeanPooled",
                   "--input-shape", "3,16,16")  # fmt: skip
    assert "drawing the heatmap at 3000×2000 needs at least" in line and "scale the picture down" in line


# --- a 10,000-deep module nesting --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_model_nested_ten_thousand_levels_deep_is_refused_naming_the_depth(folder, command):
    write_module(
        folder,
        "deepnest",
        """
        from torch import nn

        def deep():
            inner = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
            for _ in range(10_000):
                inner = nn.Sequential(inner)
            return inner
        """,
    )
    line = refused(folder, command, "digits_lenet.pt", "--arch", "deepnest:deep")
    assert "--arch deepnest:deep: the model's modules nest 10001 levels deep" in line
    assert "at most 100 levels" in line


# --- a zero-width Linear -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("width", ["in", "out"])
def test_a_zero_width_linear_cannot_be_made_fully_convolutional(folder, command, width):
    write_module(
        folder,
        f"zerowidth_{width}",
        """
        from torch import nn

        class ZeroWidth(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3)
                self.pool = nn.AdaptiveAvgPool2d(IN_SIDE)
                self.fc1 = nn.Linear(4 * IN_SIDE * IN_SIDE, MIDDLE)
                self.fc2 = nn.Linear(MIDDLE, 3)

            def forward(self, x):
                return self.fc2(self.fc1(self.pool(self.conv(x)).flatten(1)))
        """.replace("IN_SIDE", "0" if width == "in" else "2").replace("MIDDLE", "0" if width == "out" else "5"),
    )
    module = __import__(f"zerowidth_{width}")
    torch.manual_seed(0)
    torch.save(module.ZeroWidth().state_dict(), folder / "zero.pt")
    args = ["--arch", f"zerowidth_{width}:ZeroWidth", "--input-shape", "1,8,8"]
    line = refused(folder, command, "zero.pt", *args, code=3)
    expected = {"in": "fc1 is Linear(0 → 5), with no input features", "out": "fc1 is Linear(16 → 0), with no output"}
    assert expected[width] in line and "cannot be made fully convolutional" in line


# --- a mixed int8 state_dict -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_state_dict_with_int8_tensors_beside_float_ones_is_refused_naming_the_tensor(folder, command):
    state = torch.load(folder / "digits_lenet.pt", weights_only=True)
    state["conv1.weight"] = (state["conv1.weight"] * 100).round().to(torch.int8)
    torch.save(state, folder / "mixed.pt")
    shutil.copy(folder / "digits_lenet.json", folder / "mixed.json")
    line = refused(folder, command, "mixed.pt")
    assert "mixed.pt: conv1.weight is int8 while the other weights are float32" in line
    assert "floating-point weights" in line
