"""The command line: convert, verify, inspect, and how each treats bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import REPO, TESTS, seeded
from onnx import numpy_helper

FCCONV = [sys.executable, "-m", "fcconv"]


def run(*args, cwd=None):
    return subprocess.run([*FCCONV, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vgg16_checkpoint(tmp_path_factory, vgg16):
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pt"
    torch.save(vgg16.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted_vgg16(vgg16_checkpoint):
    before = digest(vgg16_checkpoint)
    result = run("convert", vgg16_checkpoint, "--arch", "vgg16")
    return vgg16_checkpoint, result, before


def test_convert_vgg16_writes_a_verified_onnx_beside_the_checkpoint(converted_vgg16):
    checkpoint, result, before = converted_vgg16
    assert result.returncode == 0, result.stderr
    out = checkpoint.with_name("vgg16.fcn.onnx")
    assert out.is_file()
    for text in ("classifier.0", "Linear(25088 → 4096)", "Conv2d(512 → 4096)", "7×7", "102,764,544", "ok"):
        assert text in result.stdout
    assert "FAIL" not in result.stdout
    assert digest(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["vgg16.fcn.onnx", "vgg16.pt"]


def test_verify_accepts_the_export_and_rejects_a_tampered_one(converted_vgg16, tmp_path):
    checkpoint, _, _ = converted_vgg16
    exported = checkpoint.with_name("vgg16.fcn.onnx")
    ok = run("verify", exported, "--reference", checkpoint, "--arch", "vgg16", "--sizes", "224x224,256x320")
    assert ok.returncode == 0, ok.stderr
    assert "max abs" in ok.stdout and "256×320" in ok.stdout

    model = onnx.load(str(exported))
    weight = next(t for t in model.graph.initializer if tuple(t.dims) == (10, 4096, 1, 1))
    values = numpy_helper.to_array(weight).copy()
    values[3, 100, 0, 0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    bad = run("verify", tampered, "--reference", checkpoint, "--arch", "vgg16", "--sizes", "224x224")
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "does not match" in bad.stderr


def test_inspect_shows_each_linear_its_map_and_share(vgg16_checkpoint):
    result = run("inspect", vgg16_checkpoint, "--arch", "vgg16")
    assert result.returncode == 0, result.stderr
    for text in ("classifier.0", "512×7×7", "classifier.3", "4096×1×1", "76.5%", "89.0%"):
        assert text in result.stdout


def test_the_shipped_sample_converts_by_path_alone_and_byte_identically_twice(tmp_path):
    first, second = tmp_path / "digits.onnx", tmp_path / "again.onnx"
    for out in (first, second):
        result = run("convert", REPO / "sample_models" / "digits_lenet.pt", "-o", out)
        assert result.returncode == 0, result.stderr
        assert out.is_file() and "fc1" in result.stdout
    assert first.read_bytes() == second.read_bytes()


def test_external_data_is_written_beside_the_export_and_verify_reads_it_back(tmp_path):
    sample = REPO / "sample_models" / "digits_lenet.pt"
    out = tmp_path / "digits.onnx"
    result = run("convert", sample, "-o", out, "--external-data")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx", "digits.onnx.data"]
    assert "weights in digits.onnx.data" in result.stdout
    checked = run("verify", out, "--reference", sample)
    assert checked.returncode == 0, checked.stderr
    (tmp_path / "digits.onnx.data").unlink()
    missing = run("verify", out, "--reference", sample)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_a_custom_architecture_is_imported_from_the_current_directory(tmp_path):
    checkpoint = tmp_path / "lenet.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in seeded(__import__("custom_models").LeNet).state_dict().items()}},
        checkpoint,
    )
    result = run("convert", checkpoint, "--arch", "custom_models:LeNet", "--input-shape", "1,28,28", cwd=TESTS)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lenet.fcn.onnx").is_file()


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": Hostile(marker)}, checkpoint)
    result = run("inspect", checkpoint, "--arch", "vgg16")
    assert result.returncode == 2
    assert not marker.exists()
    assert "--trust" in result.stderr and "Traceback" not in result.stderr


def test_a_whole_pickled_module_loads_only_with_trust(tmp_path, lenet):
    checkpoint = tmp_path / "whole.pt"
    torch.save(lenet, checkpoint)
    refused = run("inspect", checkpoint, "--input-shape", "1,28,28", cwd=TESTS)
    assert refused.returncode == 2 and "custom_models.LeNet" in refused.stderr
    trusted = run("inspect", checkpoint, "--input-shape", "1,28,28", "--trust", cwd=TESTS)
    assert trusted.returncode == 0, trusted.stderr
    assert "fc1" in trusted.stdout


def bad_inputs(tmp_path, lenet):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "a_dir").mkdir()
    wrong = {k: v for k, v in lenet.state_dict().items() if k != "fc2.bias"}
    torch.save(wrong, tmp_path / "missing.pt")
    torch.save(lenet.state_dict(), tmp_path / "lenet.pt")
    with open(tmp_path / "text.pt", "w") as f:
        f.write("not a model\n")
    return {
        "missing path": (["convert", tmp_path / "nope.pt", "--arch", "vgg16"], "no such file"),
        "empty file": (["convert", tmp_path / "empty.pt", "--arch", "vgg16"], "empty"),
        "random bytes": (["convert", tmp_path / "random.pt", "--arch", "vgg16"], "not a PyTorch checkpoint"),
        "text file": (["convert", tmp_path / "text.pt", "--arch", "vgg16"], "not a PyTorch checkpoint"),
        "directory": (["convert", tmp_path / "a_dir", "--arch", "vgg16"], "directory"),
        "state_dict that does not fit": (["convert", tmp_path / "lenet.pt", "--arch", "vgg16"], "does not fit vgg16"),
        "missing tensor": (["convert", tmp_path / "missing.pt", "--arch", "custom_models:LeNet", "--input-shape", "1,28,28"], "fc2.bias"),
        "input shape the model cannot take": (
            ["convert", tmp_path / "lenet.pt", "--arch", "custom_models:LeNet", "--input-shape", "1,8,8"], "cannot take an input"),
        "malformed input shape": (["convert", tmp_path / "lenet.pt", "--arch", "custom_models:LeNet", "--input-shape", "a,b"], "input-shape"),
        "no arch for a state_dict": (["convert", tmp_path / "lenet.pt"], "--arch"),
        "malformed sizes": (["convert", tmp_path / "lenet.pt", "--sizes", "28xa"], "--sizes"),
        "unknown head format": (["convert", tmp_path / "lenet.pt", "--head-format", "dense"], "--head-format"),
        "unknown arch": (["convert", tmp_path / "lenet.pt", "--arch", "vgg17"], "vgg17"),
    }  # fmt: skip


def test_bad_input_gets_one_line_exit_2_and_no_output(tmp_path, lenet, monkeypatch):
    from typer.testing import CliRunner

    from fcconv.cli import app

    monkeypatch.chdir(TESTS)
    runner = CliRunner()
    for case, (args, expected) in bad_inputs(tmp_path, lenet).items():
        before = {p.name: (digest(p) if p.is_file() else None) for p in tmp_path.iterdir()}
        result = runner.invoke(app, [str(a) for a in args])
        result.returncode = result.exit_code
        assert result.returncode == 2, (case, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (case, result.stderr)
        assert "Traceback" not in result.stderr
        after = {p.name: (digest(p) if p.is_file() else None) for p in tmp_path.iterdir()}
        assert after == before, case


@pytest.mark.parametrize("output", ["lenet.fcn.onnx", "lenet.fcn.pt2", "lenet.fcn.safetensors"])
def test_convert_frees_the_pytorch_weights_before_the_written_file_is_verified(tmp_path, lenet, monkeypatch, output):
    """Peak memory: the file read back holds its own copy of the weights, so the PyTorch ones must be gone by then."""
    import weakref

    from typer.testing import CliRunner

    import fcconv.load
    from fcconv.cli import app

    verify_module = sys.modules["fcconv.verify"]  # the package's `verify` attribute is the function

    torch.save(lenet.state_dict(), tmp_path / "lenet.pt")
    loaded_models, alive_at_comparison = [], []
    real_load, real_compare = fcconv.load.load_model, verify_module.compare_outputs

    def load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded_models.append(weakref.ref(loaded.module))
        return loaded

    def compare(*args, **kwargs):
        alive_at_comparison.extend(ref() is not None for ref in loaded_models)
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(fcconv.load, "load_model", load)
    monkeypatch.setattr(verify_module, "compare_outputs", compare)
    monkeypatch.chdir(TESTS)
    args = ["convert", str(tmp_path / "lenet.pt"), "--arch", "custom_models:LeNet", "--input-shape", "1,28,28"]
    args += ["-o", str(tmp_path / output)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert alive_at_comparison == [False]
    assert (tmp_path / output).is_file()

    loaded_models.clear()
    args = [
        "verify",
        str(tmp_path / output),
        "--reference",
        str(tmp_path / "lenet.pt"),
        "--arch",
        "custom_models:LeNet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert alive_at_comparison == [False, False]  # verify, too, compares without the original in memory


def test_debug_shows_the_traceback(tmp_path):
    result = run("convert", tmp_path / "nope.pt", "--arch", "vgg16", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_model_that_cannot_be_made_fully_convolutional_exits_3(tmp_path):
    from custom_models import NormalizesTheWindow

    checkpoint = tmp_path / "norm.pt"
    torch.save(seeded(NormalizesTheWindow).state_dict(), checkpoint)
    result = run(
        "convert", checkpoint, "--arch", "custom_models:NormalizesTheWindow", "--input-shape", "1,8,8", cwd=TESTS
    )
    assert result.returncode == 3
    assert "norm (LayerNorm)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norm.pt"]


@pytest.mark.parametrize(
    "dtype,tolerance,note",
    [
        (torch.float16, "Verification (rtol 0.005, atol 0, float16)", None),
        (torch.bfloat16, "Verification (rtol 0.0001, atol 0, float32)", "converting in float32"),
    ],
)
def test_reduced_precision_checkpoints_convert_and_say_which_tolerance_was_used(tmp_path, dtype, tolerance, note):
    sample = REPO / "sample_models"
    shutil.copy(sample / "digits_lenet.json", tmp_path / "digits_lenet.json")
    state = torch.load(sample / "digits_lenet.pt", weights_only=True)
    torch.save({k: v.to(dtype) for k, v in state.items()}, tmp_path / "digits_lenet.pt")
    result = run("convert", tmp_path / "digits_lenet.pt")
    assert result.returncode == 0, result.stderr
    assert tolerance in result.stdout
    assert note is None or note in result.stdout
    initializers = onnx.load(str(tmp_path / "digits_lenet.fcn.onnx")).graph.initializer
    expected = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT
    assert {t.data_type for t in initializers} == {expected}
    forced = run("convert", tmp_path / "digits_lenet.pt", "--dtype", "float32", "-o", tmp_path / "f32.onnx")
    assert forced.returncode == 0 and "Verification (rtol 0.0001, atol 0, float32)" in forced.stdout


def float64_sample(folder):
    """The shipped LeNet sample saved in float64, with its model card beside it."""
    sample = REPO / "sample_models"
    shutil.copy(sample / "digits_lenet.json", folder / "digits_lenet.json")
    state = torch.load(sample / "digits_lenet.pt", weights_only=True)
    torch.save({k: v.to(torch.float64) for k, v in state.items()}, folder / "digits_lenet.pt")
    return folder / "digits_lenet.pt"


def test_a_float64_checkpoint_becomes_a_float64_onnx_verified_and_checked_in_float64(tmp_path):
    checkpoint = float64_sample(tmp_path)
    result = run("convert", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "Verification (rtol 1e-08, atol 0, float64, run in onnx's reference evaluator)" in result.stdout
    exported = tmp_path / "digits_lenet.fcn.onnx"
    assert f".{exported.name}." not in result.stdout + result.stderr  # the staging folder is never named
    model = onnx.load(str(exported))
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.DOUBLE}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    verified = run("verify", exported, "--reference", checkpoint)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checked = run("check", exported)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "output finite, run in onnx's reference evaluator" in checked.stdout


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".safetensors"])
def test_dtype_float64_writes_every_format_verified_and_checked_in_float64(tmp_path, suffix):
    sample = REPO / "sample_models" / "digits_lenet.pt"
    target = tmp_path / f"lenet64{suffix}"
    result = run("convert", sample, "--dtype", "float64", "-o", target)
    assert result.returncode == 0, result.stderr
    assert "Verification (rtol 1e-08, atol 0, float64" in result.stdout
    assert f".{target.name}." not in result.stdout + result.stderr
    reference = ["--reference", sample] if suffix == ".safetensors" else []  # a state_dict runs in its module
    checked = run("check", target, *reference, "--json", tmp_path / "check.json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checks = json.loads((tmp_path / "check.json").read_text())["models"][0]["checks"]
    assert [c["verdict"] for c in checks if c["check"] == "reference output"] == ["pass"]


def fail_reading_back(path, *args, **kwargs):
    raise RuntimeError(f"cannot read {path}")


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".safetensors"])
def test_a_failure_while_the_output_is_staged_names_the_output_never_the_staging_folder(tmp_path, monkeypatch, suffix):
    import onnxruntime
    import safetensors.torch
    from typer.testing import CliRunner

    from fcconv.cli import app

    for reader in (onnxruntime, "InferenceSession"), (torch.export, "load"), (safetensors.torch, "load_file"):
        monkeypatch.setattr(*reader, fail_reading_back)
    target = tmp_path / f"lenet{suffix}"
    result = CliRunner().invoke(app, ["convert", str(REPO / "sample_models" / "digits_lenet.pt"), "-o", str(target)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith(f"fcconv: error: {target} ") and f"cannot read {target}" in line, line
    assert f".{target.name}." not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_checkpoint_gets_one_line_naming_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fcconv.cli import app

    locked = tmp_path / "locked.pt"
    torch.save({"w": torch.zeros(1)}, locked)
    access = os.access  # root reads every file, so the permission check is what is exercised here
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else access(p, mode, **kw))
    result = CliRunner().invoke(app, ["inspect", str(locked), "--arch", "vgg16"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"fcconv: error: {locked}: permission denied"


def test_quiet_leaves_only_the_result_line_and_the_exit_code(tmp_path):
    sample = REPO / "sample_models" / "digits_lenet.pt"
    out = tmp_path / "lenet.onnx"
    converted = run("convert", sample, "-o", out, "--quiet")
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == f"wrote {out}\n" and converted.stderr == ""
    verified = run("verify", out, "--reference", sample, "-q")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == f"{out} matches {sample}\n"
    checked = run("check", out, "-q")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{out} passed\n"
    loud = run("verify", out, "--reference", sample)
    assert "max abs" in loud.stdout and loud.stdout.endswith(f"{out} matches {sample}\n")


def test_long_steps_show_progress_bars_on_a_terminal(tmp_path):
    sample = REPO / "sample_models" / "digits_lenet.pt"
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "120"}
    args = [*FCCONV, "convert", str(sample), "-o", str(tmp_path / "lenet.onnx")]
    shown = subprocess.run(args, capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    bars = ("Reading digits_lenet.pt", "85.7/85.7 kB", "Exporting lenet.onnx", "82.1/82.1 kB",
            "Running the original at 56×56", "Verifying at 56×56", "3/3")  # fmt: skip
    for bar in bars:
        assert bar in shown.stdout, bar
    plain = subprocess.run(args, capture_output=True, text=True)  # not a terminal: no bars, no blank lines
    assert plain.returncode == 0, plain.stderr
    assert "Exporting" not in plain.stdout and "\n\n" not in plain.stdout
    quiet = subprocess.run([*args, "--quiet"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "Exporting" not in quiet.stdout and "━" not in quiet.stdout
