"""GroupNorm in the trunk as exporters write it: a Reshape of the N×C×H×W map to (N, G, -1), a normalization over
the last axis, and a Reshape back to the map's shape. The split keeps the batch and G, -1 takes the rest at any
size; a reshape back to the map's native shape written as a constant is made to read the map's Shape."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import seeded
from onnx import TensorProto, helper, numpy_helper
from test_onnx_input import export
from torch import nn
from typer.testing import CliRunner

from fcconv.cli import app
from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx
from fcconv.onnx_verify import verify_onnx

CHANNELS, NATIVE, CLASSES, WIDTH, GROUPS = 3, (12, 12), 5, 8, 2
MAP = (WIDTH, 10, 10)


class GroupNormNet(nn.Module):
    """Conv → GroupNorm → ReLU, then a flatten and a Linear (or a global pooling first)."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(CHANNELS, WIDTH, 3), nn.GroupNorm(GROUPS, WIDTH)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        nn.init.uniform_(self.norm.bias, -0.5, 0.5)
        self.pooled = pooled
        self.fc = nn.Linear(WIDTH if pooled else WIDTH * 14 * 14, CLASSES)  # exported at 16×16

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        return self.fc(x.mean((2, 3)) if self.pooled else torch.flatten(x, 1))


def group_norm_graph(path, *, back: str, decomposed: bool = False, pooled: bool = True, batch=1):
    """Conv → GroupNorm written with reshapes → ReLU → (GlobalAveragePool →) Flatten → Gemm, at a fixed batch.

    ``back`` is how the reshape back to the map gets its target: ``shape`` (the Shape of the map, any size) or
    ``constant`` (the map's native shape written in, as a constant-folding optimizer leaves it); the split's target
    then also writes the batch as a number. ``decomposed`` writes the normalization as ReduceMean, Sub, Pow, Sqrt.
    """
    rng = np.random.default_rng(5)
    features = WIDTH if pooled else int(np.prod(MAP))
    weights = {
        "conv.w": (rng.standard_normal((WIDTH, CHANNELS, 3, 3)) / 3).astype(np.float32),
        "conv.b": rng.standard_normal(WIDTH).astype(np.float32),
        "split": np.array([0 if back == "shape" else batch, GROUPS, -1], np.int64),
        "ones": np.ones(GROUPS, np.float32),
        "zeros": np.zeros(GROUPS, np.float32),
        "gamma": rng.uniform(0.5, 1.5, (WIDTH, 1, 1)).astype(np.float32),
        "beta": rng.uniform(-0.5, 0.5, (WIDTH, 1, 1)).astype(np.float32),
        "fc.w": (rng.standard_normal((CLASSES, features)) / 4).astype(np.float32),
        "fc.b": rng.standard_normal(CLASSES).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Reshape", ["c", "split"], ["groups"], name="norm/Reshape"),
    ]
    if decomposed:
        weights.update(axis=np.array([2], np.int64), two=np.array(2.0, np.float32), eps=np.array(1e-5, np.float32))
        nodes += [
            helper.make_node("ReduceMean", ["groups"], ["mean"], name="norm/ReduceMean", axes=[2], keepdims=1),
            helper.make_node("Sub", ["groups", "mean"], ["centred"], name="norm/Sub"),
            helper.make_node("Pow", ["centred", "two"], ["squared"], name="norm/Pow"),
            helper.make_node("ReduceMean", ["squared"], ["variance"], name="norm/ReduceMean_1", axes=[2], keepdims=1),
            helper.make_node("Add", ["variance", "eps"], ["variance_eps"], name="norm/Add"),
            helper.make_node("Sqrt", ["variance_eps"], ["std"], name="norm/Sqrt"),
            helper.make_node("Div", ["centred", "std"], ["normed"], name="norm/Div"),
        ]
    else:
        nodes.append(
            helper.make_node("InstanceNormalization", ["groups", "ones", "zeros"], ["normed"], name="norm/InstanceNorm")
        )
    if back == "shape":
        nodes.append(helper.make_node("Shape", ["c"], ["map_shape"], name="norm/Shape"))
    else:
        weights["map_shape"] = np.array([batch, *MAP], np.int64)
    nodes += [
        helper.make_node("Reshape", ["normed", "map_shape"], ["restored"], name="norm/Reshape_1"),
        helper.make_node("Mul", ["restored", "gamma"], ["scaled"], name="norm/Mul"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="norm/Add_1"),
        helper.make_node("Relu", ["shifted"], ["a"], name="relu"),
    ]
    flattened = "a"
    if pooled:
        nodes.append(helper.make_node("GlobalAveragePool", ["a"], ["pooled"], name="pool"))
        flattened = "pooled"
    nodes += [
        helper.make_node("Flatten", [flattened], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "group_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CHANNELS, *NATIVE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run(model, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def any_size(path) -> onnx.ModelProto:
    """The input model with its batch, height and width free, for onnxruntime to run it at any size."""
    model = onnx.load(str(path))
    for index, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if index != 1:
            dim.dim_param = f"axis{index}"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "axis0"
    return model


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("back", ["shape", "constant"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["instance-norm", "reduce-mean"])
def test_a_group_norm_written_with_reshapes_converts_and_equals_it_at_every_size(tmp_path, back, decomposed):
    """A pooled head: the model written with the Shape of the map runs at any size itself, the reference."""
    source = group_norm_graph(tmp_path / "model.onnx", back=back, decomposed=decomposed)
    reference = any_size(group_norm_graph(tmp_path / "reference.onnx", back="shape", decomposed=decomposed))
    classifier = load_onnx_classifier(source)
    conversion = rewrite_onnx(classifier)
    rewritten = [note.split(":")[0] for note in conversion.notes]
    assert rewritten == ([] if back == "shape" else ["norm/Reshape (Reshape)", "norm/Reshape_1 (Reshape)"])
    rng = np.random.default_rng(6)
    for batch, size in ((1, NATIVE), (3, NATIVE), (2, (17, 23)), (2, (24, 24))):
        x = rng.standard_normal((batch, CHANNELS, *size)).astype(np.float32)
        out = run(conversion.model, x)
        assert out.shape == (batch, CLASSES, 1, 1)
        assert close(out[:, :, 0, 0], run(reference, x)), (batch, size)
    assert verify_onnx(classifier, conversion.model, conversion, sizes=[NATIVE, (17, 23)], batch=1).passed


def test_a_group_norm_before_a_flatten_head_gives_each_window_the_head_of_the_trunks_map(tmp_path):
    source = group_norm_graph(tmp_path / "model.onnx", back="constant", pooled=False)
    classifier = load_onnx_classifier(source)
    conversion = rewrite_onnx(classifier)
    x = np.random.default_rng(7).standard_normal((1, CHANNELS, 15, 17)).astype(np.float32)
    out = run(conversion.model, x)
    assert out.shape == (1, CLASSES, 4, 6)
    # the map as the model written with the map's Shape computes it at this size, and its own Gemm on each window
    reference = group_norm_graph(tmp_path / "reference.onnx", back="shape", pooled=False)
    trunk = any_size(reference)
    end = next(index for index, node in enumerate(trunk.graph.node) if node.output[0] == "a")
    del trunk.graph.node[end + 1 :], trunk.graph.output[:]
    trunk.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    features = run(trunk, x)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    expected = np.empty_like(out)
    for i in range(4):
        for j in range(6):
            window = features[:, :, i : i + MAP[1], j : j + MAP[2]].reshape(1, -1)
            expected[:, :, i, j] = window @ weights["fc.w"].T + weights["fc.b"]
    assert close(out, expected)
    assert verify_onnx(classifier, conversion.model, conversion, sizes=[NATIVE, (15, 17)], batch=1).passed


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("pooled", [False, True], ids=["flatten", "pooled"])
def test_a_torch_export_of_group_norm_converts_and_verifies(tmp_path, dynamo, pooled):
    source = tmp_path / "gn.onnx"
    export(seeded(GroupNormNet, pooled), source, dynamo)
    out = tmp_path / "gn.fcn.onnx"
    result = cli("convert", source, "-o", out, "--sizes", "16x16,21x25,32x32")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "FAIL" not in result.stdout
    x = torch.randn(2, CHANNELS, 21, 25)
    if pooled:  # the model itself reads any size: GroupNorm's statistics are over the whole map, as converted
        with torch.no_grad():
            expected = seeded(GroupNormNet, pooled)(x).numpy()
        assert close(run(out, x.numpy())[:, :, 0, 0], expected)
    else:
        assert run(out, x.numpy()).shape == (2, CLASSES, 6, 10)
