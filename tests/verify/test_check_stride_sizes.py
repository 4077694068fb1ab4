"""fcconv check of an export whose trunk takes only some sizes: it is run at sizes it takes, and a --sizes it
cannot take is bad input named in one line.

SkipNet (tests/verify/test_verification_sizes.py) adds an upsampled stride-4 map to its
stride-2 map, as DLA and HRNet do at stride 32: it takes the native 32×32 and sizes 4
pixels apart from it, and fails at the odd sizes check runs other models at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, seeded
from test_check_declared_sizes import conv_net
from test_verification_sizes import NATIVE, SOURCE, _module
from typer.testing import CliRunner

from fcconv.cli import app


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """skipnet.fcn.onnx, written by ``fcconv convert`` from a SkipNet checkpoint."""
    folder = tmp_path_factory.mktemp("skipnet")
    (folder / "skipnet.py").write_text(textwrap.dedent(SOURCE))
    torch.save(seeded(_module(folder).SkipNet).state_dict(), folder / "skipnet.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}
    command = [sys.executable, "-m", "fcconv", "convert", "skipnet.pt", "--arch", "skipnet:SkipNet", "-q"]
    command += ["--input-shape", ",".join(map(str, NATIVE))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
    assert result.returncode == 0, result.stderr
    return folder / "skipnet.fcn.onnx"


def check(*args):
    result = CliRunner().invoke(app, ["check", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_check_at_its_default_sizes_runs_an_export_that_takes_only_some_sizes_at_sizes_it_takes(export):
    report = export.with_name("default.json")
    code, stdout, stderr = check(export, "--json", report)
    assert code == 0, stdout + stderr
    runs = [c for c in json.loads(report.read_text())["models"][0]["checks"] if c["check"] == "runs"]
    sizes = [tuple(c["input_size"]) for c in runs]
    assert all(c["verdict"] == "pass" for c in runs) and len(sizes) == 3 and sizes[0] == (32, 32)
    assert all((h - 32) % 4 == 0 and (w - 32) % 4 == 0 for h, w in sizes), sizes
    assert any(h != w for h, w in sizes) and max(max(s) for s in sizes) >= 64  # non-square, and larger
    assert "so it runs at sizes whole steps apart" in runs[1]["message"]


def test_a_size_the_export_cannot_take_is_refused_in_one_line_naming_it_with_exit_2(export):
    report = export.with_name("refused.json")
    code, stdout, stderr = check(export, "--sizes", "32x32,33x35", "--json", report)
    assert code == 2, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("fcconv: error: size 33×35: ") and "cannot take it" in lines[0]
    sizes = lines[0].rsplit("--sizes ", 1)[1].split(",")
    assert sizes[0] == "32x32" and all((int(s.split("x")[0]) - 32) % 4 == 0 for s in sizes)
    assert not report.exists()
    assert check(export, "--sizes", ",".join(sizes))[0] == 0  # the sizes the line offers do run


def test_a_model_that_runs_at_no_size_but_its_native_one_still_fails_its_runs_at_a_given_size(tmp_path):
    path = conv_net(tmp_path / "fixed.onnx", ["n", 3, 16, 16])  # onnxruntime refuses any other size
    code, stdout, stderr = check(path, "--sizes", "16x16,20x24")
    assert code == 1, stdout + stderr
    assert "failed: free spatial axes, runs" in stderr
