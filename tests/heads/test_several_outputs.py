"""A head that splits into several outputs: one dense map per output, in the original order and names, everywhere."""

import json

import onnx
import pytest
import torch
from conftest import TESTS, seeded
from custom_models import ScoresAndBoxes, ScoresAndBoxesTuple
from onnx import numpy_helper
from test_check import invoke, metadata, reports

import fcconv
from fcconv.runtime import OnnxRunner

NATIVE = (3, 10, 12)
STRIDE = 2  # one 2×2 max pooling, no padding: position (i, j) reads the input window at (2i, 2j)


@pytest.fixture(scope="module")
def model():
    return seeded(ScoresAndBoxes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("heads") / "scores_and_boxes.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, monkeypatch_module):
    target = checkpoint.with_name("scores_and_boxes.fcn.onnx")
    code, _, err = invoke("convert", checkpoint, "--arch", "custom_models:ScoresAndBoxes", "--input-shape",
                          "3,10,12", "-o", target)  # fmt: skip
    assert code == 0, err
    return target


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(TESTS)  # --arch custom_models:… imports from the current directory
        yield patch


def windows_of(model, x, out_size):
    """The original run on every input window a converted output position reads, per output: (N, K, h, w)."""
    rows = []
    for i in range(out_size[0]):
        row = []
        for j in range(out_size[1]):
            crop = x[:, :, STRIDE * i : STRIDE * i + NATIVE[1], STRIDE * j : STRIDE * j + NATIVE[2]]
            row.append(model(crop))
        rows.append(row)
    return {name: torch.stack([torch.stack([c[name] for c in row], -1) for row in rows], -2) for name in rows[0][0]}


@pytest.mark.parametrize("size", [(10, 12), (13, 12), (18, 23)])
def test_each_output_equals_the_original_on_every_window_it_reads(model, size):
    converted = fcconv.convert(model, NATIVE)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = converted(x)
        expected = windows_of(model, x, out["boxes"].shape[2:])
    assert list(out) == ["class_scores", "boxes"]
    assert out["class_scores"].shape[:2] == (2, 5) and out["boxes"].shape[:2] == (2, 4)
    for name in out:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6)
    # the class scores stay a softmax over the channel axis of the map
    torch.testing.assert_close(out["class_scores"].sum(1), torch.ones_like(out["class_scores"][:, 0]))


def test_verify_compares_every_output_at_every_size(model):
    report = fcconv.verify(model, fcconv.convert(model, NATIVE), NATIVE)
    assert report.passed
    compared = {(c.input_size, c.reference, c.output) for c in report.checks}
    for size in [(10, 12), (13, 19), (20, 24)]:
        for output in ("class_scores", "boxes"):
            assert (size, "sliding window", output) in compared
    assert ((10, 12), "original", "boxes") in compared


def test_a_wrong_branch_fails_only_that_output(model):
    converted = fcconv.convert(seeded(ScoresAndBoxes), NATIVE)
    with torch.no_grad():
        converted.get_submodule("boxes").bias.add_(1.0)
    report = fcconv.verify(model, converted, NATIVE)
    assert not report.passed
    assert {c.output for c in report.checks if not c.passed} == {"boxes"}


def test_a_tuple_keeps_its_order_and_its_outputs_are_named_by_position(tmp_path):
    model = seeded(ScoresAndBoxesTuple)
    converted = fcconv.convert(model, NATIVE)
    boxes, scores = converted(torch.randn(1, 3, 14, 16))
    assert boxes.shape == (1, 4, 3, 3) and scores.shape == (1, 5, 3, 3)
    path = fcconv.export_onnx(converted, tmp_path / "tuple.onnx", NATIVE)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["output_0", "output_1"]
    assert fcconv.verify(model, path, NATIVE).passed


def test_the_export_names_each_output_and_leaves_its_map_axes_free(exported):
    graph = onnx.load(str(exported)).graph
    assert [o.name for o in graph.output] == ["class_scores", "boxes"]
    for output in graph.output:
        dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
        assert dims[0] == "batch" and isinstance(dims[1], int) and all(isinstance(d, str) for d in dims[2:])
    meta = metadata(exported)
    assert meta["fcconv.output_channels"] == "class_scores:5,boxes:4"
    assert meta["fcconv.num_classes"] == "5"
    assert {"fcconv.probe_output", "fcconv.probe_output:boxes"} <= set(meta)
    out = OnnxRunner(exported)(torch.randn(1, 3, 21, 17))
    assert out["class_scores"].shape == (1, 5, 6, 3) and out["boxes"].shape == (1, 4, 6, 3)


def test_check_and_verify_report_every_output(exported, checkpoint, tmp_path):
    code, out, err = invoke("check", exported, "--json", tmp_path / "c.json", "--junit", tmp_path / "c.xml")
    assert code == 0, out + err
    document, suite = reports(tmp_path / "c.json", tmp_path / "c.xml")
    checks = document["models"][0]["checks"]
    for name in ("runs", "output size", "reference output"):
        assert {c["output"] for c in checks if c["check"] == name} == {"class_scores", "boxes"}
    sizes = [c for c in checks if c["check"] == "output size" and c["output"] == "boxes"]
    assert all(c["verdict"] == "pass" and c["actual_shape"][1] == 4 for c in sizes)
    assert any("(boxes)" in case.get("name") for case in suite)

    code, out, err = invoke("verify", exported, "--reference", checkpoint, "--arch", "custom_models:ScoresAndBoxes",
                            "--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml")  # fmt: skip
    assert code == 0, out + err
    document, _ = reports(tmp_path / "v.json", tmp_path / "v.xml")
    assert {c["output"] for c in document["models"][0]["checks"]} == {"class_scores", "boxes"}


def test_a_tampered_branch_fails_check_and_verify_on_that_output(exported, checkpoint, tmp_path):
    model = onnx.load(str(exported))
    bias = next(t for t in model.graph.initializer if t.name == "boxes.bias")
    values = numpy_helper.to_array(bias).copy()
    values[0] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))

    code, _, _ = invoke("check", tampered, "--json", tmp_path / "c.json", "--junit", tmp_path / "c.xml")
    assert code == 1
    document, _ = reports(tmp_path / "c.json", tmp_path / "c.xml")
    failed = {(c["check"], c["output"]) for c in document["models"][0]["checks"] if c["verdict"] == "fail"}
    assert failed == {("weights digest", None), ("reference output", "boxes")}

    code, _, _ = invoke("verify", tampered, "--reference", checkpoint, "--arch", "custom_models:ScoresAndBoxes",
                        "--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml")  # fmt: skip
    assert code == 1
    document = json.loads((tmp_path / "v.json").read_text())
    assert {c["output"] for c in document["models"][0]["checks"] if c["verdict"] == "fail"} == {"boxes"}


@pytest.mark.parametrize("suffix", [".pt2", ".safetensors"])
def test_pytorch_outputs_keep_every_output_and_check_reads_them(checkpoint, monkeypatch_module, tmp_path, suffix):
    target = tmp_path / f"heads{suffix}"
    arch = ["--arch", "custom_models:ScoresAndBoxes", "--input-shape", "3,10,12"]
    code, out, err = invoke("convert", checkpoint, *arch, "-o", target)
    assert code == 0, out + err
    code, out, err = invoke("verify", target, "--reference", checkpoint, *arch, "--json", tmp_path / "v.json",
                            "--junit", tmp_path / "v.xml")  # fmt: skip
    assert code == 0, out + err
    document, _ = reports(tmp_path / "v.json", tmp_path / "v.xml")
    assert {c["output"] for c in document["models"][0]["checks"]} == {"class_scores", "boxes"}
    rebuild = ["--reference", checkpoint, *arch] if suffix == ".safetensors" else []
    code, out, err = invoke("check", target, *rebuild, "--json", tmp_path / "c.json", "--junit", tmp_path / "c.xml")
    assert code == 0, out + err
    document, _ = reports(tmp_path / "c.json", tmp_path / "c.xml")
    checks = document["models"][0]["checks"]
    compared = [c for c in checks if c["check"] == "reference output"]
    assert {c["output"] for c in compared} == {"class_scores", "boxes"} and all(
        c["verdict"] == "pass" for c in compared
    )


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pool_pools_every_output_to_n_by_k(model, pool):
    """``--pool`` pools each output's map on its own, as it pools each output of an ONNX classifier."""
    converted = fcconv.convert(model, NATIVE, pool=pool)
    x = torch.randn(2, *NATIVE[:1], 18, 23)
    with torch.no_grad():
        out = converted(x)
        dense = fcconv.convert(model, NATIVE)(x)
    assert list(out) == list(dense)
    for name, value in out.items():
        reduce = torch.mean if pool == "avg" else torch.amax
        assert value.shape == dense[name].shape[:2]
        torch.testing.assert_close(value, reduce(dense[name], (2, 3)))
    assert fcconv.verify(model, converted, NATIVE, sizes=[(10, 12), (18, 23)]).passed
