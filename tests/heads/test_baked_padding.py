"""Padding an exporter computed for one input size: constant uneven pads before a strided Conv are warned about.

The models below pad as TensorFlow's "SAME" does, from the input's size: Hugging Face's
MobileNetV1 (``apply_tf_padding``) decides it in Python, so torch.onnx.export writes the
pads it computed at the export size as constants into a graph whose height and width it
declares free; the same padding computed with tensor ops stays computed from the
input's shape. A ZeroPad2d and a Conv's own padding are the same at every size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import REPO, seeded

from fcconv.errors import FcconvWarning
from fcconv.pipeline import Warned, convert_file, verify_file

SOURCE = '''
import torch
from torch import nn
import torch.nn.functional as F


def apply_tf_padding(features, conv):
    """Hugging Face MobileNetV1's TensorFlow "SAME" padding: decided in Python from the input's size."""
    in_height, in_width = features.shape[-2:]
    sh, sw = conv.stride
    kh, kw = conv.kernel_size
    ph = max(kh - sh, 0) if in_height % sh == 0 else max(kh - in_height % sh, 0)
    pw = max(kw - sw, 0) if in_width % sw == 0 else max(kw - in_width % sw, 0)
    return F.pad(features, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), "constant", 0.0)


def shape_padding(features):
    """The same padding for this 3×3 stride-2 convolution, computed with tensor ops from the input's shape."""
    in_height, in_width = features.shape[-2:]
    ph, pw = 1 + in_height % 2, 1 + in_width % 2
    return F.pad(features, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), "constant", 0.0)


class TfSame(nn.Module):
    padding = "tf"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1 if self.padding == "conv" else 0)
        self.zero = nn.ZeroPad2d(1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        if self.padding == "tf":
            x = apply_tf_padding(x, self.conv)
        elif self.padding == "shape":
            x = shape_padding(x)
        elif self.padding == "zero":
            x = self.zero(x)
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class ShapeSame(TfSame):
    padding = "shape"


class ZeroPadded(TfSame):
    padding = "zero"


class ConvPadded(TfSame):
    padding = "conv"
'''
MODELS = {"tf": "TfSame", "shape": "ShapeSame", "zero": "ZeroPadded", "conv": "ConvPadded"}
NATIVE = 32  # even: TensorFlow's SAME pads a 3×3 stride-2 convolution by 0 before and 1 after


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tfsame.py (for ``--arch tfsame:NAME``), and for each model its checkpoint and its ONNX export at 32×32
    with free height and width."""
    import importlib.util

    folder = tmp_path_factory.mktemp("tfsame")
    (folder / "tfsame.py").write_text(textwrap.dedent(SOURCE))
    spec = importlib.util.spec_from_file_location("tfsame", folder / "tfsame.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for stem, name in MODELS.items():
        model = seeded(getattr(module, name))
        torch.save(model.state_dict(), folder / f"{stem}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about the Python-decided padding
            torch.onnx.export(
                model, torch.zeros(1, 3, NATIVE, NATIVE), str(folder / f"{stem}.onnx"), dynamo=False,
                input_names=["input"], output_names=["logits"], opset_version=17,
                dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}},
            )  # fmt: skip
    return folder


def fcconv(folder, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}
    command = [sys.executable, "-m", "fcconv", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)


def pads_of(path):
    """Each Pad node's pads as the graph computes them: from constants alone, or (None) from the input's shape."""
    import onnx

    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Pad":
            seen, stack = set(), [node.input[1]]
            while stack:
                producer = producers.get(stack.pop())
                if producer is not None and id(producer) not in seen:
                    seen.add(id(producer))
                    stack += [name for name in producer.input if name]
            found[node.name] = (
                "shape" if any(n.op_type == "Shape" for n in model.graph.node if id(n) in seen) else ("constant")
            )
    return found


def test_the_exports_hold_constant_pads_for_python_decided_padding_and_shape_computed_ones_otherwise(folder):
    assert pads_of(folder / "tf.onnx") == {"/Pad": "constant"}
    assert pads_of(folder / "shape.onnx") == {"/Pad": "shape"}
    assert pads_of(folder / "zero.onnx") == {"/zero/Pad": "constant"}
    assert pads_of(folder / "conv.onnx") == {}


def test_converting_an_export_with_tf_same_pads_baked_in_warns_on_stderr_naming_the_pad_and_its_conv(folder):
    result = fcconv(folder, "convert", "tf.onnx", "--input-shape", f"3,{NATIVE},{NATIVE}", "-q")
    assert result.returncode == 0, result.stderr  # a warning, not a refusal: the conversion is exact
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("fcconv: warning: Pad node '/Pad' pads the input of Conv node '/conv/Conv' by constants")
    assert "0 before and 1 after along height (stride 2)" in line and "TensorFlow-style SAME padding" in line
    assert line.endswith("fcconv verify tf.fcn.onnx --reference model.pt")
    assert (folder / "tf.fcn.onnx").is_file()


def test_the_verify_command_the_warning_names_finds_the_export_differs_from_the_pytorch_original(folder):
    fcconv(folder, "convert", "tf.onnx", "--input-shape", f"3,{NATIVE},{NATIVE}", "-q", "-o", "advice.fcn.onnx")
    result = fcconv(folder, "verify", "advice.fcn.onnx", "--reference", "tf.pt", "--arch", "tfsame:TfSame")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout


@pytest.mark.parametrize("stem", ["shape", "zero", "conv"])
def test_padding_that_is_right_at_every_size_converts_without_a_warning_and_matches_the_original(
    folder, stem, monkeypatch
):
    monkeypatch.chdir(folder)  # where --arch tfsame:NAME is imported from
    events = []
    shape = f"3,{NATIVE},{NATIVE}"
    result = convert_file(f"{stem}.onnx", f"{stem}.fcn.onnx", input_shape=shape, progress=events.append)
    assert result.written and result.warnings == [] and not any(isinstance(e, Warned) for e in events)
    assert verify_file(f"{stem}.fcn.onnx", f"{stem}.pt", arch=f"tfsame:{MODELS[stem]}").passed


def test_the_python_api_reports_the_warning_as_an_event_in_the_result_and_as_a_python_warning(folder):
    events = []
    shape = f"3,{NATIVE},{NATIVE}"
    result = convert_file(folder / "tf.onnx", folder / "api.fcn.onnx", input_shape=shape, progress=events.append)
    warned = [event.text for event in events if isinstance(event, Warned)]
    assert result.written and warned == result.warnings and len(warned) == 1
    assert "Pad node '/Pad'" in warned[0] and "fcconv verify api.fcn.onnx --reference model.pt" in warned[0]
    with pytest.warns(FcconvWarning, match=r"Pad node '/Pad' pads the input of Conv node '/conv/Conv'"):
        convert_file(folder / "tf.onnx", folder / "api2.fcn.onnx", input_shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FcconvWarning)
        assert convert_file(folder / "zero.onnx", folder / "api3.fcn.onnx", input_shape=shape).warnings == []
