"""Loading the checkpoints people have: wrapped state_dicts, safetensors, exported programs, detected architectures, dtypes."""

import io
import zipfile

import pytest
import torch
import torchvision
from conftest import seeded
from safetensors.torch import save_file
from torch import nn

import fcconv
from fcconv import BadInputError
from fcconv import load as load_module
from fcconv.load import detect_architecture, load_model


@pytest.fixture(scope="module")
def resnet18():
    return seeded(torchvision.models.resnet18, weights=None, num_classes=7)


def same_weights(loaded, model):
    expected = model.state_dict()
    actual = loaded.module.state_dict()
    return set(actual) == set(expected) and all(torch.equal(actual[k].float(), expected[k].float()) for k in expected)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
        lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer_state_dict": {}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "state_dict", "model+optimizer", "model_state_dict+DataParallel", "torch.compile"],
)
def test_wrapped_state_dicts_load_with_the_architecture_detected(tmp_path, resnet18, wrap):
    path = tmp_path / "weights.bin"
    torch.save(wrap(resnet18.state_dict()), path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.detected) == ("resnet18", True)
    assert loaded.module.fc.out_features == 7
    assert same_weights(loaded, resnet18)


def test_a_safetensors_file_loads_with_or_without_arch(tmp_path, resnet18):
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet18.state_dict(), path)
    assert same_weights(load_model(path), resnet18)
    assert load_model(path, "resnet18").detected is False
    renamed = tmp_path / "resnet18.bin"  # recognised by its header, whatever its suffix
    renamed.write_bytes(path.read_bytes())
    assert same_weights(load_model(renamed), resnet18)


def test_a_state_dict_that_fits_no_torchvision_model_names_the_closest_and_where_it_differs(tmp_path, resnet18):
    state = resnet18.state_dict()
    state["layer4.1.conv2.weight"] = state["layer4.1.conv2.weight"][:, :256]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(BadInputError, match=r"fits no torchvision classifier; closest is resnet18: layer4\.1\.conv2"):
        load_model(tmp_path / "odd.pt")


def test_a_state_dict_that_fits_several_architectures_asks_for_arch(monkeypatch, resnet18):
    table = load_module.torchvision_signatures()
    monkeypatch.setattr(load_module, "torchvision_signatures", lambda: {**table, "resnet18_copy": table["resnet18"]})
    with pytest.raises(BadInputError, match=r"fits several torchvision models \(resnet18, resnet18_copy\).*--arch"):
        detect_architecture(resnet18.state_dict(), "resnet18.pt")


def test_the_native_input_size_comes_from_torchvision_weights(tmp_path):
    model = seeded(torchvision.models.inception_v3, weights=None, aux_logits=False, init_weights=False)
    torch.save(model.state_dict(), tmp_path / "inception.pt")
    assert load_model(tmp_path / "inception.pt").input_shape == (3, 299, 299)
    # the smallest crop: vit_h_14's 518×518 weights belong to a model with a larger position embedding
    assert load_module.native_input_shape("vit_h_14") == (3, 224, 224)
    assert load_module.native_input_shape("custom_models:LeNet") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_checkpoints_keep_their_dtype_unless_asked(tmp_path, resnet18, dtype):
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet18.state_dict().items()},
               tmp_path / "half.pt")  # fmt: skip
    assert load_model(tmp_path / "half.pt").dtype == dtype
    assert load_model(tmp_path / "half.pt", dtype="float32").dtype == torch.float32
    with pytest.raises(BadInputError, match="--dtype"):
        load_model(tmp_path / "half.pt", dtype="int8")


def test_integer_tensors_are_not_weights(tmp_path, resnet18):
    torch.save({k: v.long() for k, v in resnet18.state_dict().items()}, tmp_path / "ints.pt")
    with pytest.raises(BadInputError, match="no floating-point weights"):
        load_model(tmp_path / "ints.pt", "resnet18")


class ViewBatchNormSoftmax(nn.Module):
    """A head spelt the way export records it: view with the batch size, BatchNorm1d, GELU, softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        return torch.softmax(self.out(nn.functional.gelu(self.bn(self.fc(x)))), dim=1)


def save_exported(path, model, example, dynamic_shapes=None):
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes), path)
    return path


@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_an_exported_program_converts_without_arch_and_matches_the_module_it_came_from(tmp_path, batch):
    model = seeded(ViewBatchNormSoftmax)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    dynamic = ({0: torch.export.Dim("batch")},) if batch == "dynamic" else None
    path = save_exported(tmp_path / "model.pt2", model, torch.randn(2, 1, 8, 10), dynamic)
    loaded = load_model(path)
    assert loaded.input_shape == (1, 8, 10)
    conversion = fcconv.rewrite(loaded.module, loaded.input_shape)
    assert [(layer.name, layer.kernel) for layer in conversion.layers] == [("fc", (6, 8)), ("out", (1, 1))]
    # checked against the nn.Module the program was exported from, not against the program
    report = fcconv.verify(model, conversion.module, (1, 8, 10), conversion=fcconv.analyze(model, (1, 8, 10)))
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    assert report.checks[-1].output_shape[2:] == (16 - 8 + 1, 20 - 10 + 1)  # at twice the native size


def test_an_exported_program_holding_a_pickled_object_is_refused_and_nothing_runs(tmp_path):
    from test_cli import Hostile, run

    valid = save_exported(tmp_path / "valid.pt2", seeded(ViewBatchNormSoftmax), torch.randn(2, 1, 8, 10))
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Hostile(marker), payload)
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(valid) as source, zipfile.ZipFile(hostile, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, payload.getvalue() if "sample_inputs" in item.filename else data)
    result = run("inspect", hostile)
    assert result.returncode == 2 and not marker.exists()
    assert "sample_inputs" in result.stderr and "--trust" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
