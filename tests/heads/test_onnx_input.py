"""ONNX in: classifiers exported by others are rewritten on their graph, verified in onnxruntime, or refused."""

import contextlib
import hashlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import seeded
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from fcconv.cli import app

SIZES = "16x16,21x25,32x32"  # native, a larger non-square size, twice the native size


class SmallNet(nn.Module):
    """Unpadded conv trunk (stride 2), a flatten by view, Linear–ReLU–Dropout–Linear, softmax."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU())
        self.fc1 = nn.Linear(8 * 5 * 5, 16, bias=bias)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return torch.softmax(self.fc2(self.drop(torch.relu(self.fc1(x)))), dim=1)


class PooledNet(nn.Module):
    """A global average pooling, torch.flatten and one Linear, as ResNet ends."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ShuffledTrunk(nn.Module):
    """A channel shuffle inside the trunk: its reshapes are exported with the native size written in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


class SharedZeroBiases(nn.Module):
    """Zero-initialized biases of equal size, as VGG's and EfficientNet's: the TorchScript exporter stores one and
    reads the other through an Identity node; and a scale by a constant, written as a Constant node."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.fc1, self.fc2, self.fc3 = nn.Linear(8 * 5 * 5, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))) * 0.5)


class ChunkedTrunk(nn.Module):
    """A ShuffleNet V2 unit: the TorchScript exporter writes x.chunk(2, dim=1) as Slices whose ends it computes
    with Div, which onnx's shape inference does not follow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        left, right = x.chunk(2, dim=1)
        x = torch.cat((left, self.branch(right)), dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


class LinearGate(nn.Module):
    """A squeeze-and-excitation gate written with Linear layers (SENet): a collapse the trunk reads back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.fc = nn.Linear(8 * 14 * 14, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c = x.shape[:2]
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3))))))
        return self.fc(torch.flatten(x * gate.view(n, c, 1, 1), 1))


class ShuffleThenFlatten(nn.Module):
    """A channel shuffle right before the flatten: its reshapes and transpose are read into the first kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 14 * 14, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.flatten(x, 1))


class ConvClassifier(nn.Module):
    """SqueezeNet's ending: a convolution to the classes, a global pooling and a flatten, with no Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


def export(model: nn.Module, path, dynamo: bool, **kwargs) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=dynamo, **kwargs)


TORCH_MODELS = {  # name: (model, score map at 21×25)
    "flatten-gemm": (SmallNet, (3, 5)),
    "flatten-matmul": (lambda: SmallNet(bias=False), (3, 5)),
    "pooled": (PooledNet, (1, 1)),
    "shuffled-trunk": (ShuffledTrunk, (4, 6)),  # a 9×11 map read in 6×6 windows
    "shared-zero-biases": (SharedZeroBiases, (3, 5)),
    "chunked-trunk": (ChunkedTrunk, (3, 5)),  # a 9×11 map read in 7×7 windows
    "no-linear": (ConvClassifier, (1, 1)),
    "shuffle-then-flatten": (ShuffleThenFlatten, (6, 10)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every torch model exported with the TorchScript exporter and with the dynamo exporter, plus a free batch."""
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for name, (factory, _) in TORCH_MODELS.items():
        for dynamo in (False, True):
            path = folder / f"{name}-{'dynamo' if dynamo else 'torchscript'}.onnx"
            export(seeded(factory), path, dynamo)
            paths[path.stem] = path
    path = folder / "shuffled-trunk-free-batch.onnx"
    export(seeded(ShuffledTrunk), path, False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    paths[path.stem] = path
    return paths


# --- graphs written the way Keras and TensorFlow exports are, with onnx.helper ----------------------

NATIVE = (3, 12, 10)  # non-square, so that a mixed-up height and width cannot pass
MAP = (4, 10, 8)  # after the 3×3 convolution
HIDDEN, CLASSES = 16, 5


def keras_style(path, *, pooled=False, flatten="Reshape", opset=13, hidden=None, before_first=None, perm=(0, 2, 3, 1)):
    """NCHW trunk, Transpose to NHWC, Flatten or Reshape (or a ReduceMean over H, W), MatMul + Add layers, softmax.

    ``hidden`` adds a node after the first MatMul + Add (by op type); ``before_first`` one between the
    flatten and the first MatMul. Returns the first MatMul's (in, out) weight.
    """
    rng = np.random.default_rng(0)
    channels, height, width = MAP
    features = channels if pooled else channels * height * width
    weights = {
        "conv.w": rng.standard_normal((channels, NATIVE[0], 3, 3)).astype(np.float32),
        "conv.b": rng.standard_normal(channels).astype(np.float32),
        "dense.kernel": rng.standard_normal((features, HIDDEN)).astype(np.float32) / 8,
        "dense.bias": rng.standard_normal(HIDDEN).astype(np.float32),
        "dense_1.kernel": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32) / 4,
        "dense_1.bias": rng.standard_normal(CLASSES).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input_1", "conv.w", "conv.b"], ["conv"], name="conv2d", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"], name="conv2d/Relu"),
        helper.make_node("Transpose", ["relu"], ["nhwc"], name="conv2d/Relu__6", perm=list(perm)),
    ]
    if pooled:
        nodes.append(helper.make_node("ReduceMean", ["nhwc"], ["flat"], name="global_pool", axes=[1, 2], keepdims=0))
    elif flatten == "Reshape":
        weights["flatten/shape"] = np.array([-1, features], np.int64)
        nodes.append(helper.make_node("Reshape", ["nhwc", "flatten/shape"], ["flat"], name="flatten/Reshape"))
    else:
        nodes.append(helper.make_node("Flatten", ["nhwc"], ["flat"], name="flatten/Flatten", axis=1))
    first_in = "flat"
    if before_first == "LayerNormalization":
        weights["window_norm.gamma"] = np.ones(features, np.float32)
        weights["window_norm.beta"] = np.zeros(features, np.float32)
        nodes.append(helper.make_node("LayerNormalization", ["flat", "window_norm.gamma", "window_norm.beta"],
                                      ["normed"], name="window_norm", axis=-1))  # fmt: skip
        first_in = "normed"
    nodes += [
        helper.make_node("MatMul", [first_in, "dense.kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense.bias"], ["biased"], name="dense/BiasAdd"),
    ]
    hidden_out = "biased"
    if hidden == "PRelu":
        weights["p_re_lu.alpha"] = rng.uniform(0.05, 0.3, HIDDEN).astype(np.float32)
        nodes.append(helper.make_node("PRelu", ["biased", "p_re_lu.alpha"], ["hidden"], name="p_re_lu"))
        hidden_out = "hidden"
    elif hidden == "LayerNormalization":
        weights["layer_norm.gamma"] = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
        weights["layer_norm.beta"] = rng.standard_normal(HIDDEN).astype(np.float32)
        nodes.append(helper.make_node("LayerNormalization", ["biased", "layer_norm.gamma", "layer_norm.beta"],
                                      ["hidden"], name="layer_norm", axis=-1))  # fmt: skip
        hidden_out = "hidden"
    elif hidden == "mixing Reshape":
        weights["mixing/shape"] = np.array([-1, 4, 4], np.int64)
        weights["unmixing/shape"] = np.array([-1, HIDDEN], np.int64)
        nodes += [
            helper.make_node("Reshape", ["biased", "mixing/shape"], ["grid"], name="mixing_reshape"),
            helper.make_node("Transpose", ["grid"], ["grid_t"], name="grid_transpose", perm=[0, 2, 1]),
            helper.make_node("Reshape", ["grid_t", "unmixing/shape"], ["hidden"], name="unmixing_reshape"),
        ]
        hidden_out = "hidden"
    nodes += [
        helper.make_node("Relu", [hidden_out], ["act"], name="dense/Relu"),
        helper.make_node("MatMul", ["act", "dense_1.kernel"], ["mm_1"], name="dense_1/MatMul"),
        helper.make_node("Add", ["mm_1", "dense_1.bias"], ["logits"], name="dense_1/BiasAdd"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="dense_1/Softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "keras_style",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__6", *NATIVE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["unk__7", CLASSES])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return weights["dense.kernel"]


# --- helpers ---------------------------------------------------------------------------------------


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_on_crops(path, x: np.ndarray, native: tuple[int, int], stride: int, positions: tuple[int, int]) -> np.ndarray:
    """The input model on every native-size crop of ``x``, one sample at a time: (N, K, h, w)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    for sample in x:
        grid = [
            [
                session.run(None, {name: sample[None, :, i * stride : i * stride + native[0], j * stride : j * stride + native[1]]})[0][0]
                for j in range(positions[1])
            ]
            for i in range(positions[0])
        ]  # fmt: skip
        rows.append(np.array(grid).transpose(2, 0, 1))
    return np.stack(rows)


def assert_fully_convolutional(path) -> None:
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Flatten", "Gemm", "MatMul"}, ops
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 4
        assert dims[0].dim_param
    assert all(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[2:])


def converts(source, out, *args):
    """Convert ``source`` at the three sizes with the CLI; the input is left as it was."""
    before = digest(source)
    result = cli("convert", source, "-o", out, "--sizes", SIZES, *args)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert digest(source) == before
    for size in ("16×16", "21×25", "32×32"):
        assert size in result.stdout
    assert "FAIL" not in result.stdout and out.is_file()
    return result


# --- the promises ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_a_torch_export_converts_verifies_and_has_free_height_and_width(exported, tmp_path, name, exporter):
    source = exported[f"{name}-{exporter}"]
    out = tmp_path / "converted.onnx"
    result = converts(source, out)
    assert "ok" in result.stdout and "wrote" in result.stdout
    assert_fully_convolutional(out)
    x = np.random.default_rng(1).standard_normal((2, 3, 21, 25)).astype(np.float32)
    scores = run_onnx(out, x)
    assert scores.shape == (2, 5, *TORCH_MODELS[name][1])


def test_a_classifier_with_no_gemm_is_said_to_be_fully_convolutional_already(exported, tmp_path):
    result = converts(exported["no-linear-dynamo"], tmp_path / "converted.onnx")
    assert "already fully convolutional: the head holds no Gemm or MatMul" in result.stdout
    assert "rewritten layers" not in result.stdout


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_squeeze_and_excitation_gate_written_with_linear_layers_stays_in_the_trunk(tmp_path, dynamo):
    source = tmp_path / "gated.onnx"
    export(seeded(LinearGate), source, dynamo)
    result = converts(source, tmp_path / "gated.fcn.onnx")
    assert "Gemm(1568 → 5)" in result.stdout and "14×14" in result.stdout
    model = onnx.load(str(tmp_path / "gated.fcn.onnx"))
    linear = [node for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    assert len(linear) == 2  # the gate's two layers, on the pooled (N, C) vector
    x = np.random.default_rng(4).standard_normal((3, 3, 21, 25)).astype(np.float32)
    assert run_onnx(tmp_path / "gated.fcn.onnx", x).shape == (3, 5, 6, 10)


def test_a_free_batch_export_with_its_shape_arithmetic_converts(exported, tmp_path):
    result = converts(exported["shuffled-trunk-free-batch"], tmp_path / "converted.onnx")
    assert "Conv(8 → 5)" not in result.stdout  # the shuffle stays in the trunk, before conv2
    assert_fully_convolutional(tmp_path / "converted.onnx")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_score_map_equals_the_input_model_run_on_every_crop(exported, tmp_path, exporter):
    """An oracle that does not use fcconv's own reference: the unpadded trunk makes each position one crop."""
    source = exported[f"flatten-gemm-{exporter}"]
    out = tmp_path / "converted.onnx"
    converts(source, out)
    x = np.random.default_rng(2).standard_normal((2, 3, 21, 25)).astype(np.float32)
    scores = run_onnx(out, x)
    crops = run_on_crops(source, x, (16, 16), stride=2, positions=(3, 5))
    assert scores.shape == crops.shape == (2, 5, 3, 5)
    assert np.abs(scores - crops).max() <= 1e-4 * np.abs(crops).max()


def test_a_trunk_reshape_written_for_the_native_size_is_made_size_free(exported, tmp_path):
    result = converts(exported["shuffled-trunk-torchscript"], tmp_path / "converted.onnx")
    assert "trunk: /Reshape (Reshape)" in result.stdout and "trunk: /Reshape_1 (Reshape)" in result.stdout
    x = np.random.default_rng(3).standard_normal((3, 3, 21, 25)).astype(np.float32)
    assert run_onnx(tmp_path / "converted.onnx", x).shape == (3, 5, 4, 6)


@pytest.mark.parametrize(
    ("flatten", "perm"),
    [("Reshape", (0, 2, 3, 1)), ("Flatten", (0, 2, 3, 1)), ("Flatten", (0, 3, 2, 1))],
    ids=["hwc-reshape", "hwc-flatten", "whc-flatten"],
)
def test_a_permuted_flatten_gives_the_first_kernel_its_weight_reordered(tmp_path, flatten, perm):
    source = tmp_path / "keras.onnx"
    dense_kernel = keras_style(source, flatten=flatten, perm=perm)
    out = tmp_path / "keras.fcn.onnx"
    result = cli("convert", source, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "12×10" in result.stdout and "15×15" in result.stdout and "24×20" in result.stdout  # default sizes
    assert "FAIL" not in result.stdout
    model = onnx.load(str(out))
    assert "Transpose" not in {node.op_type for node in model.graph.node}
    first = next(node for node in model.graph.node if node.name == "dense/MatMul")
    assert first.op_type == "Conv"
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    channels, height, width = MAP
    sizes = {1: channels, 2: height, 3: width}
    # the MatMul's rows are in the transposed map's order, e.g. (h, w, c): row (h·W + w)·C + c
    flattened = dense_kernel.T.reshape(HIDDEN, *(sizes[axis] for axis in perm[1:]))
    expected = flattened.transpose(0, *(1 + perm[1:].index(axis) for axis in (1, 2, 3)))
    assert np.array_equal(weights[first.input[1]], expected)
    row = {(0, 2, 3, 1): (5 * width + 3) * channels + 2, (0, 3, 2, 1): (3 * height + 5) * channels + 2}[perm]
    assert weights[first.input[1]][7, 2, 5, 3] == dense_kernel[row, 7]  # channel 2 at (h, w) = (5, 3)
    assert_fully_convolutional(out)


@pytest.mark.parametrize(
    "variant",
    [
        {"pooled": True},
        {"hidden": "PRelu"},
        {"hidden": "LayerNormalization", "opset": 17},
        {"flatten": "Flatten", "opset": 11},  # softmax then flattens from its axis: moved channels-last around it
    ],
    ids=["pooled", "prelu", "layernorm-over-features", "opset-11"],
)
def test_keras_style_heads_convert_and_verify(tmp_path, variant):
    source = tmp_path / "keras.onnx"
    keras_style(source, **variant)
    out = tmp_path / "keras.fcn.onnx"
    before = digest(source)
    result = cli("convert", source, "-o", out, "--sizes", "12x10,15x13,24x21")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert digest(source) == before and "FAIL" not in result.stdout
    assert_fully_convolutional(out)


@pytest.mark.parametrize(
    ("variant", "node", "op"),
    [
        ({"hidden": "mixing Reshape"}, "mixing_reshape", "Reshape"),
        ({"before_first": "LayerNormalization", "opset": 17}, "window_norm", "LayerNormalization"),
    ],
    ids=["reshape-mixing-features", "layernorm-over-the-window"],
)
def test_a_head_node_without_a_per_position_form_exits_3_naming_it(tmp_path, variant, node, op):
    source = tmp_path / "keras.onnx"
    keras_style(source, **variant)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("convert", source)
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{node} ({op})" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_trunk_reshape_that_splits_a_growing_axis_exits_3_naming_it(tmp_path):
    """A softmax over positions written with reshapes: (N, C, H·W) back to (N, C, H, W) has no size-free form."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "to_rows": np.array([1, 4, 80], np.int64),
        "to_map": np.array([1, 4, 10, 8], np.int64),
        "fc": rng.standard_normal((5, 320)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Reshape", ["c", "to_rows"], ["rows"], name="to_rows"),
        helper.make_node("Softmax", ["rows"], ["attention"], name="spatial_softmax", axis=2),
        helper.make_node("Reshape", ["attention", "to_map"], ["map"], name="back_to_map"),
        helper.make_node("Flatten", ["map"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *NATIVE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    source = tmp_path / "spatial.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(source))
    result = cli("convert", source)
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "back_to_map (Reshape)" in lines[0] and "size-free" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spatial.onnx"]


def plain_graph(path, nodes, weights, *, outputs=(("y", [1, 5]),), input_dims=(1, *NATIVE)) -> None:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def refused_graphs():
    """Graphs that are classifiers at their native size but not fully convolutional: (nodes, weights, node named)."""
    rng = np.random.default_rng(0)
    conv = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    fc = {"fc": rng.standard_normal((5, 320)).astype(np.float32)}
    head = [
        helper.make_node("Flatten", ["map"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    return {
        "a crop to the native size": (
            [
                helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
                helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["map"], name="crop"),
                *head,
            ],
            {**conv, **fc, "starts": np.array([0, 0], np.int64), "ends": np.array([10, 8], np.int64),
             "axes": np.array([2, 3], np.int64)},
            "crop (Slice)",
        ),
        "a position table of the native size": (
            [
                helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
                helper.make_node("Add", ["c", "positions"], ["map"], name="add_positions"),
                *head,
            ],
            {**conv, **fc, "positions": rng.standard_normal((1, 4, 10, 8)).astype(np.float32)},
            "add_positions (Add)",
        ),
        "a sum over the positions": (
            [
                helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
                helper.make_node("ReduceSum", ["c", "spatial"], ["summed"], name="sum_positions", keepdims=0),
                helper.make_node("Gemm", ["summed", "fc4"], ["y"], name="fc", transB=1),
            ],
            {**conv, "spatial": np.array([2, 3], np.int64), "fc4": rng.standard_normal((5, 4)).astype(np.float32)},
            "sum_positions (ReduceSum)",
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(refused_graphs()))
def test_a_trunk_or_collapse_with_no_size_free_form_exits_3_naming_the_node(tmp_path, case):
    nodes, weights, named = refused_graphs()[case]
    source = tmp_path / "model.onnx"
    plain_graph(source, nodes, weights)
    result = cli("convert", source)
    assert result.exit_code == 3, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_several_outputs_and_a_channels_last_input_convert(tmp_path):
    """Two outputs, one the other's input, each (N, K, h, w); a channels-last input stays N×H×W×C, its output
    (N, h, w, K). tests/heads/test_keras_onnx.py holds the Keras-style graphs in full."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "fc": rng.standard_normal((5, 320)).astype(np.float32)}  # fmt: skip
    two_outputs = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["y"], ["p"], name="probabilities"),
    ]
    plain_graph(tmp_path / "two.onnx", two_outputs, weights, outputs=(("y", [1, 5]), ("p", [1, 5])))
    channels_last = [
        helper.make_node("Transpose", ["x"], ["nchw"], name="input_to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    plain_graph(tmp_path / "nhwc.onnx", channels_last, weights, input_dims=(1, 12, 10, 3))
    x = np.random.default_rng(1).standard_normal((2, 3, 15, 13)).astype(np.float32)
    for name, given, shapes in (
        ("two", x, {"y": (2, 5, 4, 4), "p": (2, 5, 4, 4)}),
        ("nhwc", x.transpose(0, 2, 3, 1), {"y": (2, 4, 4, 5)}),
    ):
        result = cli("convert", tmp_path / f"{name}.onnx", "--sizes", "12x10,15x13")
        assert result.exit_code == 0, (name, result.stderr + result.stdout)
        session = ort.InferenceSession(str(tmp_path / f"{name}.fcn.onnx"), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"x": np.ascontiguousarray(given)})
        assert {o.name: out.shape for o, out in zip(session.get_outputs(), outputs)} == shapes


def test_a_free_size_input_asks_for_the_native_size_and_converts_with_it(tmp_path):
    source = tmp_path / "free.onnx"
    export(seeded(SmallNet), source, False, input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    refused = cli("convert", source)
    assert refused.exit_code == 2
    assert "--input-shape" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.onnx"]
    converts(source, tmp_path / "free.fcn.onnx", "--input-shape", "3,16,16")


def test_a_model_that_is_not_a_classifier_gets_a_clear_exit_code(tmp_path):
    segmenter = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])],
        "segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        initializer=[numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")],
    )
    onnx.save(helper.make_model(segmenter, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "seg.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07\x12\x03abc" + bytes(range(200)))
    cases = {"seg.onnx": (3, "not N×classes"), "broken.onnx": (2, "broken.onnx")}
    for name, (code, text) in cases.items():
        result = cli("convert", tmp_path / name)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == code, (name, result.stderr)
        assert len(lines) == 1 and text in lines[0], (name, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "seg.onnx"]


def test_options_for_pytorch_models_are_refused_for_onnx(exported):
    result = cli("convert", exported["pooled-torchscript"], "--arch", "resnet18")
    assert result.exit_code == 2 and "--arch does not apply to an ONNX model" in result.stderr


def test_verify_against_the_onnx_classifier_accepts_the_export_and_rejects_a_tampered_one(exported, tmp_path):
    source = exported["flatten-gemm-dynamo"]
    out = tmp_path / "converted.onnx"
    converts(source, out)
    ok = cli("verify", out, "--reference", source, "--sizes", "16x16,19x23")
    assert ok.exit_code == 0, ok.stderr
    assert "19×23" in ok.stdout and "matches" in ok.stdout

    model = onnx.load(str(out))
    first = next(node for node in model.graph.node if node.op_type == "Conv" and node.name == "node_linear")
    weight = next(t for t in model.graph.initializer if t.name == first.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[3, 2, 4, 1] += 0.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    bad = cli("verify", tampered, "--reference", source, "--sizes", "16x16,19x23")
    assert bad.exit_code == 1
    assert "FAIL" in bad.stdout and "does not match" in bad.stderr


def test_the_export_records_what_verify_and_check_read(exported, tmp_path):
    source = exported["flatten-gemm-torchscript"]
    out = tmp_path / "converted.onnx"
    converts(source, out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fcconv.input_shape"] == "3,16,16"
    assert meta["fcconv.window"] == "5,5" and meta["fcconv.stride"] == "1,1"
    assert meta["fcconv.dense"] == "false" and meta["fcconv.pool"] == "none"
    assert meta["fcconv.source_sha256"] == digest(source)
    assert meta["fcconv.version"]
    first, second = tmp_path / "again.onnx", tmp_path / "again2.onnx"
    converts(source, first)
    converts(source, second)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_export_passes_check_with_its_grid_and_weights_recorded_and_fails_it_when_tampered(
    exported, tmp_path, exporter
):
    out = tmp_path / "converted.onnx"
    converts(exported[f"flatten-gemm-{exporter}"], out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    # SmallNet: 3×3 conv, 2×2 max pooling, 3×3 conv (unpadded), then a 5×5 window: 16 = 2·(5 + 2) + 2
    assert meta["fcconv.total_stride"] == "2,2" and meta["fcconv.receptive_field"] == "16,16"
    assert meta["fcconv.num_classes"] == "5" and meta["fcconv.mode"] == "map"
    checked = cli("check", out, "--sizes", SIZES)
    assert checked.exit_code == 0, checked.stderr + checked.stdout
    assert "skipped" not in checked.stdout and "as predicted" in checked.stdout

    model = onnx.load(str(out))
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    values = numpy_helper.to_array(weight).copy()
    values.flat[7] += 0.25
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    failed = cli("check", tampered, "--sizes", SIZES)
    assert failed.exit_code == 1
    assert f"initializer {weight.name!r} changed since export" in failed.stdout.replace("\n", "")


def test_verify_reads_dense_from_the_exports_metadata_for_an_onnx_reference(exported, tmp_path):
    """A pooled export whose metadata is changed to say --dense is checked as a dense map, which it is not."""
    source = exported["pooled-dynamo"]
    out = tmp_path / "converted.onnx"
    converts(source, out)
    model = onnx.load(str(out))
    for entry in model.metadata_props:
        if entry.key == "fcconv.dense":
            entry.value = "true"
    dense = tmp_path / "dense.onnx"
    onnx.save(model, str(dense))
    result = cli("verify", dense, "--reference", source, "--sizes", SIZES)
    assert result.exit_code == 1, result.stderr + result.stdout
    assert "FAIL" in result.stdout  # the dense reference is a map, the pooled export N×K×1×1
    assert f"{dense} does not match {source}" in result.stderr.replace("\n", "")
    assert "does not apply" not in result.stderr


def test_inspect_lists_the_head_of_an_onnx_classifier(exported):
    result = cli("inspect", exported["flatten-gemm-torchscript"])
    assert result.exit_code == 0, result.stderr
    for text in ("/fc1/Gemm", "8×5×5", "Gemm(200 → 16)", "Conv(8 → 16), kernel 5×5", "a 5×5 window"):
        assert text in result.stdout
