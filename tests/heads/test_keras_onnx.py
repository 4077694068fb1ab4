"""ONNX from Keras and TensorFlow: a channels-last input, MatMul + Add, PRelu, a softmax over the last axis and
several outputs convert into a model that keeps the input's layout, every output (N, h, w, K)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fcconv.cli import app
from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx, truncate_onnx_classifier
from fcconv.onnx_verify import verify_onnx

HEIGHT, WIDTH, CHANNELS = 14, 12, 3  # native input, non-square so that mixed-up axes cannot pass
STRIDE = 2  # the trunk: a 3×3 convolution, a 2×2 max pooling, a 3×3 convolution, all unpadded
MAP = (6, 4, 3)  # (C, h, w) of the feature map at the native size
HIDDEN, CLASSES, BOX = 16, 5, 4
SIZES = [(HEIGHT, WIDTH), (19, 17), (2 * HEIGHT, 2 * WIDTH)]  # native, a larger odd non-square one, twice


def keras_graph(path, *, batch=None, slope="per feature", window_norm=False, opset=13):
    """The graph keras2onnx and tf2onnx write for a small two-headed classifier, built with onnx.helper.

    input_1 (N×H×W×3) → Transpose to NCHW → Conv, Relu, MaxPool, Conv, Relu → Transpose back to NHWC →
    Flatten → dense (MatMul + Add) → PRelu → class_scores (MatMul + Add + Softmax over the last axis) and
    boxes (MatMul + Add).
    """
    rng = np.random.default_rng(7)
    channels, height, width = MAP
    features = channels * height * width
    weights = {
        "conv2d/kernel": rng.standard_normal((4, CHANNELS, 3, 3)).astype(np.float32) / 2,
        "conv2d/bias": rng.standard_normal(4).astype(np.float32) / 4,
        "conv2d_1/kernel": rng.standard_normal((channels, 4, 3, 3)).astype(np.float32) / 3,
        "conv2d_1/bias": rng.standard_normal(channels).astype(np.float32) / 4,
        "dense/kernel": rng.standard_normal((features, HIDDEN)).astype(np.float32) / 6,
        "dense/bias": rng.standard_normal(HIDDEN).astype(np.float32),
        "p_re_lu/alpha": (rng.uniform(0.05, 0.3, HIDDEN) if slope == "per feature" else np.array([0.2])).astype(
            np.float32
        ),
        "class_scores/kernel": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32) / 3,
        "class_scores/bias": rng.standard_normal(CLASSES).astype(np.float32),
        "boxes/kernel": rng.standard_normal((HIDDEN, BOX)).astype(np.float32) / 3,
        "boxes/bias": rng.standard_normal(BOX).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], name="input_1/transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv2d/kernel", "conv2d/bias"], ["c1"], name="conv2d", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv2d/Relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="max_pooling2d", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv", ["p1", "conv2d_1/kernel", "conv2d_1/bias"], ["c2"], name="conv2d_1", kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="conv2d_1/Relu"),
        helper.make_node("Transpose", ["r2"], ["nhwc"], name="conv2d_1/Relu__6", perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["flat"], name="flatten/Flatten", axis=1),
    ]
    first = "flat"
    if window_norm:
        weights["window_norm/gamma"] = np.ones(features, np.float32)
        weights["window_norm/beta"] = np.zeros(features, np.float32)
        nodes.append(helper.make_node("LayerNormalization", ["flat", "window_norm/gamma", "window_norm/beta"],
                                      ["normed"], name="window_norm", axis=-1))  # fmt: skip
        first = "normed"
    nodes += [
        helper.make_node("MatMul", [first, "dense/kernel"], ["dense_mm"], name="dense/MatMul"),
        helper.make_node("Add", ["dense_mm", "dense/bias"], ["dense_out"], name="dense/BiasAdd"),
        helper.make_node("PRelu", ["dense_out", "p_re_lu/alpha"], ["hidden"], name="p_re_lu"),
        helper.make_node("MatMul", ["hidden", "class_scores/kernel"], ["cs_mm"], name="class_scores/MatMul"),
        helper.make_node("Add", ["cs_mm", "class_scores/bias"], ["cs_logits"], name="class_scores/BiasAdd"),
        helper.make_node("Softmax", ["cs_logits"], ["class_scores"], name="class_scores/Softmax", axis=-1),
        helper.make_node("MatMul", ["hidden", "boxes/kernel"], ["box_mm"], name="boxes/MatMul"),
        helper.make_node("Add", ["box_mm", "boxes/bias"], ["boxes"], name="boxes/BiasAdd"),
    ]
    n = "unk__12" if batch is None else batch
    graph = helper.make_graph(
        nodes,
        "keras_two_heads",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [n, HEIGHT, WIDTH, CHANNELS])],
        [
            helper.make_tensor_value_info("class_scores", TensorProto.FLOAT, [n, CLASSES]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [n, BOX]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run(model, x: np.ndarray) -> dict[str, np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def exposing(path, names) -> onnx.ModelProto:
    """The model at ``path`` with tensors ``names`` as its outputs (to read its hidden tensors)."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    return model


def run_on_crops(model, x: np.ndarray, positions: tuple[int, int]) -> dict[str, np.ndarray]:
    """The input model on every native-size crop of the NHWC input ``x``: each output as (N, h, w, K).

    Position (i, j) of an unpadded trunk of total stride s reads rows i·s to i·s + H and columns j·s to j·s + W.
    """
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    grids = {output: [] for output in names}
    for sample in x:
        cells = {output: [[None] * positions[1] for _ in range(positions[0])] for output in names}
        for i in range(positions[0]):
            for j in range(positions[1]):
                crop = sample[None, i * STRIDE : i * STRIDE + HEIGHT, j * STRIDE : j * STRIDE + WIDTH]
                for output, value in zip(names, session.run(names, {name: crop})):
                    cells[output][i][j] = value[0]
        for output in names:
            grids[output].append(np.array(cells[output]))
    return {output: np.stack(grids[output]) for output in names}


def positions(size: tuple[int, int]) -> tuple[int, int]:
    """The score map's size: (size - native) / stride + 1 per axis."""
    return ((size[0] - HEIGHT) // STRIDE + 1, (size[1] - WIDTH) // STRIDE + 1)


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    return keras_graph(tmp_path_factory.mktemp("keras") / "two_heads.onnx")


@pytest.fixture(scope="module")
def converted(keras_model):
    classifier = load_onnx_classifier(keras_model)
    return classifier, rewrite_onnx(classifier)


# --- the promises ----------------------------------------------------------------------------------


def test_a_channels_last_input_is_read_as_its_native_size_and_kept(keras_model, converted):
    classifier, conversion = converted
    assert classifier.layout == "nhwc" and classifier.input_shape == (CHANNELS, HEIGHT, WIDTH)
    assert conversion.layout == "nhwc"
    model = conversion.model
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "input_1"
    assert dims[3].dim_value == CHANNELS and all(d.dim_param for d in dims[:3])
    assert model.graph.node[0].op_type == "Transpose"  # the input's Transpose to NCHW opens the trunk
    assert not {node.op_type for node in model.graph.node} & {"MatMul", "Gemm", "Flatten"}


def test_every_output_keeps_its_name_and_order_and_is_n_h_w_k(converted):
    _, conversion = converted
    model = conversion.model
    assert [o.name for o in model.graph.output] == ["class_scores", "boxes"]
    assert [(o.name, o.classes) for o in conversion.outputs] == [("class_scores", CLASSES), ("boxes", BOX)]
    x = np.random.default_rng(1).standard_normal((2, 19, 17, CHANNELS)).astype(np.float32)
    out = run(model, x)
    assert out["class_scores"].shape == (2, *positions((19, 17)), CLASSES)
    assert out["boxes"].shape == (2, *positions((19, 17)), BOX)
    assert np.allclose(out["class_scores"].sum(-1), 1, atol=1e-5)  # the softmax is over each position's classes


@pytest.mark.parametrize("size", SIZES, ids=["native", "odd-non-square", "twice"])
def test_each_output_equals_the_input_model_run_on_every_crop(keras_model, converted, size):
    """An oracle that does not use fcconv's references: at the native size the input model's own output, larger
    the input model on every native-size crop of the input."""
    _, conversion = converted
    x = np.random.default_rng(2).standard_normal((2, *size, CHANNELS)).astype(np.float32)
    out = run(conversion.model, x)
    expected = run_on_crops(keras_model, x, positions(size))
    for name in ("class_scores", "boxes"):
        assert close(out[name], expected[name]), name
    if size == SIZES[0]:
        native = run(keras_model, x)
        for name in ("class_scores", "boxes"):
            assert close(out[name][:, 0, 0], native[name]), name


def test_the_verification_compares_every_output_at_every_size(keras_model, converted):
    classifier, conversion = converted
    report = verify_onnx(classifier, conversion.model, conversion, sizes=SIZES)
    assert report.passed
    readings = {(check.input_size, check.reference, check.output) for check in report.checks}
    for name in ("class_scores", "boxes"):
        assert ((HEIGHT, WIDTH), "original", name) in readings
        for size in SIZES:
            assert (size, "sliding window", name) in readings
    boxes = next(
        c for c in report.checks if (c.reference, c.output, c.input_size) == ("sliding window", "boxes", (19, 17))
    )
    assert boxes.output_shape == (2, BOX, *positions((19, 17)))


def test_the_original_head_gives_every_output_for_one_window(converted):
    _, conversion = converted
    window = np.random.default_rng(3).standard_normal((1, *MAP)).astype(np.float32)
    out = run(conversion.head, window)
    assert out["class_scores"].shape == (1, CLASSES) and out["boxes"].shape == (1, BOX)


def test_logits_drops_the_softmax_and_the_map_holds_the_raw_scores(keras_model):
    classifier = truncate_onnx_classifier(load_onnx_classifier(keras_model), logits=True)
    conversion = rewrite_onnx(classifier)
    assert [o.name for o in conversion.model.graph.output] == ["class_scores", "boxes"]
    assert "Softmax" not in {node.op_type for node in conversion.model.graph.node}
    x = np.random.default_rng(4).standard_normal((1, 19, 17, CHANNELS)).astype(np.float32)
    out = run(conversion.model, x)
    expected = run_on_crops(exposing(keras_model, ["cs_logits", "boxes"]), x, positions((19, 17)))
    assert close(out["class_scores"], expected["cs_logits"]) and close(out["boxes"], expected["boxes"])
    assert verify_onnx(classifier, conversion.model, conversion, sizes=SIZES[:2]).passed


@pytest.mark.parametrize("until", ["p_re_lu", "hidden"], ids=["node-name", "tensor-name"])
def test_until_ends_the_model_at_the_hidden_features(keras_model, until):
    classifier = truncate_onnx_classifier(load_onnx_classifier(keras_model), until=until)
    conversion = rewrite_onnx(classifier)
    assert [o.name for o in conversion.model.graph.output] == ["hidden"]
    x = np.random.default_rng(5).standard_normal((2, 2 * HEIGHT, 2 * WIDTH, CHANNELS)).astype(np.float32)
    out = run(conversion.model, x)["hidden"]
    expected = run_on_crops(exposing(keras_model, ["hidden"]), x, positions((2 * HEIGHT, 2 * WIDTH)))["hidden"]
    assert out.shape == (2, *positions((2 * HEIGHT, 2 * WIDTH)), HIDDEN) and close(out, expected)
    assert verify_onnx(classifier, conversion.model, conversion, sizes=SIZES[:2]).passed


def test_logits_on_raw_scores_and_until_outside_the_head_exit_2_saying_why(tmp_path, keras_model):
    raw = tmp_path / "raw.onnx"
    onnx.save(truncate_onnx_classifier(load_onnx_classifier(keras_model), until="boxes").model, str(raw))
    refused = cli("convert", raw, "--logits")
    assert refused.exit_code == 2
    assert "boxes ends in boxes/BiasAdd (Add)" in refused.stderr, refused.stderr
    unknown = cli("convert", keras_model, "--until", "conv2d_1")
    assert unknown.exit_code == 2
    for accepted in ("dense/MatMul", "p_re_lu", "hidden", "class_scores/Softmax", "boxes"):
        assert accepted in unknown.stderr, unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.onnx"]


@pytest.mark.parametrize("batch", [None, 1], ids=["free-batch", "fixed-batch"])
def test_the_cli_converts_verifies_and_records_the_layout(tmp_path, batch):
    source = keras_graph(tmp_path / "keras.onnx", batch=batch)
    out = tmp_path / "keras.fcn.onnx"
    result = cli("convert", source, "-o", out, "--sizes", "14x12,19x17,28x24")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "FAIL" not in result.stdout and out.is_file()
    for text in ("class_scores", "boxes", "sliding window", "19×17", "(h, w, c)", "channels-last"):
        assert text in result.stdout, text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fcconv.layout"] == "nhwc" and meta["fcconv.logits"] == "false" and "fcconv.until" not in meta
    assert meta["fcconv.input_shape"] == "3,14,12" and meta["fcconv.num_classes"] == str(CLASSES)
    assert meta["fcconv.total_stride"] == "2,2" and meta["fcconv.receptive_field"] == "14,12"
    again = cli("verify", out, "--reference", source, "--sizes", "14x12,17x15")
    assert again.exit_code == 0, again.stderr + again.stdout


def test_check_reads_the_channels_last_export_and_every_output(tmp_path, keras_model):
    out = tmp_path / "keras.fcn.onnx"
    assert cli("convert", keras_model, "-o", out, "--sizes", "14x12,19x17").exit_code == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fcconv.output_channels"] == f"class_scores:{CLASSES},boxes:{BOX}"
    report = tmp_path / "check.json"
    result = cli("check", out, "--json", report)
    assert result.exit_code == 0, result.stderr + result.stdout
    checks = json.loads(report.read_text())["models"][0]["checks"]
    compared = {c["output"]: c for c in checks if c["check"] == "reference output"}
    assert set(compared) == {"class_scores", "boxes"} and all(c["verdict"] == "pass" for c in compared.values())
    sizes = [c for c in checks if c["check"] == "output size" and c["output"] == "boxes"]
    assert len(sizes) == 3 and all(c["actual_shape"] == [2, BOX, *positions(tuple(c["input_size"]))] for c in sizes)

    model = onnx.load(str(out))
    bias = next(t for t in model.graph.initializer if t.name == "boxes/kernel_bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1, bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    assert cli("check", tampered, "--json", report).exit_code == 1
    failed = {(c["check"], c["output"]) for c in json.loads(report.read_text())["models"][0]["checks"]
              if c["verdict"] == "fail"}  # fmt: skip
    assert failed == {("weights digest", None), ("reference output", "boxes")}


def test_the_cli_records_logits_and_until_and_verify_reads_them_back(tmp_path, keras_model):
    for args, logits, until in ((["--logits"], "true", None), (["--until", "p_re_lu"], "false", "p_re_lu")):
        out = tmp_path / f"cut-{logits}.onnx"
        result = cli("convert", keras_model, "-o", out, "--sizes", "14x12,19x17", *args)
        assert result.exit_code == 0, result.stderr + result.stdout
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert meta["fcconv.logits"] == logits and meta.get("fcconv.until") == until
        again = cli("verify", out, "--reference", keras_model, "--sizes", "14x12,17x15")
        assert again.exit_code == 0, again.stderr + again.stdout


def test_inspect_shows_the_layout_every_branch_and_what_until_accepts(keras_model):
    result = cli("inspect", keras_model)
    assert result.exit_code == 0, result.stderr
    text = result.stdout.replace("\n", " ")
    for shown in (
        "channels-last",
        "output class_scores (5): dense/MatMul (MatMul)",
        "class_scores/Softmax (Softmax)",
        "output boxes (4):",
        "p_re_lu (PRelu)",
        "(h, w, c)",
        "--until accepts:",
        "MatMul(72 → 16)",
    ):
        assert shown in text, shown


def test_a_single_prelu_slope_carries_over_per_position(tmp_path):
    source = keras_graph(tmp_path / "keras.onnx", slope="one")
    result = cli("convert", source, "--sizes", "14x12,19x17")
    assert result.exit_code == 0, result.stderr + result.stdout


def test_a_normalization_over_the_flattened_window_exits_3_naming_it(tmp_path):
    source = keras_graph(tmp_path / "keras.onnx", window_norm=True, opset=17)
    result = cli("convert", source)
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "window_norm (LayerNormalization)" in lines[0], result.stderr
    assert "normalizes over the flattened window" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keras.onnx"]


def test_heatmap_reads_a_channels_last_export_channels_first(tmp_path, keras_model):
    from PIL import Image

    from fcconv.heatmap import load_dense_model, score_map

    out = tmp_path / "keras.fcn.onnx"
    assert cli("convert", keras_model, "-o", out, "--sizes", "14x12,19x17").exit_code == 0
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 26, 3), dtype=np.uint8))
    scores = score_map(load_dense_model(out), picture)
    assert scores.probabilities.shape == (CLASSES, *positions((30, 26)))
