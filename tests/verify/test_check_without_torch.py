"""`pip install fcconv` without the torch extra: `fcconv check` gates ONNX exports, the rest says what to install.

Each command runs in a fresh interpreter in which torch, torchvision, safetensors and matplotlib cannot be
imported (``sys.modules[name] = None`` makes every import of them raise ModuleNotFoundError), as on a machine
where they are not installed.
"""

import subprocess
import sys

import onnx
import pytest
from conftest import REPO
from onnx import numpy_helper

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"
WITHOUT_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'safetensors', 'matplotlib'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv[0] = 'fcconv'\n"
    "from fcconv.cli import run\n"
    "try:\n"
    "    run()\n"
    "finally:\n"
    "    loaded = sorted(m for m in sys.modules if m.partition('.')[0] == 'torch' and sys.modules[m] is not None)\n"
    "    assert not loaded, loaded\n"
)


def fcconv_without_torch(*args):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The shipped sample converted (with torch), and a copy with the bias of its class 3 changed by 1."""
    folder = tmp_path_factory.mktemp("exports")
    good = folder / "digits.fcn.onnx"
    converted = subprocess.run(
        [sys.executable, "-m", "fcconv", "convert", str(SAMPLE), "-o", str(good), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert converted.returncode == 0, converted.stderr
    model = onnx.load(str(good))
    bias = next(t for t in model.graph.initializer if t.name == "fc2.bias")
    values = numpy_helper.to_array(bias).copy()
    values[3] += 1.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    tampered = folder / "tampered.onnx"
    onnx.save(model, str(tampered))
    return good, tampered


def test_torch_cannot_be_imported_in_the_subprocess():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH.split("sys.argv")[0] + "import torch"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_an_export_passes_fcconv_check_without_torch(exports):
    good, _ = exports
    result = fcconv_without_torch("check", good)
    assert result.returncode == 0, result.stderr
    assert f"{good} passed" in result.stdout
    assert "reference output" in result.stdout and "weights digest" in result.stdout


def test_a_tampered_export_fails_fcconv_check_without_torch(exports):
    _, tampered = exports
    result = fcconv_without_torch("check", tampered)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"fcconv: {tampered} failed: weights digest")
    assert "reference output" in result.stderr


def test_the_version_needs_no_torch():
    result = fcconv_without_torch("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fcconv ")


@pytest.mark.parametrize("command", ["convert", "inspect", "verify"])
def test_a_command_that_needs_torch_says_so_in_one_line_without_it(command, tmp_path):
    args = {
        "convert": [SAMPLE, "-o", tmp_path / "out.onnx"],
        "inspect": [SAMPLE],
        "verify": [tmp_path / "missing.onnx", "--reference", SAMPLE],
    }[command]
    result = fcconv_without_torch(command, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"fcconv: error: fcconv {command} needs PyTorch: pip install 'fcconv[torch]'\n"
    assert not (tmp_path / "out.onnx").exists()


def test_checking_a_program_without_torch_says_so(tmp_path):
    program = tmp_path / "model.pt2"
    program.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: never read, torch is needed first
    result = fcconv_without_torch("check", program)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "fcconv: error: fcconv check needs PyTorch: pip install 'fcconv[torch]'\n"
