"""A trusted whole pickle's classes are found where ``--arch module:callable`` finds its module.

The ``fcconv`` console script, unlike ``python -m fcconv``, does not put the working
directory on the import path; with ``--trust`` the classes a whole pickled module names
are imported from the working directory as ``--arch`` imports its module. Without
``--trust`` nothing from the file or the folder runs.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from fcconv.errors import BadInputError
from fcconv.load import load_model

MODULE = "trusted_pickle_net"
NET = """
import os
from pathlib import Path

import torch
from torch import nn

if os.environ.get("FCCONV_TEST_IMPORTED"):  # where fcconv imports this module, it says so
    Path(os.environ["FCCONV_TEST_IMPORTED"]).touch()


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.relu(self.conv(x))))
"""


def console_script() -> str:
    """The installed ``fcconv`` executable: beside this interpreter, else on PATH."""
    found = shutil.which("fcconv", path=str(Path(sys.executable).parent)) or shutil.which("fcconv")
    assert found, "the fcconv console script is not installed (pip install -e .)"
    return found


def fcconv(*args, cwd, marker=None):
    # this checkout's fcconv, without the working directory on the path (no empty PYTHONPATH entry: that is the cwd)
    path = [str(REPO), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.pop("FCCONV_TEST_IMPORTED", None)
    if marker is not None:
        env["FCCONV_TEST_IMPORTED"] = str(marker)
    command = [console_script(), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The model's module and the whole model, pickled by a process run beside the module."""
    where = tmp_path_factory.mktemp("saved")
    (where / f"{MODULE}.py").write_text(textwrap.dedent(NET))
    save = f"import torch, {MODULE}; torch.manual_seed(0); torch.save({MODULE}.SmallNet().eval(), 'whole.pt')"
    subprocess.run([sys.executable, "-c", save], cwd=where, check=True, timeout=120)
    return where


@pytest.fixture
def folder(saved, tmp_path):
    """A working directory of its own holding the module and the pickle."""
    for name in (f"{MODULE}.py", "whole.pt"):
        shutil.copy(saved / name, tmp_path / name)
    return tmp_path


def test_a_trusted_whole_pickle_whose_class_is_in_the_working_directory_converts_with_the_console_script(folder):
    marker = folder / "imported"
    result = fcconv("convert", "whole.pt", "--trust", "--input-shape", "3,8,8", "-q", cwd=folder, marker=marker)
    assert result.returncode == 0, result.stderr
    assert (folder / "whole.fcn.onnx").is_file()
    assert marker.exists()
    assert "Traceback" not in result.stderr


def test_a_trusted_whole_pickle_from_the_working_directory_is_inspected_by_the_console_script(folder):
    result = fcconv("inspect", "whole.pt", "--trust", "--input-shape", "3,8,8", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "Fully connected head" in result.stdout and "scores ← fc" in result.stdout


def test_an_untrusted_whole_pickle_in_the_working_directory_is_refused_and_its_module_never_runs(folder):
    marker = folder / "imported"
    result = fcconv("convert", "whole.pt", "--input-shape", "3,8,8", cwd=folder, marker=marker)
    assert result.returncode == 2
    assert f"{MODULE}.SmallNet" in result.stderr and "--trust" in result.stderr
    assert not marker.exists()
    assert not (folder / "whole.fcn.onnx").exists()


def test_loading_a_trusted_whole_pickle_leaves_the_import_path_as_it_was(folder, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    before = list(sys.path)
    try:
        loaded = load_model(folder / "whole.pt", trust=True, input_shape=(3, 8, 8))
    finally:
        sys.modules.pop(MODULE, None)
    assert type(loaded.module).__name__ == "SmallNet"
    assert sys.path == before


def test_a_trusted_whole_pickle_whose_module_is_nowhere_is_refused_in_one_line(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(folder / "whole.pt", elsewhere / "whole.pt")
    result = fcconv("convert", "whole.pt", "--trust", "--input-shape", "3,8,8", cwd=elsewhere)
    assert result.returncode == 2
    assert MODULE in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(BadInputError, match=MODULE):
        load_model(elsewhere / "whole.pt", trust=True, input_shape=(3, 8, 8))
