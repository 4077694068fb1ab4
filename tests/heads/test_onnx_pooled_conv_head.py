"""A head that pools and then acts on the pooled N×C×1×1 map, as PP-LCNet and MobileNetV3 end (paddle2onnx and
torch exports): global pooling → 1×1 Conv with bias → activation → Flatten → Gemm. Everything after the pooling
acts on each position, so the head converts exactly, keeping the pooling (or dropping it with --dense); a
squeeze-and-excitation pooling inside the trunk is not the head's."""

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

CHANNELS, NATIVE, CLASSES = 3, (16, 16), 5
WIDTH, HEAD = 8, 12  # the trunk's channels and the 1×1 head conv's


def lcnet_graph(path, *, pool="GlobalAveragePool", act="HardSwish", flatten="Flatten", linear="Gemm", after=None):
    """A paddle2onnx-style PP-LCNet: -1 batch, a trunk with a squeeze-and-excitation block, then the pooled 1×1
    conv head. ``after`` puts a node that acts across positions between the pooling and the head conv."""
    rng = np.random.default_rng(3)
    weights = {}

    def weight(name, *shape, scale=3.0):
        weights[name] = (rng.standard_normal(shape) / scale).astype(np.float32)
        return name

    nodes = [
        helper.make_node("Conv", ["x", weight("c1.w", WIDTH, CHANNELS, 3, 3), weight("c1.b", WIDTH)], ["c1"],
                         name="conv1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["a1"], name="hardswish1"),
        # the squeeze-and-excitation block: a pooling whose gate is multiplied back onto the map
        helper.make_node("GlobalAveragePool", ["a1"], ["se_pooled"], name="se_pool"),
        helper.make_node("Conv", ["se_pooled", weight("se1.w", 2, WIDTH, 1, 1), weight("se1.b", 2)], ["se1"],
                         name="se_conv1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["se1"], ["se_relu"], name="se_relu"),
        helper.make_node("Conv", ["se_relu", weight("se2.w", WIDTH, 2, 1, 1), weight("se2.b", WIDTH)], ["se2"],
                         name="se_conv2", kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["se2"], ["se_gate"], name="se_gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["a1", "se_gate"], ["gated"], name="se_mul"),
        helper.make_node("Conv", ["gated", weight("c2.w", WIDTH, WIDTH, 3, 3), weight("c2.b", WIDTH)], ["c2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
    ]  # fmt: skip
    if pool == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["a2"], ["pooled"], name="pool2d_0"))
    else:
        nodes.append(helper.make_node("ReduceMean", ["a2"], ["pooled"], name="pool2d_0", axes=[2, 3], keepdims=1))
    head_in = "pooled"
    if after == "Pad":
        weights["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
        nodes.append(helper.make_node("Pad", ["pooled", "pads"], ["padded"], name="pad_0"))
        head_in = "padded"
    kernel, pads = ((3, 3), [1, 1, 1, 1]) if after == "3x3" else ((1, 1), [0, 0, 0, 0])
    nodes.append(
        helper.make_node("Conv", [head_in, weight("head.w", HEAD, WIDTH, *kernel), weight("head.b", HEAD)], ["hc"],
                         name="conv2d_head", kernel_shape=list(kernel), pads=pads)
    )  # fmt: skip
    if act == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["hc"], ["ha"], name="hardswish_head"))
    elif act == "Mul":  # hard_swish as paddle2onnx writes it for older opsets: x · HardSigmoid(x)
        nodes += [
            helper.make_node("HardSigmoid", ["hc"], ["hs"], name="hardsigmoid_head", alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["hc", "hs"], ["ha"], name="hardswish_head"),
        ]
    else:
        nodes.append(helper.make_node("Relu", ["hc"], ["ha"], name="relu_head"))
    features = HEAD * 9 if after == "Pad" else HEAD
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["ha"], ["flat"], name="flatten_0", axis=1))
    else:
        weights["flat.shape"] = np.array([-1, features], np.int64)
        nodes.append(helper.make_node("Reshape", ["ha", "flat.shape"], ["flat"], name="flatten_0"))
    weights["fc.w"] = (rng.standard_normal((CLASSES, features)) / 2).astype(np.float32)
    weights["fc.b"] = rng.standard_normal(CLASSES).astype(np.float32)
    if linear == "Gemm":
        nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="linear_0", transB=1))
    else:
        weights["fc.w"] = np.ascontiguousarray(weights["fc.w"].T)
        nodes += [
            helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="linear_0"),
            helper.make_node("Add", ["mm", "fc.b"], ["scores"], name="linear_0/add"),
        ]
    graph = helper.make_graph(
        nodes,
        "pp_lcnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, CHANNELS, *NATIVE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [-1, CLASSES])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="paddle2onnx")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run(model, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def any_size(path) -> onnx.ModelProto:
    """The input model with its height and width free, so that onnxruntime runs it at any size."""
    model = onnx.load(str(path))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    return model


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


VARIANTS = {
    "hardswish-flatten-gemm": {},
    "reducemean-mul-hardsigmoid-reshape-matmul": {"pool": "ReduceMean", "act": "Mul", "flatten": "Reshape",
                                                  "linear": "MatMul"},
    "relu": {"act": "Relu"},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_pooled_1x1_conv_head_keeps_the_pooling_and_equals_the_input_model_at_every_size(tmp_path, variant):
    source = lcnet_graph(tmp_path / "lcnet.onnx", **VARIANTS[variant])
    classifier = load_onnx_classifier(source)
    conversion = rewrite_onnx(classifier)
    ops = [node.op_type for node in conversion.model.graph.node]
    assert not {"Gemm", "MatMul", "Flatten"} & set(ops), ops
    assert ops.count("GlobalAveragePool") == 2  # the squeeze-and-excitation block's and the head's, kept
    assert [layer.name for layer in conversion.layers] == ["conv2d_head", "linear_0"]
    # the input model runs at any size itself (its pooling reads the whole map): the converted one must agree
    rng = np.random.default_rng(7)
    for size in (NATIVE, (23, 29), (32, 32)):
        x = rng.standard_normal((3, CHANNELS, *size)).astype(np.float32)
        out = run(conversion.model, x)
        assert out.shape == (3, CLASSES, 1, 1)
        assert close(out[:, :, 0, 0], run(any_size(source), x)), size
    assert verify_onnx(classifier, conversion.model, conversion, sizes=[NATIVE, (23, 29)], batch=3).passed


def test_a_pooled_1x1_conv_head_gives_a_dense_map_of_each_positions_scores(tmp_path):
    source = lcnet_graph(tmp_path / "lcnet.onnx")
    classifier = load_onnx_classifier(source)
    conversion = rewrite_onnx(classifier, dense=True)
    assert [node.op_type for node in conversion.model.graph.node].count("GlobalAveragePool") == 1  # the SE's
    x = np.random.default_rng(8).standard_normal((2, CHANNELS, 23, 29)).astype(np.float32)
    out = run(conversion.model, x)
    assert out.shape == (2, CLASSES, 12, 15)  # the stride-2 map, each position scored
    # the input model's own trunk and head, cut out of it: the head on each position's 1×1 map
    onnx.save(any_size(source), str(tmp_path / "any_size.onnx"))
    onnx.utils.extract_model(str(tmp_path / "any_size.onnx"), str(tmp_path / "trunk.onnx"), ["x"], ["a2"])
    onnx.utils.extract_model(str(tmp_path / "any_size.onnx"), str(tmp_path / "head.onnx"), ["a2"], ["scores"])
    features = run(tmp_path / "trunk.onnx", x)
    expected = np.stack(
        [np.stack([run(tmp_path / "head.onnx", features[:, :, i : i + 1, j : j + 1]) for j in range(15)], -1)
         for i in range(12)], -2,
    )  # fmt: skip
    assert close(out, expected)
    assert verify_onnx(classifier, conversion.model, conversion, sizes=[NATIVE, (23, 29)], batch=2).passed


class TorchLCNet(nn.Module):
    """timm's LCNet and MobileNetV3 ending, with a squeeze-and-excitation block in the trunk."""

    def __init__(self, mean_pool: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTH, 3, stride=2, padding=1), nn.Hardswish())
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(WIDTH, 2, 1), nn.ReLU(), nn.Conv2d(2, WIDTH, 1), nn.Hardsigmoid()
        )
        self.conv = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.ReLU())
        self.mean_pool = mean_pool
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(WIDTH, HEAD, 1)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(HEAD, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv(x * self.se(x))
        x = x.mean((2, 3), keepdim=True) if self.mean_pool else self.pool(x)
        return self.fc(torch.flatten(self.drop(self.act(self.conv_head(x))), 1))


@pytest.mark.parametrize("mean_pool", [False, True], ids=["adaptive-pool", "mean-keepdim"])
def test_a_torch_export_of_a_pooled_1x1_conv_head_converts_and_verifies(tmp_path, mean_pool):
    source = tmp_path / "lcnet.onnx"
    axes = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}
    export(seeded(TorchLCNet, mean_pool), source, False, input_names=["x"], output_names=["y"], dynamic_axes=axes)
    out = tmp_path / "lcnet.fcn.onnx"
    result = cli("convert", source, "-o", out, "--input-shape", "3,16,16", "--sizes", "16x16,23x29,32x32")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "FAIL" not in result.stdout and "Conv 1×1(8 → 12)" in result.stdout
    x = np.random.default_rng(9).standard_normal((2, CHANNELS, 23, 29)).astype(np.float32)
    assert close(run(out, x)[:, :, 0, 0], run(source, x))


@pytest.mark.parametrize(
    ("after", "named", "reason"),
    [("3x3", "conv2d_head (Conv)", "3×3 kernel"), ("Pad", "pad_0 (Pad)", "no exact per-position equivalent")],
    ids=["3x3-conv-after-the-pooling", "pad-after-the-pooling"],
)
def test_a_pooled_head_that_is_not_per_position_is_refused_naming_its_node_not_a_trunk_pooling(
    tmp_path, after, named, reason
):
    source = lcnet_graph(tmp_path / "lcnet.onnx", after=after)
    result = cli("convert", source)
    assert result.exit_code == 3, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and reason in lines[0], result.stderr
    assert "se_pool" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lcnet.onnx"]
