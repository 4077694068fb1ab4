"""Which of torch.onnx's exporters writes the ONNX file: the torch.export-based one by default, its nodes named after
the modules they compute, and the TorchScript one only as a named fallback, recorded in the metadata."""

import os
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
from conftest import REPO, TESTS, seeded
from custom_models import LeNet, SENet, SignalClassifier, TinyVGG, VolumeClassifier, small_convnext
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from typer.testing import CliRunner

import fcconv
from fcconv import export
from fcconv.cli import app
from fcconv.errors import BadInputError, FcconvWarning
from fcconv.runtime import OnnxRunner


def metadata(path):
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory):
    model = seeded(TinyVGG)
    conversion = fcconv.rewrite(model, (3, 224, 224))
    path = fcconv.export_onnx(conversion.module, tmp_path_factory.mktemp("vgg") / "vgg.onnx", (3, 224, 224))
    return model, conversion, path


class RefusesTorchExport(nn.ReLU):
    """A ReLU that the torch.export tracer cannot pass, while the TorchScript tracer can."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise NotImplementedError("this forward does not run under torch.export")
        return super().forward(x)


def refusing_lenet():
    """LeNet converted, then its ReLU swapped for one torch.export cannot trace (the same function)."""
    model = seeded(LeNet)
    conversion = fcconv.rewrite(model, (1, 28, 28))
    conversion.module.relu = RefusesTorchExport(inplace=True)
    return model, conversion


class SharedReLU(nn.Module):
    """One ReLU module called twice: two nodes of one module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv1(x)))).flatten(1))


def test_each_conv_node_is_named_after_the_module_it_computes(tiny_vgg):
    _, conversion, path = tiny_vgg
    nodes = onnx.load(str(path)).graph.node
    convs = {name for name, m in export.as_export_module(conversion.module).named_modules() if isinstance(m, nn.Conv2d)}
    assert {"features.0", "features.12", "classifier.0", "classifier.2"} <= convs
    assert sorted(node.name for node in nodes if node.op_type == "Conv") == sorted(convs)
    assert len({node.name for node in nodes}) == len(nodes)  # unique
    assert all(not node.metadata_props for node in nodes)  # no source locations of this machine in the file


def test_a_module_that_makes_several_nodes_names_each_after_itself_and_their_type(tmp_path):
    conversion = fcconv.rewrite(seeded(SharedReLU), (3, 8, 8))
    path = fcconv.export_onnx(conversion.module, tmp_path / "shared.onnx", (3, 8, 8))
    assert [node.name for node in onnx.load(str(path)).graph.node] == ["conv1", "act/Relu", "conv2", "act/Relu_1", "fc"]


def test_the_default_exporter_is_the_torch_export_based_one_and_the_metadata_says_so(tiny_vgg):
    model, conversion, path = tiny_vgg
    meta = metadata(path)
    assert meta["fcconv.onnx_exporter"] == "dynamo"
    assert "fcconv.onnx_exporter_fallback" not in meta
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    report = fcconv.verify(model, path, (3, 224, 224), sizes=[(224, 224), (257, 320)], conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    assert report.checks[-1].output_shape[2:] == (2, 4)


def test_the_default_export_neither_uses_the_torchscript_exporter_nor_silences_warnings(tmp_path, monkeypatch):
    calls = []
    original = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append((kwargs.get("dynamo"), list(warnings.filters)))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        fcconv.export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28))
        after = list(warnings.filters)
    assert [dynamo for dynamo, _ in calls] == [True]
    assert calls[0][1] == before == after  # no filter added while torch.onnx exports, none left behind
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]


def test_the_torchscript_exporter_is_a_named_fallback_for_the_same_model(tiny_vgg, tmp_path):
    model, conversion, dynamo_path = tiny_vgg
    path = fcconv.export_onnx(conversion.module, tmp_path / "ts.onnx", (3, 224, 224), exporter="torchscript")
    meta = metadata(path)
    assert meta["fcconv.onnx_exporter"] == "torchscript" and "fcconv.onnx_exporter_fallback" not in meta
    assert meta["fcconv.weights_sha256"] == metadata(dynamo_path)["fcconv.weights_sha256"]
    report = fcconv.verify(model, path, (3, 224, 224), sizes=[(224, 224), (257, 320)], conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    x = torch.randn(2, 3, 257, 320)
    assert (OnnxRunner(path)(x) - OnnxRunner(dynamo_path)(x)).abs().max() <= 1e-5


def test_where_the_default_exporter_fails_the_torchscript_one_writes_the_file_with_a_warning(tmp_path):
    model, conversion = refusing_lenet()
    with pytest.warns(FcconvWarning, match="exported with the TorchScript exporter"):
        path = fcconv.export_onnx(conversion.module, tmp_path / "fallback.onnx", (1, 28, 28))
    meta = metadata(path)
    assert meta["fcconv.onnx_exporter"] == "torchscript"
    assert "does not run under torch.export" in meta["fcconv.onnx_exporter_fallback"]
    report = fcconv.verify(model, path, (1, 28, 28), conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]


def test_asking_for_the_dynamo_exporter_alone_raises_its_error_and_leaves_nothing_behind(tmp_path):
    _, conversion = refusing_lenet()
    before = conversion.module.state_dict(keep_vars=True)
    with pytest.raises(Exception, match="does not run under torch.export"):
        fcconv.export_onnx(conversion.module, tmp_path / "out.onnx", (1, 28, 28), exporter="dynamo")
    assert list(tmp_path.iterdir()) == []
    after = conversion.module.state_dict(keep_vars=True)  # the weights are back in their modules
    assert list(after) == list(before) and all(after[name] is tensor for name, tensor in before.items())


def test_an_unknown_exporter_is_bad_input(tmp_path):
    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    with pytest.raises(BadInputError, match="'jit' is not one of auto, dynamo, torchscript"):
        fcconv.export_onnx(conversion.module, tmp_path / "out.onnx", (1, 28, 28), exporter="jit")


EXPORT_LENET = """
import sys
sys.path[:0] = [sys.argv[2]]
import torch
from custom_models import LeNet
import fcconv
torch.manual_seed(0)
fcconv.export_onnx(fcconv.rewrite(LeNet().eval(), (1, 28, 28)).module, sys.argv[1], (1, 28, 28))
"""


def test_the_export_is_byte_identical_in_another_process(tmp_path):
    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    here = fcconv.export_onnx(conversion.module, tmp_path / "here.onnx", (1, 28, 28))
    again = fcconv.export_onnx(conversion.module, tmp_path / "again.onnx", (1, 28, 28))
    there = tmp_path / "there.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", EXPORT_LENET, str(there), str(TESTS)], check=True, env=env, timeout=600)
    assert here.read_bytes() == again.read_bytes() == there.read_bytes()
    assert metadata(here)["fcconv.onnx_exporter"] == "dynamo"


def convert(*args):
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "lenet.pt"
    torch.save(seeded(LeNet).state_dict(), path)
    return path


LENET = ["--arch", "custom_models:LeNet", "--input-shape", "1,28,28"]


def test_convert_takes_the_exporter_by_name(lenet_checkpoint, tmp_path):
    code, out, err = convert(lenet_checkpoint, *LENET, "--onnx-exporter", "torchscript", "-o", tmp_path / "ts.onnx")
    assert code == 0, err
    assert metadata(tmp_path / "ts.onnx")["fcconv.onnx_exporter"] == "torchscript"
    code, out, err = convert(lenet_checkpoint, *LENET, "-o", tmp_path / "default.onnx")
    assert code == 0, err
    assert metadata(tmp_path / "default.onnx")["fcconv.onnx_exporter"] == "dynamo"
    assert "warning" not in err


def test_convert_says_on_stderr_when_it_fell_back_to_the_torchscript_exporter(lenet_checkpoint, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("the exporter cannot translate this graph")

    monkeypatch.setattr(export, "_dynamo_graph", fails)
    code, _, err = convert(lenet_checkpoint, *LENET, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert err.startswith("fcconv: warning: the torch.export-based ONNX exporter failed (RuntimeError: the exporter")
    assert "exported with the TorchScript exporter" in err
    meta = metadata(tmp_path / "out.onnx")
    assert meta["fcconv.onnx_exporter"] == "torchscript"
    assert meta["fcconv.onnx_exporter_fallback"] == "RuntimeError: the exporter cannot translate this graph"
    code, _, err = convert(lenet_checkpoint, *LENET, "--onnx-exporter", "dynamo", "-o", tmp_path / "dynamo.onnx")
    assert code == 3 and not (tmp_path / "dynamo.onnx").exists()
    assert err.strip() == (
        "fcconv: error: the torch.export-based ONNX exporter cannot export this model (RuntimeError: the exporter "
        "cannot translate this graph); --onnx-exporter auto falls back to the TorchScript exporter"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--onnx-exporter", "jit"], "--onnx-exporter 'jit' is not one of auto, dynamo, torchscript"),
        (["--onnx-exporter", "torchscript", "-o", "lenet.pt2"], "--onnx-exporter applies to ONNX output"),
    ],
)
def test_an_exporter_that_cannot_be_used_is_refused_in_one_line(lenet_checkpoint, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = convert(lenet_checkpoint, *LENET, *args)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"fcconv: error: {message}")
    assert list(tmp_path.iterdir()) == []


SWIN = "tiny_swin"
FAMILIES = {
    # name: (model, native input shape): each exported by the torch.export-based exporter, with no fallback
    "signal (1D max poolings)": (SignalClassifier, (1, 1000)),
    "volume (3D)": (VolumeClassifier, (1, 64, 64, 64)),
    "convnext (channels-last blocks)": (small_convnext, (3, 64, 64)),
    "swin (shifted windows)": (SWIN, (3, 56, 56)),
    "senet (linear gates)": (SENet, (3, 32, 32)),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_torch_export_based_exporter_writes_every_family_without_falling_back(name, tmp_path):
    factory, shape = FAMILIES[name]
    if factory == SWIN:  # swin_t's blocks and 7×7 windows in two stages: the second stage shifts only above 56×56
        factory = lambda: SwinTransformer([4, 4], 16, [2, 2], [1, 2], [7, 7], num_classes=4)  # noqa: E731
    model = seeded(factory)
    conversion = fcconv.rewrite(model, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FcconvWarning)
        path = fcconv.export_onnx(conversion.module, tmp_path / "model.onnx", shape)
    assert metadata(path)["fcconv.onnx_exporter"] == "dynamo"
    larger = tuple(n + n // 2 + 3 for n in shape[1:])
    report = fcconv.verify(model, path, shape, sizes=[shape[1:], larger], conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
