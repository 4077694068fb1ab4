"""ONNX from other exporters: paddle2onnx writes a free axis as ``dim_value: -1`` rather than as a symbolic name;
fcconv reads it as free, so the model converts exactly and the converted model's batch axis stays free."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fcconv.cli import app
from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx
from fcconv.onnx_verify import verify_onnx

CHANNELS, NATIVE, CLASSES = 3, (8, 8), 5
MAP = (4, 6, 6)  # (C, h, w) after the unpadded 3×3 convolution, total stride 1


def paddle_graph(path, *, pooled: bool, dims=(-1, CHANNELS, *NATIVE)):
    """Conv → Relu → (GlobalAveragePool →) Flatten → Gemm, its free axes written as -1 as paddle2onnx writes them."""
    rng = np.random.default_rng(11)
    features = MAP[0] if pooled else int(np.prod(MAP))
    weights = {
        "conv.w": rng.standard_normal((MAP[0], CHANNELS, 3, 3)).astype(np.float32) / 3,
        "conv.b": rng.standard_normal(MAP[0]).astype(np.float32) / 4,
        "fc.w": rng.standard_normal((CLASSES, features)).astype(np.float32) / 4,
        "fc.b": rng.standard_normal(CLASSES).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["conv"], name="conv2d_0", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu_0"),
    ]
    flattened = "relu"
    if pooled:
        nodes.append(helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool2d_0"))
        flattened = "pool"
    nodes += [
        helper.make_node("Flatten", [flattened], ["flat"], name="flatten_0", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="linear_0", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [-1, CLASSES])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="paddle2onnx")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run(model, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def batch_axes(model: onnx.ModelProto) -> list[str | int]:
    """Axis 0 of the model's input and of every output: the symbolic name, or the fixed size."""
    values = [model.graph.input[0], *model.graph.output]
    return [v.type.tensor_type.shape.dim[0].dim_param or v.type.tensor_type.shape.dim[0].dim_value for v in values]


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("pooled", [True, False], ids=["global-pool", "flatten"])
def test_a_batch_written_as_minus_one_is_free_and_the_model_converts_exactly(tmp_path, pooled):
    source = paddle_graph(tmp_path / "paddle.onnx", pooled=pooled)
    classifier = load_onnx_classifier(source)
    assert classifier.batch is None and classifier.input_shape == (CHANNELS, *NATIVE)
    conversion = rewrite_onnx(classifier)
    for part in (conversion.model, conversion.trunk, conversion.head):
        assert all(isinstance(axis, str) and axis for axis in batch_axes(part)), batch_axes(part)

    rng = np.random.default_rng(5)
    native = rng.standard_normal((3, CHANNELS, *NATIVE)).astype(np.float32)
    assert close(run(conversion.model, native)[:, :, 0, 0], run(source, native))
    larger = rng.standard_normal((3, CHANNELS, 9, 11)).astype(np.float32)
    out = run(conversion.model, larger)
    if pooled:  # the global pooling stays: the whole map is read, at any size
        assert out.shape == (3, CLASSES, 1, 1)
    else:  # every native-size crop, stride 1
        expected = np.stack(
            [np.stack([run(source, larger[:, :, i : i + 8, j : j + 8]) for j in range(4)], -1) for i in range(2)], -2
        )
        assert close(out, expected)
    assert verify_onnx(classifier, conversion.model, conversion, sizes=[NATIVE, (9, 11)], batch=3).passed


def test_the_cli_inspects_converts_and_verifies_a_batch_written_as_minus_one(tmp_path):
    source = paddle_graph(tmp_path / "paddle.onnx", pooled=True)
    shown = cli("inspect", source)
    assert shown.exit_code == 0, shown.stderr + shown.stdout
    assert "linear_0 (Gemm)" in shown.stdout
    out = tmp_path / "paddle.fcn.onnx"
    result = cli("convert", source, "-o", out, "--sizes", "8x8,11x13")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "FAIL" not in result.stdout
    assert batch_axes(onnx.load(str(out))) == ["batch", "batch"]
    again = cli("verify", out, "--reference", source, "--sizes", "8x8,10x9")
    assert again.exit_code == 0, again.stderr + again.stdout


def test_free_height_and_width_written_as_minus_one_take_the_given_input_shape(tmp_path):
    source = paddle_graph(tmp_path / "dynamic.onnx", pooled=False, dims=(-1, CHANNELS, -1, -1))
    missing = cli("convert", source, "-o", tmp_path / "none.onnx")
    assert missing.exit_code == 2 and "--input-shape" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    out = tmp_path / "dynamic.fcn.onnx"
    result = cli("convert", source, "-o", out, "--input-shape", "3,8,8", "--sizes", "8x8,9x12")
    assert result.exit_code == 0, result.stderr + result.stdout
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", CHANNELS, "height", "width"]
