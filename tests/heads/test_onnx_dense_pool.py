"""ONNX in with --dense and --pool: the export is the PyTorch path's, verified against the input model's own graph."""

import contextlib
import io
import warnings

import custom_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from conftest import seeded
from onnx import helper, numpy_helper
from test_onnx_input import plain_graph
from typer.testing import CliRunner

from fcconv.cli import app
from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx
from fcconv.onnx_verify import verify_onnx

# name: (architecture, native input, verification sizes, the larger size both exports are run at); ResNet-18 is
# verified at its native size only, for time: the larger sizes' verification is the small model's
MODELS = {
    "resnet18": ("resnet18", (3, 224, 224), "224x224", (320, 320)),
    "normalized-pooled-head": ("custom_models:NormalizedPooledHead", (3, 32, 32), "32x32,41x37", (48, 56)),
}
OPTIONS = {"dense": ["--dense"], "dense-pool-avg": ["--dense", "--pool", "avg"], "pool-max": ["--pool", "max"]}
CASES = [(name, option) for name in MODELS for option in OPTIONS if (name, option) != ("resnet18", "pool-max")]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def run(path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def build(arch: str) -> torch.nn.Module:
    if arch == "resnet18":
        return seeded(torchvision.models.resnet18, weights=None, num_classes=10)
    return seeded(getattr(custom_models, arch.split(":")[1]))


def export_original(model: torch.nn.Module, path, input_shape) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *input_shape),), str(path), dynamo=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """For each model: its state_dict checkpoint and the original exported to ONNX at its native size."""
    folder = tmp_path_factory.mktemp("sources")
    paths = {}
    for name, (arch, input_shape, _, _) in MODELS.items():
        model = build(arch)
        torch.save(model.state_dict(), folder / f"{name}.pt")
        export_original(model, folder / f"{name}.onnx", input_shape)
        paths[name] = (folder / f"{name}.pt", folder / f"{name}.onnx")
    return paths


def converts(*args):
    result = cli("convert", *args)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "FAIL" not in result.stdout
    return result


@pytest.mark.parametrize("name,option", CASES)
def test_the_onnx_input_gives_the_pytorch_paths_export(sources, tmp_path, name, option):
    arch, input_shape, sizes, larger = MODELS[name]
    checkpoint, source = sources[name]
    shape = ",".join(map(str, input_shape))
    from_torch, from_onnx = tmp_path / "from_torch.onnx", tmp_path / "from_onnx.onnx"
    converts(checkpoint, "--arch", arch, "--input-shape", shape, "-o", from_torch, "--sizes", sizes, *OPTIONS[option])
    result = converts(source, "-o", from_onnx, "--sizes", sizes, *OPTIONS[option])
    assert "sliding window" in result.stdout
    if "--dense" in OPTIONS[option]:
        assert "the global avg pooling, dropped: a dense map" in result.stdout
    if "--pool" in OPTIONS[option]:
        assert "appended: global" in result.stdout

    x = np.random.default_rng(0).standard_normal((2, input_shape[0], *larger)).astype(np.float32)
    (expected,), (actual,) = run(from_torch, x), run(from_onnx, x)
    assert actual.shape == expected.shape
    assert expected.ndim == (2 if "--pool" in OPTIONS[option] else 4)
    assert np.abs(actual - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    torch_meta, onnx_meta = metadata(from_torch), metadata(from_onnx)
    for key in ("fcconv.dense", "fcconv.pool", "fcconv.mode", "fcconv.window", "fcconv.stride", "fcconv.num_classes"):
        assert onnx_meta[key] == torch_meta[key], key


def test_the_dense_map_is_the_head_at_each_position_and_its_mean_the_original(sources):
    """Independent of fcconv's reference: the head is not linear (LayerNorm, Tanh), so only a map that applies it
    at each position matches the head run by hand on each position's features; and ResNet's linear head makes the
    mean of the dense map the original's output at the native size."""
    _, source = sources["normalized-pooled-head"]
    classifier = load_onnx_classifier(source)
    conversion = rewrite_onnx(classifier, dense=True)
    assert conversion.geometry.dense and conversion.geometry.window == (1, 1)
    trunk = ort.InferenceSession(conversion.trunk.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 41, 37)).astype(np.float32)
    (features,) = trunk.run(None, {trunk.get_inputs()[0].name: x})
    model = torch.nn.Sequential(*list(build("custom_models:NormalizedPooledHead").classifier)[2:])
    with torch.no_grad():
        by_hand = model(torch.from_numpy(features).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).numpy()
    (dense,) = run_model(conversion.model, x)
    assert dense.shape == by_hand.shape == (1, 4, *features.shape[2:])
    assert np.abs(dense - by_hand).max() <= 1e-5

    _, resnet = sources["resnet18"]
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (original,), (dense,) = run(resnet, x), run_model(rewrite_onnx(load_onnx_classifier(resnet), dense=True).model, x)
    assert dense.shape == (1, 10, 7, 7)
    assert np.abs(dense.mean((2, 3)) - original).max() <= 1e-4 * max(1.0, float(np.abs(original).max()))


def run_model(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def channels_last_graph(path) -> None:
    """A Keras-style channels-last classifier: N×H×W×C in, a Transpose to N×C×H×W, a convolution, a Transpose back,
    a ReduceMean over H and W (the global pooling), then MatMul + Add, Relu, MatMul + Add."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "k1": rng.standard_normal((4, 6)).astype(np.float32), "b1": rng.standard_normal(6).astype(np.float32),
        "k2": rng.standard_normal((6, 5)).astype(np.float32), "b2": rng.standard_normal(5).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], name="input_to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Transpose", ["c"], ["nhwc"], name="conv_to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["nhwc"], ["pooled"], name="global_pool", axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["pooled", "k1"], ["m1"], name="dense/MatMul"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["a1"], ["r1"], name="dense/Relu"),
        helper.make_node("MatMul", ["r1", "k2"], ["m2"], name="scores/MatMul"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="scores/BiasAdd"),
    ]
    plain_graph(path, nodes, weights, input_dims=(1, 12, 10, 3))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_a_channels_last_model_pools_to_n_by_k_and_its_dense_map_stays_channels_last(tmp_path, pool):
    source = tmp_path / "keras.onnx"
    channels_last_graph(source)
    classifier = load_onnx_classifier(source)
    assert classifier.layout == "nhwc"
    dense, pooled = rewrite_onnx(classifier, dense=True), rewrite_onnx(classifier, dense=True, pool=pool)
    x = np.random.default_rng(3).standard_normal((2, 15, 13, 3)).astype(np.float32)
    (score_map,), (scores,) = run_model(dense.model, x), run_model(pooled.model, x)
    assert score_map.shape == (2, 13, 11, 5)  # (N, h, w, K) on the map of a 3×3 convolution
    assert scores.shape == (2, 5)
    reduced = score_map.mean((1, 2)) if pool == "avg" else score_map.max((1, 2))
    assert np.abs(scores - reduced).max() <= 1e-5 * max(1.0, float(np.abs(reduced).max()))
    for conversion, shape in ((dense, (2, 5, 13, 11)), (pooled, (2, 5))):
        report = verify_onnx(classifier, conversion.model, conversion, sizes=[(12, 10), (15, 13)])
        assert report.passed, report.checks
        assert report.checks[-1].output_shape == shape
    for options, mode in ((["--dense"], "map"), (["--dense", "--pool", pool], "pooled")):
        out = tmp_path / f"{mode}.onnx"
        converts(source, "-o", out, *options, "--sizes", "12x10,15x13")
        meta = metadata(out)
        assert meta["fcconv.num_classes"] == "5" and meta["fcconv.layout"] == "nhwc" and meta["fcconv.mode"] == mode
        checked = cli("check", out, "--sizes", "12x10,15x13")  # the probe output recorded is the converted model's
        assert checked.exit_code == 0, checked.stderr + checked.stdout


def test_pool_ends_each_of_several_outputs_with_its_own_pooling(tmp_path):
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "fc": rng.standard_normal((5, 320)).astype(np.float32)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["y"], ["p"], name="probabilities"),
    ]
    plain_graph(tmp_path / "two.onnx", nodes, weights, outputs=(("y", [1, 5]), ("p", [1, 5])))
    result = converts(tmp_path / "two.onnx", "--pool", "max", "--sizes", "12x10,15x13")
    assert "appended: global max pooling" in result.stdout
    converts(tmp_path / "two.onnx", "-o", tmp_path / "map.onnx", "--sizes", "12x10")
    x = np.random.default_rng(1).standard_normal((2, 3, 15, 13)).astype(np.float32)
    pooled, maps = run(tmp_path / "two.fcn.onnx", x), run(tmp_path / "map.onnx", x)
    assert [p.shape for p in pooled] == [(2, 5), (2, 5)]
    for scores, score_map in zip(pooled, maps):
        assert np.array_equal(scores, score_map.max((2, 3)))


def test_dense_on_a_head_without_a_global_pooling_changes_nothing_as_on_the_pytorch_path(tmp_path):
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "fc": rng.standard_normal((5, 320)).astype(np.float32)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1),
    ]
    plain_graph(tmp_path / "flat.onnx", nodes, weights)
    classifier = load_onnx_classifier(tmp_path / "flat.onnx")
    dense, plain = rewrite_onnx(classifier, dense=True), rewrite_onnx(classifier)
    assert dense.geometry.dense and dense.geometry.window == plain.geometry.window == (10, 8)
    assert dense.removed == plain.removed
    x = rng.standard_normal((1, 3, 15, 13)).astype(np.float32)
    assert np.array_equal(run_model(dense.model, x)[0], run_model(plain.model, x)[0])


def test_verify_reads_dense_and_pool_from_the_metadata_and_catches_a_changed_weight(sources, tmp_path):
    _, source = sources["normalized-pooled-head"]
    out = tmp_path / "dense.onnx"
    converts(source, "-o", out, "--sizes", "32x32", "--dense", "--pool", "avg")
    meta = metadata(out)
    assert meta["fcconv.dense"] == "true" and meta["fcconv.pool"] == "avg" and meta["fcconv.mode"] == "pooled"
    ok = cli("verify", out, "--reference", source, "--sizes", "32x32,41x37")
    assert ok.exit_code == 0, ok.stderr + ok.stdout
    assert "matches" in ok.stdout
    checked = cli("check", out, "--sizes", "32x32,41x37")
    assert checked.exit_code == 0, checked.stderr + checked.stdout

    model = onnx.load(str(out))
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4 and t.dims[2] == 1)
    values = numpy_helper.to_array(weight).copy()
    values.flat[3] += 0.25
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    bad = cli("verify", tampered, "--reference", source, "--sizes", "32x32,41x37")
    assert bad.exit_code == 1 and "does not match" in bad.stderr


def test_a_pool_that_is_not_avg_or_max_is_refused(sources):
    _, source = sources["normalized-pooled-head"]
    result = cli("convert", source, "--pool", "mean")
    assert result.exit_code == 2 and "--pool 'mean' is not avg or max" in result.stderr
    classifier = load_onnx_classifier(source)
    with pytest.raises(Exception, match="pool 'sum' is not avg or max"):
        rewrite_onnx(classifier, pool="sum")
