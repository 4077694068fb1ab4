"""Any number of spatial axes: 1D signal, 3D volume and video classifiers keep the contract of the 2D ones.

A Linear after the flatten of a (C, L) map is a Conv1d whose kernel is L, after a (C, D, H, W)
map a Conv3d whose kernel is D×H×W, and every later Linear a pointwise convolution of the same
rank. Checked here: the layers carried over around the head in each rank, a hand-written signal
(1×1000) and volume (1×64×64×64) classifier, torchvision's video classifiers, and the command
line with 1D and 3D models. The properties of generated classifiers, stated once for every rank,
are tests/contract/test_properties.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
import torchvision
from conftest import TESTS, seeded
from custom_models import SignalClassifier, VolumeClassifier
from generated_classifiers import CONV, POOL
from test_properties import assert_within_tolerance
from torch import nn

import fcconv
from fcconv.errors import NotConvertibleError
from fcconv.export import export_onnx
from fcconv.layers import ChannelLayerNorm
from fcconv.load import build_architecture, detect_architecture, load_model, native_input_shape
from fcconv.runtime import OnnxRunner

warnings.filterwarnings("ignore", category=UserWarning)

RANKS = (1, 3)
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
ADAPTIVE_POOL = {
    ("avg", 1): nn.AdaptiveAvgPool1d, ("max", 1): nn.AdaptiveMaxPool1d,
    ("avg", 3): nn.AdaptiveAvgPool3d, ("max", 3): nn.AdaptiveMaxPool3d,
}  # fmt: skip


def checks(report):
    return [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]


# --- the layers around the head, in 1D and 3D -------------------------------------------------------

NATIVE = {1: (2, 50), 3: (2, 13, 17, 17)}  # a stride-2 kernel-3 convolution makes these 24 and 6×8×8
FEATURES = {1: (24,), 3: (6, 8, 8)}
LARGER = {1: [(50,), (83,), (100,)], 3: [(13, 17, 17), (19, 21, 26), (26, 34, 34)]}


class PooledHead(nn.Module):
    """A strided convolution, then ``collapse`` (a pooling module + flatten, or a reduction), then ``head``."""

    def __init__(self, rank: int, pool: nn.Module | None, collapse: str, head: nn.Module) -> None:
        super().__init__()
        self.conv = CONV[rank](2, 6, 3, stride=2)
        self.pool = pool
        self.collapse = collapse
        self.head = head
        self.spatial = tuple(range(2, rank + 2))

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.collapse == "mean":
            return self.head(x.mean(self.spatial))
        if self.collapse == "amax":
            return self.head(torch.amax(x, dim=self.spatial))
        return self.head(torch.flatten(self.pool(x), 1))


def pooled_model(rank: int, pool: nn.Module | None, features: int, collapse: str = "flatten", classes: int = 4):
    head = nn.Sequential(nn.Linear(features, 10), nn.ReLU(), nn.Linear(10, classes))
    return seeded(PooledHead, rank, pool, collapse, head)


def verified(model, rank, conversion, converted=None):
    """Verified at the native size and the larger ones: ``conversion.module``, or ``converted`` (an export)."""
    converted = conversion.module if converted is None else converted
    report = fcconv.verify(model, converted, NATIVE[rank], sizes=LARGER[rank], conversion=conversion)
    assert report.passed, checks(report)
    return report


@pytest.mark.parametrize("rank", RANKS)
def test_adaptive_pooling_to_the_native_map_is_removed(rank):
    model = pooled_model(rank, ADAPTIVE_POOL["avg", rank](FEATURES[rank]), 6 * math.prod(FEATURES[rank]))
    conversion = fcconv.rewrite(model, NATIVE[rank])
    assert "pool (identity at the native size)" in conversion.removed
    assert conversion.layers[0].kernel == FEATURES[rank] and conversion.geometry.window == FEATURES[rank]
    verified(model, rank, conversion)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("rank", RANKS)
def test_adaptive_pooling_that_divides_becomes_the_fixed_pooling_of_the_same_rank(rank, kind):
    pooled = {1: (6,), 3: (3, 4, 2)}[rank]
    factor = tuple(f // p for f, p in zip(FEATURES[rank], pooled))
    model = pooled_model(rank, ADAPTIVE_POOL[kind, rank](pooled), 6 * math.prod(pooled))
    conversion = fcconv.rewrite(model, NATIVE[rank])
    pool = conversion.module.get_submodule("pool")
    assert type(pool) is POOL[kind, rank] and tuple(pool.kernel_size) == tuple(pool.stride) == factor
    assert conversion.layers[0].kernel == pooled
    assert conversion.geometry.window == FEATURES[rank] and conversion.geometry.stride == factor
    report = verified(model, rank, conversion)
    features = [tuple((s - 3) // 2 + 1 for s in size) for size in LARGER[rank]]
    positions = [tuple((f - w) // s + 1 for f, w, s in zip(fs, FEATURES[rank], factor)) for fs in features]
    assert [c.output_shape[2:] for c in report.checks if c.reference == "sliding window"] == positions


@pytest.mark.parametrize("rank", RANKS)
def test_adaptive_average_pooling_that_does_not_divide_is_folded_into_the_kernel(rank):
    pooled = {1: (5,), 3: (4, 3, 5)}[rank]
    model = pooled_model(rank, ADAPTIVE_POOL["avg", rank](pooled), 6 * math.prod(pooled))
    conversion = fcconv.rewrite(model, NATIVE[rank])
    assert conversion.layers[0].kernel == FEATURES[rank] and "adaptive pooling folded" in conversion.layers[0].note
    assert conversion.module.get_submodule("head.0").weight.shape == (10, 6, *FEATURES[rank])
    verified(model, rank, conversion)


@pytest.mark.parametrize("rank", RANKS)
def test_adaptive_max_pooling_that_does_not_divide_is_refused(rank):
    pooled = {1: (5,), 3: (4, 3, 5)}[rank]
    model = pooled_model(rank, ADAPTIVE_POOL["max", rank](pooled), 6 * math.prod(pooled))
    with pytest.raises(NotConvertibleError, match="does not divide evenly and is not linear") as refused:
        fcconv.rewrite(model, NATIVE[rank])
    assert refused.value.exit_code == 3


GLOBAL_POOLINGS = ["adaptive-avg", "adaptive-max", "mean", "amax"]


def global_pooled_model(rank: int, spelling: str):
    if spelling.startswith("adaptive"):
        return pooled_model(rank, ADAPTIVE_POOL[spelling[9:], rank](1), 6)
    return pooled_model(rank, None, 6, collapse=spelling)


@pytest.mark.parametrize("spelling", GLOBAL_POOLINGS)
@pytest.mark.parametrize("rank", RANKS)
def test_global_pooling_is_kept_by_default_and_dropped_with_dense(rank, spelling):
    model = global_pooled_model(rank, spelling)
    conversion = fcconv.rewrite(model, NATIVE[rank])
    assert conversion.geometry.window is None and conversion.layers[-1].kernel == (1,) * rank
    x = torch.randn(2, 2, *LARGER[rank][1])
    with torch.no_grad():
        pooled = conversion.module(x)
        assert pooled.shape == (2, 4, *(1,) * rank)
        assert_within_tolerance(pooled.flatten(1), model(x))
    verified(model, rank, conversion)

    dense = fcconv.rewrite(model, NATIVE[rank], dense=True)
    assert dense.geometry.window == (1,) * rank
    report = verified(model, rank, dense)
    features = [tuple((s - 3) // 2 + 1 for s in size) for size in LARGER[rank]]
    assert [c.output_shape[2:] for c in report.checks] == features


@pytest.mark.parametrize("rank", RANKS)
def test_average_pooled_dense_map_of_a_linear_head_averages_to_the_original(rank):
    model = seeded(PooledHead, rank, ADAPTIVE_POOL["avg", rank](1), "flatten", nn.Linear(6, 4))
    x = torch.randn(2, 2, *LARGER[rank][2])
    with torch.no_grad():
        dense_map = fcconv.convert(model, NATIVE[rank], dense=True)(x)
        pooled = fcconv.convert(model, NATIVE[rank], dense=True, pool="avg")(x)
        expected = model(x)
    assert dense_map.shape == (2, 4, *((s - 3) // 2 + 1 for s in LARGER[rank][2]))
    assert_within_tolerance(dense_map.mean(tuple(range(2, rank + 2))), expected)
    assert_within_tolerance(pooled, expected)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("rank", RANKS)
def test_pool_appends_a_global_pooling_of_the_score_map(rank, kind):
    model = pooled_model(rank, nn.Identity(), 6 * math.prod(FEATURES[rank]))
    conversion = fcconv.rewrite(model, NATIVE[rank], pool=kind)
    x = torch.randn(2, 2, *LARGER[rank][2])
    with torch.no_grad():
        scores = fcconv.convert(model, NATIVE[rank])(x)
        pooled = conversion.module(x)
    spatial = tuple(range(2, rank + 2))
    assert pooled.shape == (2, 4)
    assert_within_tolerance(pooled, scores.mean(spatial) if kind == "avg" else scores.amax(spatial))
    report = verified(model, rank, conversion)
    assert all(c.output_shape == (2, 4) for c in report.checks)


@pytest.mark.parametrize("rank", RANKS)
def test_batch_norm_prelu_and_softmax_of_the_head_act_on_each_position(rank):
    features = 6 * math.prod(FEATURES[rank])
    head = nn.Sequential(
        nn.Linear(features, 10, bias=False), nn.BatchNorm1d(10), nn.PReLU(), nn.Dropout(0.5),
        nn.Linear(10, 4), nn.LogSoftmax(dim=-1),
    )  # fmt: skip
    model = seeded(PooledHead, rank, nn.Identity(), "flatten", head)
    with torch.no_grad():
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    conversion = fcconv.rewrite(model, NATIVE[rank])
    assert type(conversion.module.get_submodule("head.1")) is BATCH_NORM[rank]
    assert conversion.module.get_submodule("head.5").dim == 1
    verified(model, rank, conversion)


@pytest.mark.parametrize("rank", RANKS)
def test_a_layer_norm_over_the_pooled_features_normalizes_each_positions_channels(rank):
    head = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = seeded(PooledHead, rank, ADAPTIVE_POOL["avg", rank](1), "flatten", head)
    conversion = fcconv.rewrite(model, NATIVE[rank], dense=True)
    assert isinstance(conversion.module.get_submodule("head.0"), ChannelLayerNorm)
    verified(model, rank, conversion)


class LinearGate(nn.Module):
    """A squeeze-and-excitation gate written with Linear layers, over the spatial axes of any rank."""

    def __init__(self, channels: int, rank: int) -> None:
        super().__init__()
        self.spatial = tuple(range(2, rank + 2))
        self.down = nn.Linear(channels, channels // 2)
        self.up = nn.Linear(channels // 2, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.up(torch.relu(self.down(x.mean(self.spatial)))))
        return x * gate.view(x.shape[0], x.shape[1], *(1,) * len(self.spatial))


@pytest.mark.parametrize("rank", RANKS)
def test_linear_squeeze_and_excitation_gates_become_pointwise_convolutions_of_the_rank(rank):
    trunk = nn.Sequential(CONV[rank](2, 6, 3, stride=2), nn.ReLU(), LinearGate(6, rank))
    model = seeded(nn.Sequential, trunk, ADAPTIVE_POOL["avg", rank](1), nn.Flatten(), nn.Linear(6, 4))
    conversion = fcconv.rewrite(model, NATIVE[rank])
    assert [layer.note for layer in conversion.trunk_layers] == ["squeeze-and-excitation gate"] * 2
    for name in ("0.2.down", "0.2.up"):
        assert isinstance(conversion.module.get_submodule(name), CONV[rank])
    verified(model, rank, conversion)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block in any rank: depthwise conv, permute to channels-last, LayerNorm, MLP, permute back."""

    def __init__(self, channels: int, rank: int) -> None:
        super().__init__()
        self.depthwise = CONV[rank](channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, 2 * channels)
        self.down = nn.Linear(2 * channels, channels)
        self.rank = rank

    def forward(self, x):
        y = self.depthwise(x).permute(0, *range(2, self.rank + 2), 1)
        y = self.down(nn.functional.gelu(self.up(self.norm(y))))
        return x + y.permute(0, self.rank + 1, *range(1, self.rank + 1))


@pytest.mark.parametrize("rank", RANKS)
def test_pointwise_turns_channels_last_linears_into_convolutions_of_the_rank(rank, tmp_path):
    trunk = nn.Sequential(CONV[rank](2, 6, 3, stride=2), ChannelsLastBlock(6, rank))
    model = seeded(nn.Sequential, trunk, ADAPTIVE_POOL["avg", rank](1), nn.Flatten(), nn.Linear(6, 4))
    kept = fcconv.analyze(model, NATIVE[rank])
    assert [layer.after for layer in kept.trunk_layers] == ["kept (per position)"] * 2
    conversion = fcconv.rewrite(model, NATIVE[rank], pointwise=True)
    assert [layer.note for layer in conversion.trunk_layers] == ["permutes removed"] * 2
    up = conversion.module.get_submodule("0.1.up")
    assert isinstance(up, CONV[rank]) and up.weight.shape == (12, 6, *(1,) * rank)
    assert isinstance(conversion.module.get_submodule("0.1.norm"), ChannelLayerNorm)
    verified(model, rank, conversion)
    path = export_onnx(conversion.module, tmp_path / "pointwise.onnx", NATIVE[rank])
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "MatMul" not in ops and "Gemm" not in ops and "Transpose" not in ops
    verified(model, rank, conversion, converted=path)


# --- a signal and a volume classifier with a flatten + Linear head -----------------------------------

CLASSIFIERS = {
    # name: (factory, native shape, sizes checked, the first Linear as a convolution, its kernel)
    "signal": (SignalClassifier, (1, 1000), [(1000,), (1301,), (2000,)], "Conv1d(32 → 64)", (31,)),
    "volume": (VolumeClassifier, (1, 64, 64, 64), [(64, 64, 64), (72, 80, 96)], "Conv3d(16 → 64)", (8, 8, 8)),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_signal_and_volume_classifiers_convert_and_their_exports_keep_the_contract(name, tmp_path):
    factory, shape, sizes, first, kernel = CLASSIFIERS[name]
    model = seeded(factory)
    rank = len(shape) - 1
    conversion = fcconv.rewrite(model, shape)
    assert (conversion.layers[0].after, conversion.layers[0].kernel) == (first, kernel)
    assert all(layer.kernel == (1,) * rank for layer in conversion.layers[1:])
    assert conversion.geometry.window == kernel
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, conversion=conversion)
    assert report.passed, checks(report)
    larger = report.checks[-1]
    assert all(s > 1 for s in larger.output_shape[2:]) and len(larger.output_shape) == rank + 2

    path = export_onnx(conversion.module, tmp_path / f"{name}.onnx", shape)
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    spatial_names = {1: ["length"], 3: ["depth", "height", "width"]}[rank]
    assert [d.dim_param for d in dims] == ["batch", "", *spatial_names] and dims[1].dim_value == shape[0]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "", *spatial_names]
    ops = {node.op_type for node in graph.node}
    assert not ops & {"Gemm", "MatMul", "Flatten", "Reshape"}
    exported = fcconv.verify(model, path, shape, sizes=sizes, conversion=conversion)
    assert exported.passed, checks(exported)
    assert [c.output_shape for c in exported.checks] == [c.output_shape for c in report.checks]


# the gemm format writes one slice per kernel cell: 31 for the signal's kernel, 512 for the volume's (slow to export)
@pytest.mark.parametrize("name, head_format", [("signal", "gemm"), ("volume", "conv")])
def test_exported_programs_of_signal_and_volume_classifiers_convert(name, head_format, tmp_path):
    factory, shape, sizes, first, kernel = CLASSIFIERS[name]
    model = seeded(factory)
    torch.export.save(torch.export.export(model, (torch.randn(1, *shape),)), tmp_path / f"{name}.pt2")
    loaded = load_model(tmp_path / f"{name}.pt2")
    assert loaded.input_shape == shape  # the program's example input
    conversion = fcconv.rewrite(loaded.module, loaded.input_shape)
    assert (conversion.layers[0].after, conversion.layers[0].kernel) == (first, kernel)
    path = export_onnx(conversion.module, tmp_path / f"{name}.onnx", shape, head_format=head_format)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("MatMul" in ops) == (head_format == "gemm")
    report = fcconv.verify(model, path, shape, sizes=sizes[:2], conversion=fcconv.analyze(model, shape))
    assert report.passed, checks(report)


# --- torchvision's video classifiers -------------------------------------------------------------------

VIDEO = {
    # name: (a longer clip with larger frames, the dense map there: one score per (t, y, x) position)
    "r3d_18": ((20, 128, 144), (3, 8, 9)),
    "mc3_18": ((20, 128, 144), (20, 8, 9)),  # its later stages do not stride in time
    "r2plus1d_18": ((20, 128, 144), (3, 8, 9)),
    "s3d": ((24, 256, 288), (2, 2, 3)),  # AvgPool3d(2×7×7) then a 1×1×1 convolution and a mean
}


@pytest.mark.parametrize("name", list(VIDEO))
def test_a_torchvision_video_classifier_converts_and_gives_a_score_per_clip_position_with_dense(name):
    larger, dense_map = VIDEO[name]
    shape = native_input_shape(name)
    assert shape == ((3, 16, 224, 224) if name == "s3d" else (3, 16, 112, 112))
    model = seeded(torchvision.models.get_model, name, weights=None, num_classes=10)
    conversion = fcconv.rewrite(model, shape)
    if name == "s3d":
        assert conversion.fully_convolutional
    else:
        assert [(layer.name, layer.after, layer.kernel) for layer in conversion.layers] == [
            ("fc", "Conv3d(512 → 10)", (1, 1, 1))
        ]
    report = fcconv.verify(model, conversion.module, shape, sizes=[shape[1:], larger], batch=1, conversion=conversion)
    assert report.passed, checks(report)
    assert {c.output_shape for c in report.checks} == {(1, 10, 1, 1, 1)}

    dense = fcconv.rewrite(model, shape, dense=True)
    report = fcconv.verify(model, dense.module, shape, sizes=[larger], batch=1, conversion=dense)
    assert report.passed, checks(report)
    assert report.checks[0].output_shape == (1, 10, *dense_map)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("mvit_v1_b", r"reads token 0 of a sequence of 393 tokens \(a class token\).*pos_encoding \(PositionalEncoding\)"
                      r" cannot take a 32×448×448 input"),
        ("mvit_v2_s", r"reads token 0 of a sequence of 393 tokens \(a class token\).*blocks\.0\.attn\.pool_k \(Pool\) "
                      r"cannot take a 32×448×448 input"),
        ("swin3d_t", r"features\.0\.0\.attn \(ShiftedWindowAttention3d\) calls .*shifted_window_attention_3d, whose "
                     r"window and shift are chosen in Python from the size of the map"),
        ("swin3d_s", r"shifted_window_attention_3d"),
        ("swin3d_b", r"shifted_window_attention_3d"),
    ],
)  # fmt: skip
def test_the_transformer_video_classifiers_are_refused_with_the_reason(name, reason):
    model = build_architecture(name, 10)  # on the meta device: shapes only, no weights and no real forward pass
    with pytest.raises(NotConvertibleError, match=reason) as refused:
        fcconv.analyze(model, native_input_shape(name))
    assert refused.value.exit_code == 3 and "\n" not in str(refused.value)


class ClassTokenReadout(nn.Module):
    """Patches as tokens with a class token in front, mixed by a softmax over the tokens; the head reads token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv3d(3, 8, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        tokens = tokens + (tokens.softmax(1) * tokens).sum(1, keepdim=True)
        return self.head(tokens[:, 0])


def test_a_class_token_readout_is_refused_even_where_its_layers_take_any_size():
    reason = r"reads token 0 of a sequence of 65 tokens .*: one token has no per-position reading"
    with pytest.raises(NotConvertibleError, match=reason) as refused:
        fcconv.analyze(seeded(ClassTokenReadout), (3, 16, 16, 16))
    assert refused.value.exit_code == 3


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t"])
def test_a_video_classifiers_state_dict_is_detected(name):
    state = build_architecture(name, 10).state_dict()  # meta tensors: keys and shapes only
    assert detect_architecture(state, f"{name}.pt") == name


# --- the command line with 1D and 3D models ---------------------------------------------------------


def run(*args, cwd=TESTS):
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_command_line_converts_a_signal_classifier_and_verifies_its_export(tmp_path):
    torch.save(seeded(SignalClassifier).state_dict(), tmp_path / "signal.pt")
    arch = ["--arch", "custom_models:SignalClassifier", "--input-shape", "1,1000"]
    converted = run("convert", tmp_path / "signal.pt", *arch, "--sizes", "1000,1301,2000")
    assert converted.returncode == 0, converted.stderr
    for text in ("fc1", "Linear(992 → 64)", "Conv1d(32 → 64)", "│ 31 ", "Conv1d(64 → 5)", "1301", "2×5×10", "ok"):
        assert text in converted.stdout, text
    assert "FAIL" not in converted.stdout
    exported = tmp_path / "signal.fcn.onnx"
    dims = onnx.load(str(exported)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "length"]
    assert OnnxRunner(exported).metadata["fcconv.input_shape"] == "1,1000"

    checked = run("verify", exported, "--reference", tmp_path / "signal.pt", *arch[:2], "--sizes", "1000,1500")
    assert checked.returncode == 0, checked.stderr
    assert "1500" in checked.stdout and "matches" in checked.stdout


def test_the_command_line_inspects_and_converts_a_volume_classifier(tmp_path):
    torch.save(seeded(VolumeClassifier).state_dict(), tmp_path / "volume.pt")
    arch = ["--arch", "custom_models:VolumeClassifier", "--input-shape", "1,64,64,64"]
    inspected = run("inspect", tmp_path / "volume.pt", *arch)
    assert inspected.returncode == 0, inspected.stderr
    for text in ("16×8×8×8", "Linear(8192 → 64)", "Conv3d(16 → 64), kernel 8×8×8", "64×1×1×1", "kernel 1×1×1"):
        assert text in inspected.stdout, text
    assert "reads a 8×8×8 window of the 16×8×8×8 feature map, every 1×1×1 cells" in inspected.stdout

    converted = run("convert", tmp_path / "volume.pt", *arch, "--sizes", "64x64x64,72x80x96")
    assert converted.returncode == 0, converted.stderr
    assert "72×80×96" in converted.stdout and "2×3×2×3×5" in converted.stdout
    dims = onnx.load(str(tmp_path / "volume.fcn.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "depth", "height", "width"]


def test_inspect_takes_an_input_shape_of_the_models_rank_and_refuses_another(tmp_path):
    torch.save(seeded(SignalClassifier).state_dict(), tmp_path / "signal.pt")
    arch = ["--arch", "custom_models:SignalClassifier"]
    inspected = run("inspect", tmp_path / "signal.pt", *arch, "--input-shape", "1,1000")
    assert inspected.returncode == 0, inspected.stderr
    for text in ("32×31", "Conv1d(32 → 64), kernel 31", "64×1", "Conv1d(64 → 5), kernel 1"):
        assert text in inspected.stdout, text
    assert "reads a 31 window of the 32×31 feature map, every 1 cells" in inspected.stdout
    wrong_rank = run("inspect", tmp_path / "signal.pt", *arch, "--input-shape", "1,32,32")
    assert wrong_rank.returncode == 2 and "cannot take an input of shape 1×32×32" in wrong_rank.stderr
    five_axes = run("inspect", tmp_path / "signal.pt", *arch, "--input-shape", "1,4,4,4,4")
    assert five_axes.returncode == 2 and "C,L or C,H,W or C,D,H,W" in five_axes.stderr


def test_a_video_classifier_is_named_by_its_torchvision_name_on_the_command_line(tmp_path):
    torch.save(seeded(torchvision.models.video.mc3_18, num_classes=10).state_dict(), tmp_path / "mc3.pt")
    inspected = run("inspect", tmp_path / "mc3.pt", "--arch", "mc3_18", "--dense")
    assert inspected.returncode == 0, inspected.stderr
    assert "Conv3d(512 → 10), kernel 1×1×1" in inspected.stdout
    # the native 16×112×112 clip gives a 16×7×7 map (mc3 strides in space only after its stem): a score per position
    assert "a 1×1×1 window of the 512×16×7×7 feature map" in inspected.stdout


TINY_SWIN3D = {"patch_size": [2, 4, 4], "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "window_size": [2, 2, 2]}


def test_the_command_line_refuses_a_video_swin_with_exit_code_3(tmp_path):
    factory = (
        "from torchvision.models.video.swin_transformer import SwinTransformer3d\n\n"
        f"def build():\n    return SwinTransformer3d(**{TINY_SWIN3D!r}, num_classes=4)\n"
    )
    (tmp_path / "tiny_swin3d.py").write_text(factory)
    swin3d = torchvision.models.video.swin_transformer.SwinTransformer3d
    torch.save(seeded(swin3d, **TINY_SWIN3D, num_classes=4).state_dict(), tmp_path / "swin3d.pt")
    result = run("convert", "swin3d.pt", "--arch", "tiny_swin3d:build", "--input-shape", "3,4,32,32", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("fcconv: error:") and result.stderr.count("\n") == 1
    assert "shifted_window_attention_3d" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["swin3d.pt", "tiny_swin3d.py"]
