"""PyTorch out: ``convert -o NAME.pt2`` and ``-o NAME.safetensors``, and what verify and check make of them."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import REPO, seeded
from custom_models import LeNet, SignalClassifier, TinyVGG, VolumeClassifier
from torch import nn
from typer.testing import CliRunner

import fcconv
from fcconv.cli import app
from fcconv.report import SCHEMA_PATH
from fcconv.torch_export import (
    METADATA_MEMBER,
    ProgramModel,
    export_program,
    read_program_metadata,
    read_weights_metadata,
)

LENET = ["--arch", "custom_models:LeNet", "--input-shape", "1,28,28"]
TINY_VGG = ["--arch", "custom_models:TinyVGG"]
# What an ONNX export records about itself, and so must these files.
METADATA_KEYS = {
    "fcconv.version", "fcconv.input_shape", "fcconv.dense", "fcconv.pool", "fcconv.mode", "fcconv.window",
    "fcconv.stride", "fcconv.total_stride", "fcconv.receptive_field", "fcconv.num_classes", "fcconv.source_sha256",
    "fcconv.pointwise", "fcconv.probe_output", "fcconv.probe_shape", "fcconv.weights_sha256",
    "fcconv.initializer_sha256",
}  # fmt: skip


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("pytorch_out")


@pytest.fixture(scope="module")
def lenet_files(folder):
    """LeNet's checkpoint, and what convert writes from it: a program and a state_dict."""
    checkpoint = folder / "lenet.pt"
    torch.save(seeded(LeNet).state_dict(), checkpoint)
    for name in ("lenet.pt2", "lenet.safetensors"):
        code, _, err = invoke("convert", checkpoint, *LENET, "-o", folder / name, "-q")
        assert code == 0, err
    return checkpoint, folder / "lenet.pt2", folder / "lenet.safetensors"


@pytest.fixture(scope="module")
def tiny_vgg_files(folder):
    model = seeded(TinyVGG)
    checkpoint = folder / "tiny_vgg.pt"
    torch.save(model.state_dict(), checkpoint)
    for name in ("tiny_vgg.pt2", "tiny_vgg.safetensors"):
        code, _, err = invoke("convert", checkpoint, *TINY_VGG, "-o", folder / name, "-q")
        assert code == 0, err
    return model, folder / "tiny_vgg.pt2", folder / "tiny_vgg.safetensors"


def test_the_program_loads_with_torch_export_and_runs_at_a_larger_non_square_size(tiny_vgg_files):
    model, program_path, _ = tiny_vgg_files
    program = torch.export.load(program_path)
    fcn = fcconv.convert(seeded(TinyVGG), (3, 224, 224))
    for shape in ((1, 3, 224, 224), (3, 3, 300, 261)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), fcn(x), rtol=1e-5, atol=1e-6)
    assert program.module()(torch.randn(3, 3, 300, 261)).shape == (3, 10, 3, 2)
    bounds = sorted((int(r.lower), str(r.upper)) for r in program.range_constraints.values())
    assert bounds == [(1, "int_oo"), (224, "int_oo"), (224, "int_oo")]  # batch, height, width


def test_both_files_carry_the_metadata_an_onnx_export_does(tiny_vgg_files):
    _, program_path, weights_path = tiny_vgg_files
    for meta in (read_program_metadata(program_path), read_weights_metadata(weights_path)):
        assert METADATA_KEYS <= set(meta)
        assert meta["fcconv.input_shape"] == "3,224,224" and meta["fcconv.num_classes"] == "10"
        assert meta["fcconv.total_stride"] == "32,32" and meta["fcconv.receptive_field"] == "224,224"
    assert read_program_metadata(program_path)["fcconv.format"] == "pt2"
    assert read_weights_metadata(weights_path)["fcconv.format"] == "state_dict"


def test_the_safetensors_holds_the_first_layer_as_a_kernel_and_the_readme_recipe_rebuilds_it(tiny_vgg_files):
    model, _, weights_path = tiny_vgg_files
    state = safetensors.torch.load_file(weights_path)
    assert state["classifier.0.weight"].shape == (16, 8, 7, 7)
    assert state["classifier.2.weight"].shape == (10, 16, 1, 1)

    # The recipe of docs/pytorch-out.md, with TinyVGG for vgg16.
    fcn = fcconv.convert(TinyVGG(), (3, 224, 224))
    fcn.load_state_dict(safetensors.torch.load_file(weights_path))

    x = torch.randn(2, 3, 256, 300)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x), fcconv.convert(model, (3, 224, 224))(x))


@pytest.mark.parametrize("written", ["lenet.pt2", "lenet.safetensors"])
def test_verify_and_check_pass_on_what_convert_wrote(lenet_files, written, tmp_path):
    checkpoint, *_ = lenet_files
    path = checkpoint.with_name(written)
    code, out, err = invoke("verify", path, "--reference", checkpoint, *LENET, "--sizes", "28x28,37x45")
    assert code == 0, err
    assert f"{path} matches {checkpoint}" in out and "37×45" in out

    report = tmp_path / "check.json"
    code, out, err = invoke("check", path, "--json", report)
    assert code == 0, err
    document = json.loads(report.read_text())
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    verdicts = {(c["check"], c["verdict"]) for c in document["models"][0]["checks"]}
    if written.endswith(".pt2"):
        assert {("free spatial axes", "pass"), ("weights digest", "pass"), ("reference output", "pass")} <= verdicts
        assert {verdict for _, verdict in verdicts} == {"pass"}
    else:  # weights alone do not run: skipped, with the reason, never passed
        assert verdicts == {("weights digest", "pass"), ("free spatial axes", "skip"), ("runs", "skip"),
                            ("output size", "skip"), ("reference output", "skip")}  # fmt: skip
        assert "--reference" in out


def test_check_rebuilds_the_safetensors_from_the_reference_and_runs_it(lenet_files):
    checkpoint, _, weights_path = lenet_files
    code, out, err = invoke("check", weights_path, "--reference", checkpoint, *LENET, "--sizes", "28x28,40x33")
    assert code == 0, err
    assert "skipped" not in out and f"{weights_path} passed" in out


def tampered_program(source: Path, target: Path) -> Path:
    """``source`` saved again with one weight changed and its recorded metadata kept."""
    program = torch.export.load(source)
    program.state_dict["fc2.weight"].data[3, 7] += 1.0
    meta = json.dumps(read_program_metadata(source))
    torch.export.save(program, target, extra_files={METADATA_MEMBER: meta})
    return target


def tampered_weights(source: Path, target: Path) -> Path:
    state = safetensors.torch.load_file(source)
    state["fc2.weight"][3, 7] += 1.0
    safetensors.torch.save_file(state, target, metadata=read_weights_metadata(source))
    return target


@pytest.mark.parametrize("kind", ["pt2", "safetensors"])
def test_a_changed_weight_fails_verify_and_check(lenet_files, tmp_path, kind):
    checkpoint, program_path, weights_path = lenet_files
    if kind == "pt2":
        path = tampered_program(program_path, tmp_path / "tampered.pt2")
    else:
        path = tampered_weights(weights_path, tmp_path / "tampered.safetensors")

    code, out, err = invoke("verify", path, "--reference", checkpoint, *LENET, "--sizes", "28x28")
    assert code == 1
    assert "FAIL" in out and "does not match" in err

    code, out, err = invoke("check", path)
    assert code == 1
    assert "weights digest" in err and "'fc2.weight' changed since export" in out


def test_verify_of_weights_from_another_model_is_a_clear_mismatch(lenet_files, tiny_vgg_files):
    checkpoint, *_ = lenet_files
    _, _, weights_path = tiny_vgg_files
    code, _, err = invoke("verify", weights_path, "--reference", checkpoint, *LENET)
    assert code == 1
    assert "does not fit the converted module" in err and "does not match" in err


@pytest.mark.parametrize("name", ["x.pt2", "x.safetensors"])
def test_bad_output_paths_are_refused_before_any_work_with_nothing_written(lenet_files, tmp_path, name):
    checkpoint, *_ = lenet_files
    code, _, err = invoke("convert", checkpoint, *LENET, "-o", tmp_path / "missing" / name)
    assert code == 2 and "does not exist" in err
    code, _, err = invoke("convert", checkpoint, *LENET, "-o", tmp_path / name, "--head-format", "gemm")
    assert code == 2 and "--head-format" in err
    assert list(tmp_path.iterdir()) == []


def test_a_volume_classifier_converts_to_a_program_with_free_depth_height_and_width(tmp_path):
    """Its head's map is 1×1×1 at the native 64×64×64 and larger above it: every axis stays free, batch 1 included."""
    model = seeded(VolumeClassifier)
    checkpoint = tmp_path / "volume.pt"
    torch.save(model.state_dict(), checkpoint)
    arch = ["--arch", "custom_models:VolumeClassifier", "--input-shape", "1,64,64,64"]
    code, out, err = invoke("convert", checkpoint, *arch, "-o", tmp_path / "volume.pt2", "--sizes", "64x64x64,72x80x96")
    assert code == 0, err
    assert "72×80×96" in out and "FAIL" not in out
    written = ProgramModel(tmp_path / "volume.pt2")
    assert written.spatial_ranges() == [(64, None)] * 3
    fcn = fcconv.convert(model, (1, 64, 64, 64))
    for shape in ((1, 1, 64, 64, 64), (3, 1, 72, 80, 96)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = fcn(x)
        torch.testing.assert_close(written(x), expected, rtol=1e-4, atol=1e-6)
    assert expected.shape == (3, 3, 2, 3, 5)


class OddWidthsPadded(nn.Module):
    """A program form that pads an odd width in Python: a choice made from the size, which torch.export refuses."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return self.module(x)


def test_a_program_torch_export_cannot_make_is_refused_in_one_line_quoting_torch(tmp_path, monkeypatch):
    import fcconv.torch_export as torch_export

    checkpoint = tmp_path / "lenet.pt"
    torch.save(seeded(LeNet).state_dict(), checkpoint)
    program_form = torch_export.program_form
    monkeypatch.setattr(torch_export, "program_form", lambda converted: OddWidthsPadded(program_form(converted)))
    code, _, err = invoke("convert", checkpoint, *LENET, "-o", tmp_path / "lenet.pt2")
    assert code == 3
    assert len(err.strip().splitlines()) == 1, err  # torch's own account of the graph it had traced is not shown
    assert "cannot be exported as a program with free spatial axes: torch.export says" in err
    assert "Could not guard on data-dependent expression" in err and "Mod(" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.pt"]


def test_the_documented_recipe_rebuilds_vgg16_from_its_safetensors(tmp_path, monkeypatch):
    """The rebuild block of docs/pytorch-out.md, as written there, on a .safetensors of the 10-class VGG16 it names."""
    import torchvision

    from fcconv.torch_export import save_weights

    blocks = (REPO / "docs" / "pytorch-out.md").read_text().split("```python\n")[1:]
    (recipe,) = [block.split("```")[0] for block in blocks if "safetensors.torch.load_file" in block]
    torch.manual_seed(0)
    written = fcconv.convert(torchvision.models.vgg16(num_classes=10).eval(), (3, 224, 224))
    save_weights(written, tmp_path / "vgg16.fcn.safetensors", {})
    monkeypatch.chdir(tmp_path)

    scope = {}
    exec(recipe, scope)  # noqa: S102 - the documentation's own block

    fcn = scope["fcn"]
    assert fcn.get_submodule("classifier.0").weight.shape == (4096, 512, 7, 7)
    x = torch.randn(1, 3, 256, 224)
    with torch.no_grad():
        assert torch.equal(fcn.eval()(x), written(x))


def test_the_programs_module_takes_the_gradients_of_the_converted_module(tiny_vgg_files):
    model, program_path, _ = tiny_vgg_files
    program = torch.export.load(program_path).module()
    fcn = fcconv.convert(seeded(TinyVGG), (3, 224, 224))
    x = torch.randn(2, 3, 290, 260)
    grads = []
    for module in (program, fcn):
        loss = module(x).square().mean()
        params = [p for _, p in sorted(module.named_parameters())]
        grads.append(torch.autograd.grad(loss, params))
    assert len(grads[0]) == len(grads[1]) == 14
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["lenet.pt2", "lenet.safetensors"])
def test_a_file_that_does_not_match_the_original_is_not_written_and_exits_1(lenet_files, tmp_path, monkeypatch, name):
    """A fault injected between the converted module and the file: the verification of the staged file catches it."""
    import fcconv.torch_export as torch_export

    checkpoint, *_ = lenet_files
    program_form, save_weights = torch_export.program_form, torch_export.save_weights

    def off_by_one(module):
        module = copy.deepcopy(module)
        with torch.no_grad():
            module.get_submodule("fc2").bias[3] += 1.0
        return module

    monkeypatch.setattr(torch_export, "program_form", lambda converted: off_by_one(program_form(converted)))
    monkeypatch.setattr(torch_export, "save_weights", lambda converted, *a: save_weights(off_by_one(converted), *a))
    code, out, err = invoke("convert", checkpoint, *LENET, "-o", tmp_path / name, "--sizes", "28x28")
    assert code == 1
    assert "FAIL" in out and f"{tmp_path / name} was not written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["digits.pt2", "digits.safetensors"])
def test_converting_twice_in_separate_processes_writes_byte_identical_files(tmp_path, name):
    """Object addresses and hash seeds differ from one process to the next; the bytes written must not."""
    written = []
    for run in ("first", "second"):
        out = tmp_path / run / name  # the same file name: a .pt2 archive is named after its file
        out.parent.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "fcconv", "convert", REPO / "sample_models" / "digits_lenet.pt", "-o", out, "-q"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        written.append(out.read_bytes())
    assert written[0] == written[1]


def test_a_signal_classifier_exports_with_a_free_length():
    """A 1D max pooling fixes the length in torch.export; the program computes it as a 2D one."""
    model = seeded(SignalClassifier)
    fcn = fcconv.convert(model, (1, 1000))
    program = export_program(fcn, (1, 1000))
    assert sorted(int(r.lower) for r in program.range_constraints.values()) == [1, 1000]
    for length in (1000, 1333, 4096):
        x = torch.randn(2, 1, length)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), fcn(x), rtol=1e-5, atol=1e-6)
