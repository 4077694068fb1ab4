"""fcconv check, the metadata it reads, and the JSON and JUnit reports that CI reads from check and verify."""

import builtins
import hashlib
import io
import json
import mmap
import os
import shlex
import shutil
import stat
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import REPO, seeded
from onnx import numpy_helper
from typer.testing import CliRunner

import fcconv
from fcconv.cli import app
from fcconv.grid import probe_output_grid
from fcconv.report import SCHEMA_PATH
from fcconv.runtime import OnnxRunner
from fcconv.weights_digest import WeightsDigest

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"
FCCONV = [sys.executable, "-m", "fcconv"]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def reports(json_path, junit_path):
    document = json.loads(Path(json_path).read_text())
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    root = ET.parse(junit_path).getroot()
    assert root.tag == "testsuites" and len(root.findall("testsuite")) == 1
    return document, root.find("testsuite")


def junit_failures(suite):
    return {case.get("name"): case.find("failure").get("message") for case in suite if case.find("failure") is not None}


def metadata(path):
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


def tamper(source, target, name, index):
    """Copy the ONNX file ``source`` to ``target`` with one element of initializer ``name`` changed by 1."""
    model = onnx.load(str(source))
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor).copy()
    values[index] += 1.0
    tensor.CopyFrom(numpy_helper.from_array(values, name))
    onnx.save(model, str(target))
    return target


@pytest.fixture(scope="module")
def sample_export(tmp_path_factory):
    """The shipped sample converted by the command line, and a copy with the bias of its class 3 changed."""
    folder = tmp_path_factory.mktemp("sample")
    good = folder / "digits.fcn.onnx"
    code, _, stderr = invoke("convert", SAMPLE, "-o", good)
    assert code == 0, stderr
    return good, tamper(good, folder / "tampered.onnx", "fc2.bias", 3)


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    """The original (unconverted) LeNet exported by torch.onnx itself: with a fixed size, and with free axes."""
    from custom_models import LeNet

    folder = tmp_path_factory.mktemp("plain")
    model = seeded(LeNet)
    paths = {}
    for name, axes in [("fixed", {0: "batch"}), ("free", {0: "batch", 2: "height", 3: "width"})]:
        paths[name] = folder / f"lenet_{name}.onnx"
        torch_export(model, (1, 1, 28, 28), paths[name], {"input": axes})
    return paths


def torch_export(model, shape, path, dynamic_axes):
    """torch.onnx's own export (TorchScript-based), input ``input`` and output ``scores``, without its warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(shape), str(path), input_names=["input"], output_names=["scores"],
                          dynamic_axes=dynamic_axes, dynamo=False)  # fmt: skip


def test_the_export_records_every_field_with_the_samples_values(sample_export):
    good, _ = sample_export
    meta = metadata(good)
    assert meta["fcconv.version"] == fcconv.__version__
    expected = {
        "fcconv.input_shape": "1,28,28",
        "fcconv.dense": "false",
        "fcconv.pool": "none",
        "fcconv.mode": "map",
        "fcconv.window": "4,4",
        "fcconv.stride": "1,1",
        "fcconv.total_stride": "4,4",
        "fcconv.receptive_field": "28,28",
        "fcconv.num_classes": "10",
        "fcconv.head_format": "conv",
        "fcconv.pointwise": "false",
        "fcconv.source_sha256": hashlib.sha256(SAMPLE.read_bytes()).hexdigest(),
    }
    assert {key: meta.get(key) for key in expected} == expected
    initializers = onnx.load(str(good)).graph.initializer
    each = json.loads(meta["fcconv.initializer_sha256"])
    assert list(each) == [t.name for t in initializers]
    assert meta["fcconv.weights_sha256"] == documented_weights_digest(initializers)


def documented_weights_digest(initializers):
    """The digest as docs/metadata.md defines it, computed here independently of fcconv.weights_digest."""

    def field(data):
        return len(data).to_bytes(8, "little") + data

    each = {}
    for t in initializers:
        raw = numpy_helper.to_array(t).astype(numpy_helper.to_array(t).dtype.newbyteorder("<")).tobytes()
        text = (t.name.encode(), str(t.data_type).encode(), ",".join(map(str, t.dims)).encode())
        each[t.name] = hashlib.sha256(b"".join(map(field, text)) + field(raw)).digest()
    return hashlib.sha256(b"".join(each[name] for name in sorted(each, key=str.encode))).hexdigest()


def output_size_by_formula(meta, size):
    stride = [int(s) for s in meta["fcconv.total_stride"].split(",")]
    field = [int(s) for s in meta["fcconv.receptive_field"].split(",")]
    return tuple((x - f) // s + 1 for x, f, s in zip(size, field, stride))


@pytest.mark.parametrize(
    "name,shape,dense,stride,field",
    [
        ("LeNet", (1, 28, 28), False, 4, 28),  # conv 5, pool 2, conv 5, pool 2: features (X - 12) // 4, window 4
        ("TinyVGG", (3, 224, 224), False, 32, 224),  # five 2×2 poolings, a 7×7 window
        ("TinyVGG", (3, 448, 448), False, 64, 448),  # adaptive pooling of the 14×14 map to 7×7: 2×2 average pooling
        ("TinyResNet", (3, 64, 64), True, 32, 1),  # padded stride-2 layers: features (X + 31) // 32, read per position
    ],
)
def test_total_stride_and_receptive_field_predict_the_output_size_onnxruntime_gives(
    tmp_path, name, shape, dense, stride, field
):
    model = seeded(getattr(__import__("custom_models"), name))
    conversion = fcconv.rewrite(model, shape, dense=dense)
    path = fcconv.export_onnx(conversion.module, tmp_path / "model.onnx", shape)
    meta = metadata(path)
    assert meta["fcconv.mode"] == "map"
    assert meta["fcconv.total_stride"] == f"{stride},{stride}" and meta["fcconv.receptive_field"] == f"{field},{field}"
    native = shape[1:]
    runner = OnnxRunner(path)
    for size in [native, (native[0] + 1, native[1] + stride - 1), (native[0] + 3 * stride + 5, native[1] + 17)]:
        out = runner(torch.randn(1, shape[0], *size))
        assert tuple(out.shape[2:]) == output_size_by_formula(meta, size), size
    larger = f"{native[0] + 37}x{native[1] + 70}"
    code, stdout, stderr = invoke("check", path, "--sizes", f"{native[0]}x{native[1]},{larger}")
    assert code == 0, stdout + stderr


def test_a_pooled_output_records_global_geometry_and_its_class_count(tmp_path):
    from custom_models import TinyResNet

    conversion = fcconv.rewrite(seeded(TinyResNet), (3, 64, 64))
    meta = metadata(fcconv.export_onnx(conversion.module, tmp_path / "pooled.onnx", (3, 64, 64)))
    assert (meta["fcconv.mode"], meta["fcconv.total_stride"], meta["fcconv.receptive_field"]) == (
        "pooled",
        "global",
        "global",
    )
    assert meta["fcconv.num_classes"] == "6"


def test_the_weights_digest_is_written_once_from_the_weights_even_when_metadata_names_it(tmp_path):
    from custom_models import LeNet

    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    stale = {"fcconv.weights_sha256": "0" * 64, "fcconv.initializer_sha256": "{}"}
    path = fcconv.export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28), metadata=stale)
    onnx.checker.check_model(str(path), full_check=True)  # refuses duplicate metadata keys
    assert metadata(path)["fcconv.weights_sha256"] == documented_weights_digest(onnx.load(str(path)).graph.initializer)


def test_the_probe_says_unknown_rather_than_guessing():
    fixed_map = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(3))
    assert probe_output_grid(fixed_map, (1, 16, 16)) is None
    grid = probe_output_grid(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 5, stride=3)), (1, 20, 31))
    assert (grid.total_stride, grid.receptive_field) == ((3, 3), (5, 5))


def test_a_good_export_passes_with_a_valid_json_report_and_a_junit_report_without_failures(sample_export, tmp_path):
    good, _ = sample_export
    code, stdout, stderr = invoke("check", good, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert code == 0, stdout + stderr
    assert f"{good} passed" in stdout
    document, suite = reports(tmp_path / "r.json", tmp_path / "r.xml")
    assert document["command"] == "check" and document["passed"] is True
    assert document["tolerances"] == {"rtol": 1e-4, "atol": 0.0, "dtype": "float32"}
    (entry,) = document["models"]
    assert entry["model"] == str(good) and entry["input_shape"] == [1, 28, 28]
    assert {c["verdict"] for c in entry["checks"]} == {"pass"}
    names = [c["check"] for c in entry["checks"]]
    assert names[:4] == ["onnx checker", "free spatial axes", "no collapse", "weights digest"]
    sizes = [c["input_size"] for c in entry["checks"] if c["check"] == "output size"]
    assert sizes == [[28, 28], [35, 43], [56, 56]]  # verify's default sizes
    assert [c["actual_shape"] for c in entry["checks"] if c["check"] == "output size"][1] == [2, 10, 2, 4]
    assert suite.get("failures") == "0" and len(suite) == len(entry["checks"])


def test_a_changed_weight_fails_check_naming_the_initializer(sample_export, tmp_path):
    _, tampered = sample_export
    code, stdout, stderr = invoke("check", tampered, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert code == 1
    assert stderr.strip() == f"fcconv: {tampered} failed: weights digest, reference output"
    document, suite = reports(tmp_path / "r.json", tmp_path / "r.xml")
    assert document["passed"] is False
    failed = [c for c in document["models"][0]["checks"] if c["verdict"] == "fail"]
    assert [c["check"] for c in failed] == ["weights digest", "reference output"]
    assert "'fc2.bias' changed since export" in failed[0]["message"]
    assert list(junit_failures(suite)) == [f"{tampered}: weights digest", f"{tampered}: reference output at 28×28"]


def test_a_changed_model_with_a_matching_digest_still_fails_against_the_recorded_original(sample_export, tmp_path):
    _, tampered = sample_export
    model = onnx.load(str(tampered))
    digest = WeightsDigest()
    for t in model.graph.initializer:
        digest.add(t.name, t.data_type, list(t.dims), [numpy_helper.to_array(t).tobytes()])
    for entry in model.metadata_props:  # as if re-exported from changed weights: the digest agrees with them
        if entry.key == "fcconv.weights_sha256":
            entry.value = digest.hexdigest()
        elif entry.key == "fcconv.initializer_sha256":
            entry.value = digest.each_json()
    redigested = tmp_path / "redigested.onnx"
    onnx.save(model, str(redigested))
    code, _, stderr = invoke("check", redigested, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert code == 1
    assert stderr.strip() == f"fcconv: {redigested} failed: reference output"
    document, _ = reports(tmp_path / "r.json", tmp_path / "r.xml")
    assert document["tolerances"] == {"rtol": 1e-4, "atol": 0.0, "dtype": "float32"}
    [entry] = [c for c in document["models"][0]["checks"] if c["check"] == "reference output"]
    # class 3's bias moved by 1: the error is 1 in absolute terms, over the 1e-4 × max |score| allowed
    assert entry["verdict"] == "fail" and entry["max_abs"] == pytest.approx(1.0, abs=1e-4)
    assert entry["tolerance"] < entry["max_abs"]
    loose = invoke("check", redigested, "--rtol", "1", "--json", tmp_path / "loose.json")
    assert loose[0] == 0, loose[2]
    assert json.loads((tmp_path / "loose.json").read_text())["tolerances"]["rtol"] == 1.0


def test_a_changed_weight_fails_verify_with_reports_naming_each_size(sample_export, tmp_path):
    _, tampered = sample_export
    code, stdout, stderr = invoke(
        "verify", tampered, "--reference", SAMPLE, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml"
    )
    assert code == 1, stderr
    document, suite = reports(tmp_path / "r.json", tmp_path / "r.xml")
    assert document["command"] == "verify" and document["passed"] is False
    assert document["tolerances"] == {"rtol": 1e-4, "atol": 0.0, "dtype": "float32"}
    (entry,) = document["models"]
    assert entry["reference"] == str(SAMPLE)
    failed = {(c["check"], tuple(c["input_size"])) for c in entry["checks"] if c["verdict"] == "fail"}
    assert failed == {("original", (28, 28)), ("sliding window", (28, 28)), ("sliding window", (35, 43)),
                      ("sliding window", (56, 56))}  # fmt: skip
    for check in entry["checks"]:
        assert check["max_abs"] > check["tolerance"] and check["worst_at"][1] == 3  # class 3 was changed
    assert set(junit_failures(suite)) == {f"{tampered}: {name} at {h}×{w}" for name, (h, w) in failed}


def test_verify_writes_passing_reports_with_its_errors_and_tolerances(sample_export, tmp_path):
    good, _ = sample_export
    code, _, stderr = invoke("verify", good, "--reference", SAMPLE, "--sizes", "28x28,40x31", "--rtol", "1e-3",
                             "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")  # fmt: skip
    assert code == 0, stderr
    document, suite = reports(tmp_path / "r.json", tmp_path / "r.xml")
    assert document["passed"] is True and document["tolerances"]["rtol"] == 1e-3
    for check in document["models"][0]["checks"]:
        assert check["verdict"] == "pass" and 0 <= check["max_abs"] <= check["tolerance"]
        assert check["tolerance"] == pytest.approx(1e-3 * check["scale"])
        assert check["max_rel"] == pytest.approx(check["max_abs"] / check["scale"])
    assert suite.get("failures") == "0" and suite.get("tests") == "3"


def test_external_weights_are_hashed_from_the_data_file_and_a_change_there_is_named(tmp_path):
    from custom_models import LeNet

    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    path = fcconv.export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28), external_data=True)
    assert invoke("check", path)[0] == 0
    tensor = next(t for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.name == "conv2.bias")
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    data = tmp_path / "lenet.onnx.data"
    with open(data, "r+b") as f:
        f.seek(offset)
        value = np.frombuffer(f.read(4), dtype="<f4") + 1
        f.seek(offset)
        f.write(value.astype("<f4").tobytes())
    code, _, stderr = invoke("check", path, "--json", tmp_path / "r.json")
    assert code == 1
    digest = next(c for c in json.loads((tmp_path / "r.json").read_text())["models"][0]["checks"]
                  if c["check"] == "weights digest")  # fmt: skip
    assert digest["verdict"] == "fail" and "'conv2.bias' changed since export" in digest["message"]


def model_reading_outside_data(tmp_path, how):
    """A LeNet export in ``tmp_path/model`` whose ``conv1.weight`` reads its bytes ``how``; and the location it names.

    ``outside.bin``, beside the folder, is a copy of the real data file: were it read, the weights
    digest would pass, and the verdict would tell what that file holds.
    """
    from custom_models import LeNet

    folder = tmp_path / "model"
    folder.mkdir()
    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    path = fcconv.export_onnx(conversion.module, folder / "lenet.onnx", (1, 28, 28), external_data=True)
    outside = tmp_path / "outside.bin"
    shutil.copy(folder / "lenet.onnx.data", outside)
    (folder / "link.data").symlink_to(outside)
    locations = {"absolute": str(outside), "parent": "../outside.bin", "symlink": "link.data"}
    location = locations.get(how, "lenet.onnx.data")
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "length" and how == "past the end":
            entry.value = str(outside.stat().st_size + 1)
    onnx.save(model, str(path))
    return path, location


@pytest.fixture
def opened(monkeypatch):
    """Every path this process opens from Python from now on, resolved (symbolic links followed)."""
    paths = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        paths.append(Path(file).resolve())
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return paths


@pytest.mark.parametrize(
    "how,why",
    [
        ("absolute", "leads outside the model's folder"),
        ("parent", "leads outside the model's folder"),
        ("symlink", "leads outside the model's folder"),
        ("past the end", "at bytes 0 to 1740841, past the end of the file (1740840 bytes)"),
    ],
)
def test_external_data_outside_the_folder_or_past_its_file_exits_2_naming_the_initializer_and_is_never_opened(
    tmp_path, opened, how, why
):
    path, location = model_reading_outside_data(tmp_path, how)
    commands = [["check", path], ["verify", path, "--reference", SAMPLE], ["convert", path, "-o", tmp_path / "x.onnx"]]
    for command in commands:
        opened.clear()
        code, stdout, stderr = invoke(*command)
        assert code == 2, (command[0], stdout + stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], (command[0], stderr)
        assert lines[0].startswith(f"fcconv: error: {path}: initializer 'conv1.weight' has its data in {location!r}")
        assert (tmp_path / "outside.bin").resolve() not in opened, command[0]


def test_check_maps_only_each_initializers_own_bytes_of_the_data_file(tmp_path, monkeypatch):
    from custom_models import LeNet

    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    path = fcconv.export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28), external_data=True)
    data = (tmp_path / "lenet.onnx.data").resolve()
    lengths = [int({e.key: e.value for e in t.external_data}["length"])
               for t in onnx.load(str(path), load_external_data=False).graph.initializer]  # fmt: skip
    mapped, real_mmap = [], mmap.mmap

    def spy_mmap(fileno, length, *args, **kwargs):
        if Path(os.readlink(f"/proc/self/fd/{fileno}")) == data:
            mapped.append(length)
        return real_mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", spy_mmap)
    assert invoke("check", path)[0] == 0
    assert len(mapped) == len(lengths)
    # each window starts at most one allocation granule before the initializer's offset, as mmap requires
    assert all(0 <= m - n < mmap.ALLOCATIONGRANULARITY for m, n in zip(mapped, lengths)), (mapped, lengths)


def test_a_fixed_input_size_fails_naming_the_input_and_the_node_that_collapses_the_map(torch_exports, tmp_path):
    code, stdout, stderr = invoke(
        "check", torch_exports["fixed"], "--input-shape", "1,28,28", "--json", tmp_path / "r.json"
    )
    assert code == 1
    checks = {(c["check"], tuple(c["input_size"] or ())): c for c in json.loads((tmp_path / "r.json").read_text())
              ["models"][0]["checks"]}  # fmt: skip
    assert checks[("free spatial axes", ())]["message"].startswith("input 'input' fixes height to 28 and width to 28")
    collapse = checks[("no collapse", ())]["message"]
    assert "Gemm node '/fc1/Gemm'" in collapse and "Reshape node" in collapse and "800 at 28×28" in collapse
    assert checks[("runs", (28, 28))]["verdict"] == "pass"
    assert checks[("runs", (35, 43))]["verdict"] == "fail"
    assert "free spatial axes" in stderr and "no collapse" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_flatten_and_gemm_head_with_free_axes_fails_naming_the_node(torch_exports, tmp_path):
    code, _, _ = invoke("check", torch_exports["free"], "--input-shape", "1,28,28", "--json", tmp_path / "r.json")
    assert code == 1
    checks = json.loads((tmp_path / "r.json").read_text())["models"][0]["checks"]
    verdicts = {(c["check"], tuple(c["input_size"] or ())): c["verdict"] for c in checks}
    assert verdicts[("free spatial axes", ())] == "pass"
    assert verdicts[("no collapse", ())] == "fail" and verdicts[("runs", (56, 56))] == "fail"
    collapse = next(c["message"] for c in checks if c["check"] == "no collapse")
    assert "Gemm node '/fc1/Gemm'" in collapse


def test_the_gemm_head_format_reshapes_windows_into_rows_and_still_passes(tmp_path):
    from custom_models import LeNet

    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    path = fcconv.export_onnx(conversion.module, tmp_path / "gemm.onnx", (1, 28, 28), head_format="gemm")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Reshape"} <= ops
    code, stdout, stderr = invoke("check", path)
    assert code == 0, stdout + stderr


def test_a_model_fcconv_did_not_write_is_checked_with_input_shape_and_says_what_it_skipped(tmp_path):
    model = seeded(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1)))
    path = tmp_path / "plain.onnx"
    torch_export(model, (1, 3, 8, 8), path, {"input": {0: "n", 2: "h", 3: "w"}})
    code, stdout, stderr = invoke("check", path, "--input-shape", "3,8,8", "--json", tmp_path / "r.json")
    assert code == 0, stdout + stderr
    assert "passed (5 checks skipped)" in stdout
    checks = json.loads((tmp_path / "r.json").read_text())["models"][0]["checks"]
    skipped = [(c["check"], c["input_size"]) for c in checks if c["verdict"] == "skip"]
    assert skipped == [("weights digest", None), ("output size", [8, 8]), ("output size", [11, 13]),
                       ("output size", [16, 16]), ("reference output", None)]  # fmt: skip
    code, _, stderr = invoke("check", path)
    assert code == 2 and "give --input-shape" in stderr


def test_an_unknown_grid_skips_the_output_size_and_says_why(tmp_path, monkeypatch):
    from custom_models import LeNet

    monkeypatch.setattr(fcconv.export, "probe_output_grid", lambda module, shape: None)
    conversion = fcconv.rewrite(seeded(LeNet), (1, 28, 28))
    path = fcconv.export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28))
    assert metadata(path)["fcconv.total_stride"] == "unknown"
    code, _, _ = invoke("check", path, "--json", tmp_path / "r.json")
    assert code == 0
    sizes = [c for c in json.loads((tmp_path / "r.json").read_text())["models"][0]["checks"]
             if c["check"] == "output size"]  # fmt: skip
    assert {(c["verdict"], c["message"]) for c in sizes} == {
        ("skip", "the metadata states the total stride and receptive field as unknown")
    }


def test_several_models_fail_together_when_one_fails(sample_export, tmp_path):
    good, tampered = sample_export
    code, _, stderr = invoke("check", good, tampered, "--json", tmp_path / "r.json")
    assert code == 1 and str(tampered) in stderr and f"{good} failed" not in stderr
    document = json.loads((tmp_path / "r.json").read_text())
    assert [m["passed"] for m in document["models"]] == [True, False] and document["passed"] is False


def bad_inputs(tmp_path, good):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("not a model\n" * 20)
    (tmp_path / "folder.onnx").mkdir()
    external = tmp_path / "external.onnx"
    conversion = fcconv.rewrite(seeded(__import__("custom_models").LeNet), (1, 28, 28))
    fcconv.export_onnx(conversion.module, external, (1, 28, 28), external_data=True)
    (tmp_path / "external.onnx.data").unlink()
    no_meta = tmp_path / "no_meta.onnx"
    model = onnx.load(str(good))
    del model.metadata_props[:]
    onnx.save(model, str(no_meta))
    return {
        "missing file": (["check", tmp_path / "nope.onnx"], "no such file"),
        "empty file": (["check", tmp_path / "empty.onnx"], "empty"),
        "not ONNX": (["check", tmp_path / "text.onnx"], "not an ONNX model"),
        "a directory": (["check", tmp_path / "folder.onnx"], "directory"),
        "weights file missing": (["check", external], "external.onnx.data is missing"),
        "no native size": (["check", no_meta], "--input-shape"),
        "input shape of another rank": (["check", good, "--input-shape", "1,28"], "rank"),
        "other channel count": (["check", good, "--input-shape", "3,28,28"], "input channels"),
        "size below the native": (["check", good, "--sizes", "20x20"], "at least the native"),
        "malformed sizes": (["check", good, "--sizes", "28xa"], "--sizes"),
        "report folder missing": (["check", good, "--json", tmp_path / "no" / "r.json"], "does not exist"),
        "report over the model": (["check", good, "--json", good], "overwrite"),
        "one bad model of two": (["check", good, tmp_path / "text.onnx"], "not an ONNX model"),
        "verify with a missing reference": (["verify", good, "--reference", tmp_path / "nope.pt"], "no such file"),
    }


def test_bad_input_exits_2_with_one_line_and_writes_no_report(sample_export, tmp_path):
    good, _ = sample_export
    cases = bad_inputs(tmp_path, good)
    for case, (args, expected) in cases.items():
        before = sorted(p.name for p in tmp_path.iterdir())
        report_args = [] if "--json" in args else ["--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml"]
        code, _, stderr = invoke(*args, *report_args)
        assert code == 2, (case, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (case, stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, case


def test_the_report_schema_rejects_a_report_that_breaks_it(sample_export, tmp_path):
    good, _ = sample_export
    invoke("check", good, "--json", tmp_path / "r.json")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    document = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    for breaking in (
        lambda d: d.update(schema="fcconv.report/2"),
        lambda d: d["models"][0]["checks"][0].update(verdict="ok"),
        lambda d: d["models"][0]["checks"][0].pop("message"),
        lambda d: d["models"][0]["checks"][4].update(max_abs="1e-6"),
    ):
        broken = json.loads(json.dumps(document))
        breaking(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def command_line(entry):
    """A hook's or workflow's ``fcconv ...`` command, run with this interpreter's fcconv."""
    words = shlex.split(entry)
    assert words[0] == "fcconv"
    return [*FCCONV, *words[1:]]


def test_the_pre_commit_hook_checks_onnx_files_and_fails_on_a_tampered_one(sample_export):
    good, tampered = sample_export
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "fcconv-check" and hook["language"] == "python"
    import re

    pattern = re.compile(hook["files"])
    assert pattern.search("models/vgg16.fcn.onnx") and not pattern.search("models/vgg16.fcn.onnx.data")
    assert not pattern.search("models/vgg16.pt")
    command = command_line(hook["entry"])
    for files, expected in [([good], 0), ([tampered], 1), ([good, tampered], 1)]:
        result = subprocess.run([*command, *map(str, files)], capture_output=True, text=True)
        assert result.returncode == expected, (files, result.stderr)


def test_the_github_actions_example_checks_every_onnx_file_and_keeps_the_reports(sample_export, tmp_path):
    good, tampered = sample_export
    workflow = yaml.safe_load((REPO / "examples" / "github-actions" / "fcconv-check.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    script = steps["Check the ONNX models"]["run"]
    keep = steps["Keep the reports"]
    assert "cancelled()" in keep["if"]
    assert set(keep["with"]["path"].split()) == {"fcconv-report.json", "fcconv-junit.xml"}

    # Run the step's script in a repository of models, with `fcconv` meaning this checkout's command.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "fcconv"
    shim.write_text(f'#!/bin/sh\nexec {shlex.join(FCCONV)} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    repo = tmp_path / "models"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(good, repo / "good.onnx")
    for expected, added in [(0, "good.onnx"), (1, "tampered.onnx")]:
        if added == "tampered.onnx":
            shutil.copy(tampered, repo / "tampered.onnx")
        subprocess.run(["git", "add", added], cwd=repo, check=True)
        result = subprocess.run(["bash", "-e", "-c", script], cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == expected, result.stderr
        document, suite = reports(repo / "fcconv-report.json", repo / "fcconv-junit.xml")
        assert [m["model"] for m in document["models"]] == ["good.onnx", "tampered.onnx"][: 1 + expected]
        failures = ["tampered.onnx: weights digest", "tampered.onnx: reference output at 28×28"]
        assert list(junit_failures(suite)) == ([] if expected == 0 else failures)


@pytest.mark.parametrize(
    ("factory", "shape", "sizes", "stride"),
    [
        ("SignalClassifier", (1, 1000), "1000,1301", "32"),
        ("VolumeClassifier", (1, 64, 64, 64), "64x64x64,72x64x80", "8,8,8"),
    ],
)
def test_1d_and_3d_exports_pass_every_check_with_their_grid_predicting_the_output(
    tmp_path, factory, shape, sizes, stride
):
    model = seeded(getattr(__import__("custom_models"), factory)).eval()
    conversion = fcconv.rewrite(model, shape)
    path = fcconv.export_onnx(conversion.module, tmp_path / f"{factory}.onnx", shape)
    assert metadata(path)["fcconv.total_stride"] == stride
    code, stdout, stderr = invoke("check", path, "--sizes", sizes, "--json", tmp_path / "r.json")
    assert code == 0, stdout + stderr
    checks = json.loads((tmp_path / "r.json").read_text())["models"][0]["checks"]
    verdicts = {(c["check"], tuple(c["input_size"] or ())): c["verdict"] for c in checks}
    assert all(v == "pass" for k, v in verdicts.items() if k[0] != "reference output")
    larger = [c for c in checks if c["check"] == "output size" and c["input_size"] != list(shape[1:])]
    assert larger and all(c["actual_shape"] == c["expected_shape"] and c["actual_shape"][2] > 1 for c in larger)
