"""Verification sizes for a trunk that takes only some input sizes, and the line for a size it cannot take.

The trunk below adds an upsampled stride-4 map to its stride-2 map (as DLA, HRNet and
TResNet do at stride 32): it takes the native 32×32 and sizes 4 pixels apart from it,
and refuses the others (an odd size gives maps of mismatched shapes).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, seeded
from custom_models import LeNet
from torch import nn

from fcconv.errors import BadInputError
from fcconv.rewrite import rewrite
from fcconv.sizes import default_sizes
from fcconv.verify import verification_sizes, verify

SOURCE = '''
import torch
from torch import nn


class SkipNet(nn.Module):
    """Stride 2, then stride 4 upsampled back and added: takes sizes 4 pixels apart."""

    def __init__(self, head="pool"):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.fc = nn.Linear(4 if head == "pool" else 4 * 16 * 16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.up(self.down(x))
        if self.head == "pool":
            x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


class FlattenHead(SkipNet):
    """The same trunk read by a Linear over its whole 16×16 map: the verifier slides it over larger maps."""

    def __init__(self):
        super().__init__(head="flatten")
'''
NATIVE = (3, 32, 32)
SIZE = re.compile(r"│ (\d+)×(\d+) │")


@pytest.fixture
def folder(tmp_path):
    """A folder holding the module (for ``--arch skipnet:SkipNet``) and a checkpoint of SkipNet."""
    (tmp_path / "skipnet.py").write_text(textwrap.dedent(SOURCE))
    torch.save(seeded(_module(tmp_path).SkipNet).state_dict(), tmp_path / "skipnet.pt")
    return tmp_path


def _module(folder):
    spec = importlib.util.spec_from_file_location("skipnet", folder / "skipnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _convert(folder, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}
    command = [sys.executable, "-m", "fcconv", "convert", "skipnet.pt", "--arch", "skipnet:SkipNet"]
    command += ["--input-shape", ",".join(map(str, NATIVE)), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)


def test_a_trunk_that_takes_only_some_sizes_converts_verified_at_the_native_size_plus_whole_strides(folder):
    result = _convert(folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "skipnet.fcn.onnx").is_file()
    assert "FAIL" not in result.stdout and "Traceback" not in result.stderr
    sizes = {(int(h), int(w)) for h, w in SIZE.findall(result.stdout)}
    assert (32, 32) in sizes and len(sizes) == 3
    assert any(h != w for h, w in sizes)  # a non-square size, as for any model
    assert all((h - 32) % 4 == 0 and (w - 32) % 4 == 0 for h, w in sizes), sizes


def test_a_size_the_original_cannot_take_is_refused_in_one_line_naming_it(folder):
    before = sorted(p.name for p in folder.iterdir())
    result = _convert(folder, "--sizes", "32x32,33x35")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fcconv: error: size 33×35: the original model cannot take it (")
    assert "--sizes" in lines[0] and "--debug" not in lines[0]
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == before


@pytest.mark.parametrize("model", ["SkipNet", "FlattenHead"])
def test_verify_raises_bad_input_naming_a_size_the_original_cannot_take_and_prints_nothing(folder, model, capfd):
    original = seeded(getattr(_module(folder), model))
    conversion = rewrite(original, NATIVE)
    with pytest.raises(BadInputError, match=r"^size 33×35: the original model cannot take it \(.+\)"):
        verify(original, conversion.module, NATIVE, sizes=[(32, 32), (33, 35)], batch=1)
    assert capfd.readouterr().err == ""  # a traced trunk prints its failing line itself; the error says it all


@pytest.mark.parametrize("model", ["SkipNet", "FlattenHead"])
def test_verify_at_the_default_sizes_runs_at_sizes_the_trunk_takes_and_passes(folder, model):
    original = seeded(getattr(_module(folder), model))
    conversion = rewrite(original, NATIVE)
    report = verify(original, conversion.module, NATIVE, batch=1)
    assert report.passed
    assert {check.input_size for check in report.checks} == set(verification_sizes(conversion, NATIVE))
    assert all((h - 32) % 4 == 0 and (w - 32) % 4 == 0 for h, w in (c.input_size for c in report.checks))


def test_a_trunk_that_takes_any_size_is_verified_at_the_default_sizes():
    shape = (1, 28, 28)
    assert verification_sizes(rewrite(seeded(LeNet), shape), shape) == default_sizes(shape)


@pytest.mark.parametrize(
    ("native", "step"), [((224, 224), (32, 32)), ((64, 64), (32, 32)), ((32, 40), (4, 4)), ((512,), (32,))]
)
def test_sizes_with_a_step_are_the_native_size_plus_whole_steps_one_non_square_and_twice_it(native, step):
    sizes = default_sizes((3, *native), step)
    assert sizes[0] == native and len(set(sizes)) == 3
    for size in sizes[1:]:
        assert all(s > n and (s - n) % k == 0 for s, n, k in zip(size, native, step)), size
    if len(native) == 2 and native[0] == native[1]:
        assert sizes[1][0] != sizes[1][1]
    if all(n % k == 0 for n, k in zip(native, step)) and len(native) == 2:
        assert sizes[2] == tuple(2 * n for n in native)


class BlockChecked(nn.Module):
    """Asserts, as timm's HaloNet does, that its stride-4 map tiles into blocks of 8: inputs 32 pixels apart."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        torch._assert(x.shape[2] % 8 == 0, "height is not a whole number of blocks")
        torch._assert(x.shape[3] % 8 == 0, "width is not a whole number of blocks")
        return self.fc(x.mean((2, 3)))


def test_the_sizes_chosen_pass_the_models_own_checks_of_its_input_size():
    model = seeded(BlockChecked)
    conversion = rewrite(model, NATIVE)
    sizes = verification_sizes(conversion, NATIVE, model)
    assert len(sizes) == 3 and all(h % 32 == 0 and w % 32 == 0 for h, w in sizes), sizes
    report = verify(model, conversion.module, NATIVE, batch=1, conversion=conversion)
    assert report.passed
    assert {check.input_size for check in report.checks} == set(sizes)


def test_the_trunk_of_a_traced_model_keeps_its_checks_and_is_verified_at_sizes_they_pass():
    from traced_whole import BlockCheckedWindow

    model = seeded(BlockCheckedWindow)
    conversion = rewrite(model, NATIVE)
    with torch.no_grad(), pytest.raises(AssertionError, match="whole number of blocks"):
        conversion.features(torch.randn(1, 3, 36, 36))
    sizes = verification_sizes(conversion, NATIVE)
    assert len(sizes) == 3 and all(h % 32 == 0 and w % 32 == 0 for h, w in sizes), sizes
    assert verify(model, conversion.module, NATIVE, batch=1, conversion=conversion).passed
