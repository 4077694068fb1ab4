"""fcconv check of an ONNX file without fcconv metadata: the native size is the one its input declares, if any."""

import json
import warnings

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from conftest import seeded
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fcconv.check import check_onnx
from fcconv.cli import app
from fcconv.report import SCHEMA_PATH


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def conv_net(path, dims, metadata=None, channels_last=False):
    """Conv 3→4 (3×3), Relu, Conv 4→5 (1×1) on an input declared with ``dims`` (an int is fixed, a str is named).

    ``channels_last``: the input is N×H×W×C and a Transpose to N×C×H×W opens the graph, as Keras exports do.
    """
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((5, 4, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        *([helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2])] if channels_last else []),
        helper.make_node("Conv", ["nchw" if channels_last else "input", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None] * 4)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def report_of(path, *args):
    """Exit code, stdout, stderr and the JSON report's one model of ``fcconv check`` (validated by the schema)."""
    json_path = path.with_suffix(".json")
    code, stdout, stderr = invoke("check", path, *args, "--json", json_path)
    if not json_path.exists():
        return code, stdout, stderr, None
    document = json.loads(json_path.read_text())
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    return code, stdout, stderr, document["models"][0]


def verdicts(model):
    return {(c["check"], tuple(c["input_size"] or ())): c for c in model["checks"]}


@pytest.mark.parametrize("batch", [1, "n"])
def test_a_model_without_metadata_takes_its_native_size_from_the_fixed_sizes_its_input_declares(tmp_path, batch):
    path = conv_net(tmp_path / "fixed.onnx", [batch, 3, 16, 16])
    code, stdout, stderr, model = report_of(path)
    assert code == 1, stdout + stderr
    assert "Traceback" not in stderr and "(native input 3×16×16, as its input declares)" in " ".join(stdout.split())
    assert model["input_shape"] == [3, 16, 16] and model["input_shape_source"] == "declared"
    checks = verdicts(model)
    free = checks[("free spatial axes", ())]
    assert free["verdict"] == "fail" and "fixes height to 16 and width to 16" in free["message"]
    assert checks[("runs", (16, 16))]["verdict"] == "pass"
    assert checks[("runs", (16, 16))]["actual_shape"] == [2, 5, 14, 14]
    assert checks[("runs", (32, 32))]["verdict"] == "fail"  # the fixed graph cannot take it, and says so
    assert stderr.strip() == f"fcconv: {path} failed: free spatial axes, runs"


def test_a_classifier_torch_exported_at_a_fixed_size_is_checked_without_flags_and_fails_honestly(tmp_path):
    from custom_models import LeNet

    path = tmp_path / "lenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(seeded(LeNet), torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], dynamo=False)
    code, stdout, stderr, model = report_of(path)
    assert code == 1, stdout + stderr
    assert model["input_shape"] == [1, 28, 28] and model["input_shape_source"] == "declared"
    checks = verdicts(model)
    assert checks[("free spatial axes", ())]["verdict"] == "fail"
    assert checks[("no collapse", ())]["verdict"] == "fail" and "Gemm" in checks[("no collapse", ())]["message"]
    assert checks[("runs", (28, 28))]["verdict"] == "pass"


@pytest.mark.parametrize(
    ("dims", "free"),
    [
        (["n", 3, "h", "w"], "height and width"),
        (["n", 3, 16, "w"], "width"),
        (["n", "c", 16, 16], "channels"),
        ([1, 3, 0, 16], "height"),  # a size that is not positive is free (as paddle2onnx writes -1)
    ],
)
def test_sizes_the_input_does_not_fix_are_never_guessed_and_still_ask_for_input_shape(tmp_path, dims, free):
    path = conv_net(tmp_path / "free.onnx", dims)
    code, stdout, stderr, model = report_of(path)
    assert code == 2 and model is None
    assert stderr.strip() == (
        f"fcconv: error: {path} does not record its native input size "
        f"(no fcconv metadata, and input 'input' fixes no {free}); give --input-shape"
    )


def test_input_shape_and_metadata_still_give_the_native_size_and_are_named_as_its_source(tmp_path):
    free = conv_net(tmp_path / "free.onnx", ["n", 3, "h", "w"])
    code, stdout, stderr, model = report_of(free, "--input-shape", "3,12,12")
    assert code == 0, stdout + stderr
    assert model["input_shape"] == [3, 12, 12] and model["input_shape_source"] == "given"
    assert "(native input 3×12×12)" in " ".join(stdout.split())

    recorded = conv_net(tmp_path / "recorded.onnx", ["n", 3, "h", "w"], {"fcconv.input_shape": "3,10,10"})
    code, stdout, stderr, model = report_of(recorded)
    assert code == 0, stdout + stderr
    assert model["input_shape"] == [3, 10, 10] and model["input_shape_source"] == "metadata"

    fixed = conv_net(tmp_path / "fixed.onnx", [1, 3, 16, 16], {"fcconv.input_shape": "3,16,16"})
    assert check_onnx(fixed, sizes=[(16, 16)]).input_shape_source == "metadata"
    assert check_onnx(fixed, (3, 16, 16), sizes=[(16, 16)]).input_shape_source == "given"


def test_a_channels_last_input_is_not_read_as_channels_first_for_its_declared_sizes(tmp_path):
    path = conv_net(tmp_path / "nhwc.onnx", [1, 16, 16, 3], channels_last=True)
    code, stdout, stderr, model = report_of(path)
    assert code == 2 and model is None
    assert stderr.strip() == (
        f"fcconv: error: {path} does not record its native input size (no fcconv metadata) and its input 'input' "
        "is N×H×W×C (a Transpose to N×C×H×W opens the graph), which fcconv check reads only from fcconv's metadata"
    )
