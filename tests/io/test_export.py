"""Exported ONNX: valid, with free batch and spatial axes, and equal to the PyTorch model."""

import onnx
import pytest
import torch
import torchvision
from conftest import seeded

import fcconv
from fcconv import export
from fcconv.runtime import OnnxRunner


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    out = {}
    for name, factory, shape in [
        ("lenet", lambda: __import__("custom_models").LeNet(), (1, 28, 28)),
        ("resnet18", lambda: torchvision.models.resnet18(weights=None, num_classes=4), (3, 224, 224)),
    ]:
        model = seeded(factory)
        conversion = fcconv.rewrite(model, shape)
        path = tmp_path_factory.mktemp(name) / f"{name}.fcn.onnx"
        fcconv.export_onnx(conversion.module, path, shape)
        out[name] = (model, conversion, path, shape)
    return out


@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_the_export_passes_the_checker_with_full_shape_inference(exported, name):
    path = exported[name][2]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_batch_and_spatial_axes_are_named_and_free(exported, name):
    model = onnx.load(str(exported[name][2]))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == ["height", "width"]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert not isinstance(out_dims[2], int) and not isinstance(out_dims[3], int)


def test_the_head_is_exported_as_convolutions_with_nothing_that_collapses_the_map(exported):
    ops = {node.op_type for node in onnx.load(str(exported["lenet"][2])).graph.node}
    assert "Conv" in ops
    assert not ops & {"Flatten", "Reshape", "Gemm", "MatMul"}


@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_onnxruntime_matches_pytorch_at_three_sizes_one_non_square(exported, name):
    _, conversion, path, shape = exported[name]
    native = shape[1:]
    runner = OnnxRunner(path)
    for size in [native, (native[0] + 13, native[1] + 40), (2 * native[0], 2 * native[1])]:
        x = torch.randn(2, shape[0], *size)
        with torch.no_grad():
            expected = conversion.module(x)
        actual = runner(x)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_the_export_carries_what_verify_needs(exported):
    meta = OnnxRunner(exported["lenet"][2]).metadata
    assert meta["fcconv.input_shape"] == "1,28,28"
    assert meta["fcconv.dense"] == "false" and meta["fcconv.window"] == "4,4"


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3)).numpy()

    target = tmp_path / "out.onnx"
    with pytest.raises(Exception):  # noqa: B017 - whatever the exporter raises, nothing may be left
        fcconv.export_onnx(Unexportable(), target, (1, 8, 8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape,factory", [((1, 28, 28), "lenet"), ((3, 448, 448), "vgg11")])
def test_the_gemm_head_format_is_the_same_function(tmp_path, shape, factory):
    model = seeded(__import__("custom_models").LeNet if factory == "lenet" else
                   (lambda: torchvision.models.vgg11(weights=None, num_classes=6)))  # fmt: skip
    conversion = fcconv.rewrite(model, shape)
    path = tmp_path / "gemm.onnx"
    fcconv.export_onnx(conversion.module, path, shape, head_format="gemm")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    native = shape[1:]
    sizes = [native, (native[0] + 64, native[1] + 96)] if factory == "vgg11" else None
    report = fcconv.verify(model, path, shape, sizes=sizes, conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    assert report.checks[-1].output_shape[2:] != (1, 1)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops and "Gemm" not in ops


@pytest.mark.parametrize("name", ["vgg11_bn", "alexnet"])
def test_torchvision_classifiers_export_and_verify_end_to_end(tmp_path, name):
    model = seeded(torchvision.models.get_model, name, weights=None, num_classes=12)
    conversion = fcconv.rewrite(model, (3, 224, 224))
    path = tmp_path / f"{name}.fcn.onnx"
    fcconv.export_onnx(conversion.module, path, (3, 224, 224))
    report = fcconv.verify(model, path, (3, 224, 224), sizes=[(224, 224), (257, 320)], conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    assert report.checks[-1].output_shape[2:] == ((257 - 224) // 32 + 1, (320 - 224) // 32 + 1)


def test_every_weight_is_written_exactly_as_the_module_holds_it(exported):
    _, conversion, path, _ = exported["resnet18"]
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    state = export.as_export_module(conversion.module).state_dict()
    assert written, "the export holds no weights"
    for name, array in written.items():
        assert torch.equal(torch.from_numpy(array.copy()), state[name]), name
    used = {name for node in onnx.load(str(path)).graph.node for name in node.input}
    assert set(written) <= used


def test_exporting_twice_gives_byte_identical_files(tmp_path):
    model = seeded(torchvision.models.vgg11_bn, weights=None, num_classes=5)
    conversion = fcconv.rewrite(model, (3, 64, 64))
    first, second = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    for path in (first, second):
        path.parent.mkdir()
        fcconv.export_onnx(conversion.module, path, (3, 64, 64), external_data=True)
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a" / "m.onnx.data").read_bytes() == (tmp_path / "b" / "m.onnx.data").read_bytes()


def test_external_data_puts_the_weights_beside_the_file_and_reads_back(tmp_path):
    model = seeded(__import__("custom_models").LeNet)
    conversion = fcconv.rewrite(model, (1, 28, 28))
    path = tmp_path / "lenet.fcn.onnx"
    fcconv.export_onnx(conversion.module, path, (1, 28, 28), external_data=True)
    data = tmp_path / "lenet.fcn.onnx.data"
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert data.stat().st_size >= weight_bytes > 10 * path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    report = fcconv.verify(model, path, (1, 28, 28), conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]


def test_moving_external_data_into_the_file_gives_the_single_file_export_byte_for_byte(tmp_path):
    model = seeded(torchvision.models.vgg11_bn, weights=None, num_classes=5)
    conversion = fcconv.rewrite(model, (3, 64, 64))
    single, moved = tmp_path / "single" / "m.onnx", tmp_path / "moved" / "m.onnx"
    for path in (single, moved):
        path.parent.mkdir()
    fcconv.export_onnx(conversion.module, single, (3, 64, 64))
    fcconv.export_onnx(conversion.module, moved, (3, 64, 64), external_data=True)
    assert export.inline_external_data(moved)
    assert not (tmp_path / "moved" / "m.onnx.data").exists()
    assert moved.read_bytes() == single.read_bytes()
    assert not export.inline_external_data(moved)  # nothing left to move


def test_external_data_stays_beside_the_file_when_moving_it_would_pass_the_protobuf_limit(tmp_path, monkeypatch):
    model = seeded(__import__("custom_models").LeNet)
    conversion = fcconv.rewrite(model, (1, 28, 28))
    path = tmp_path / "lenet.onnx"
    fcconv.export_onnx(conversion.module, path, (1, 28, 28), external_data=True)
    before = path.read_bytes(), (tmp_path / "lenet.onnx.data").read_bytes()
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", sum(p.numel() * 4 for p in model.parameters()) // 2)
    assert not export.inline_external_data(path)
    assert (path.read_bytes(), (tmp_path / "lenet.onnx.data").read_bytes()) == before


def test_external_data_is_chosen_when_the_file_would_pass_the_protobuf_limit(tmp_path, monkeypatch):
    model = seeded(__import__("custom_models").LeNet)
    conversion = fcconv.rewrite(model, (1, 28, 28))
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", weight_bytes * 2)
    fcconv.export_onnx(conversion.module, tmp_path / "small.onnx", (1, 28, 28))
    assert not (tmp_path / "small.onnx.data").exists()
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", weight_bytes // 2)
    fcconv.export_onnx(conversion.module, tmp_path / "large.onnx", (1, 28, 28))
    assert (tmp_path / "large.onnx.data").exists()
    x = torch.randn(1, 1, 40, 52)
    assert torch.equal(OnnxRunner(tmp_path / "small.onnx")(x), OnnxRunner(tmp_path / "large.onnx")(x))


def test_exporting_leaves_the_module_and_its_weights_untouched(tmp_path):
    model = seeded(torchvision.models.resnet18, weights=None, num_classes=4)
    conversion = fcconv.rewrite(model, (3, 64, 64))
    before = {k: v.clone() for k, v in conversion.module.state_dict().items()}
    fcconv.export_onnx(conversion.module, tmp_path / "resnet18.onnx", (3, 64, 64))
    after = conversion.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
