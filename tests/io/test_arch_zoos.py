"""Architectures named in a model zoo: ``--arch timm:NAME`` and ``--arch hf:CLASS`` (built from config.json)."""

import argparse
import json
import sys

import onnx
import pytest
import timm
import torch
import transformers
from conftest import seeded
from typer.testing import CliRunner

import fcconv
from fcconv.cli import app
from fcconv.errors import BadInputError
from fcconv.load import load_model
from fcconv.outputs import output_names

TIMM_NAME = "resnet10t"  # small, and its native size (176) is not the default one
SHAPE = (3, 64, 64)
SIZES = [(64, 64), (81, 73)]


def converts_and_verifies(model, loaded, shape=SHAPE):
    """``loaded`` computes what ``model`` does, and its conversion matches it at two sizes; returns the conversion."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(logits(loaded.module(x)), logits(model(x)))
    conversion = fcconv.rewrite(loaded.module, shape)
    report = fcconv.verify(loaded.module, conversion.module, shape, sizes=SIZES, conversion=conversion)
    assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]
    return conversion


def logits(out):
    """A classifier's scores: a Hugging Face model returns them in a ModelOutput."""
    return out.logits if isinstance(out, transformers.utils.ModelOutput) else out


def convert(*args):
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    model = seeded(timm.create_model, TIMM_NAME, pretrained=False, num_classes=7)
    path = tmp_path_factory.mktemp("timm") / "weights.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    config = transformers.ResNetConfig(num_labels=5, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = seeded(transformers.ResNetForImageClassification, config)
    folder = tmp_path_factory.mktemp("hf") / "resnet"
    model.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    return model, folder


def test_a_timm_state_dict_named_timm_colon_name_is_built_with_its_class_count_and_converts(timm_checkpoint):
    model, path = timm_checkpoint

    loaded = load_model(path, arch=f"timm:{TIMM_NAME}", input_shape=SHAPE)

    assert (loaded.arch, loaded.input_shape, loaded.module.num_classes) == (f"timm:{TIMM_NAME}", SHAPE, 7)
    converts_and_verifies(model, loaded)


def test_a_checkpoint_of_timms_training_script_names_its_model_and_needs_no_arch(timm_checkpoint, tmp_path):
    model, _ = timm_checkpoint
    path = tmp_path / "checkpoint-9.pth.tar"
    args = argparse.Namespace(model=TIMM_NAME, lr=0.1, input_size=None, mean=(0.5, 0.5, 0.5))
    torch.save({"epoch": 9, "arch": TIMM_NAME, "state_dict": model.state_dict(), "args": args, "version": 2}, path)

    loaded = load_model(path, input_shape=SHAPE)

    assert (loaded.arch, loaded.module.num_classes) == (f"timm:{TIMM_NAME}", 7)
    converts_and_verifies(model, loaded)


def test_an_arch_key_that_names_no_timm_model_is_not_read_as_one(timm_checkpoint, tmp_path):
    model, _ = timm_checkpoint
    path = tmp_path / "checkpoint.pt"
    torch.save({"arch": "no_such_model", "state_dict": model.state_dict()}, path)
    with pytest.raises(BadInputError, match="fits no torchvision classifier"):
        load_model(path, input_shape=SHAPE)


def test_a_timm_model_card_needs_no_trust_and_gives_timms_native_input_size(timm_checkpoint, tmp_path):
    model, path = timm_checkpoint
    (tmp_path / "weights.pt").write_bytes(path.read_bytes())
    (tmp_path / "weights.json").write_text(json.dumps({"arch": f"timm:{TIMM_NAME}"}))

    loaded = load_model(tmp_path / "weights.pt")

    assert loaded.arch == f"timm:{TIMM_NAME}"
    assert loaded.input_shape == tuple(model.pretrained_cfg["input_size"]) == (3, 176, 176)


def test_the_cli_converts_a_timm_state_dict_named_timm_colon_name(timm_checkpoint, tmp_path):
    _, path = timm_checkpoint
    target = tmp_path / "weights.fcn.onnx"

    code, errors = convert(path, "--arch", f"timm:{TIMM_NAME}", "--input-shape", "3,64,64", "-o", target)

    assert code == 0, errors
    assert target.is_file()


def test_an_unknown_timm_name_is_one_line_exit_2_naming_close_matches(timm_checkpoint, tmp_path):
    _, path = timm_checkpoint

    code, errors = convert(path, "--arch", "timm:resnet10x", "-o", tmp_path / "out.onnx")

    assert code == 2 and len(errors) == 1, errors
    assert "timm:resnet10x" in errors[0] and "close: resnet10t" in errors[0]
    assert not list(tmp_path.iterdir())


def test_a_zoo_that_is_not_installed_is_one_line_exit_2(timm_checkpoint, monkeypatch):
    _, path = timm_checkpoint
    monkeypatch.setitem(sys.modules, "timm", None)  # importing it raises ModuleNotFoundError

    code, errors = convert(path, "--arch", f"timm:{TIMM_NAME}")

    assert code == 2 and len(errors) == 1, errors
    assert "needs the timm package" in errors[0]
    with pytest.raises(BadInputError, match="needs the timm package"):
        load_model(path, arch=f"timm:{TIMM_NAME}")


def test_a_hugging_face_classifier_is_built_from_the_config_json_beside_its_weights_and_outputs_logits(hf_folder):
    model, folder = hf_folder

    loaded = load_model(folder / "model.safetensors", arch="hf:ResNetForImageClassification", input_shape=SHAPE)

    assert type(loaded.module) is transformers.ResNetForImageClassification
    conversion = converts_and_verifies(model, loaded)
    with torch.no_grad():
        assert output_names(conversion.module(torch.zeros(1, *SHAPE))) == ["logits"]


@pytest.mark.parametrize("arch", [["--arch", "hf:ResNetForImageClassification"], []], ids=["named", "from config"])
def test_the_cli_converts_a_hugging_face_folder_to_onnx_with_its_output_named_logits(hf_folder, tmp_path, arch):
    _, folder = hf_folder
    target = tmp_path / "resnet.fcn.onnx"

    code, errors = convert(folder / "model.safetensors", *arch, "--input-shape", "3,64,64", "-o", target)

    assert code == 0, errors
    assert [output.name for output in onnx.load(target).graph.output] == ["logits"]


def test_a_hugging_face_config_gives_the_native_input_size_and_must_describe_the_named_class(tmp_path):
    config = transformers.MobileNetV2Config(num_labels=5, depth_multiplier=0.35, image_size=48, tf_padding=False)
    seeded(transformers.MobileNetV2ForImageClassification, config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"

    assert load_model(weights, arch="hf:MobileNetV2ForImageClassification").input_shape == (3, 48, 48)
    with pytest.raises(BadInputError, match="configures a mobilenet_v2 model, not the resnet model"):
        load_model(weights, arch="hf:ResNetForImageClassification")
