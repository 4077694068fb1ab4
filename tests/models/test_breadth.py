"""Beyond VGG and ResNet: what the rewriter does with the rest of torchvision's classifiers.

Each conversion is checked against the original at its native size and against the
sliding-window reading at two larger sizes; models that cannot be made fully
convolutional are refused with exit code 3 and a reason that names what prevents it.
The ConvNeXt and Swin cases use torchvision's own classes in small configurations
(the same layers and code paths as convnext_tiny and swin_t, at a fraction of the cost).
"""

import os
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
import torchvision
from conftest import REPO, TESTS, seeded
from custom_models import LeNet, MeanPooled, NormalizedPooledHead, SENet, small_convnext, small_swin, small_swin_v2
from torch import nn

import fcconv
from fcconv.errors import NotConvertibleError
from fcconv.export import export_onnx
from fcconv.layers import ChannelLayerNorm, ChannelsLastPointwiseConv2d, PointwiseConv2d
from fcconv.load import build_architecture, native_input_shape
from fcconv.runtime import OnnxRunner

warnings.filterwarnings("ignore", category=UserWarning)


def checks(report):
    return [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]


def assert_verified(model, converted, shape, conversion, sizes=None):
    """Native size (against the original itself) and two larger sizes (against the sliding-window reading)."""
    report = fcconv.verify(model, converted, shape, sizes=sizes, batch=1, conversion=conversion)
    assert report.passed, checks(report)
    assert len({c.input_size for c in report.checks}) >= 3
    return report


def onnx_ops(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def reshaped_floats(path):
    """The Reshape nodes of the export whose input is a float tensor (by ONNX shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return [
        n.name for n in model.graph.node if n.op_type == "Reshape" and types.get(n.input[0]) != onnx.TensorProto.INT64
    ]


def consumers(path, tensor_name):
    return [node.op_type for node in onnx.load(str(path)).graph.node if tensor_name in node.input]


# --- ConvNeXt: LayerNorm2d → Flatten → Linear after the global pooling ------------------------


@pytest.fixture(scope="module")
def convnext():
    return seeded(small_convnext)


def test_convnext_head_converts_with_its_channel_norm_kept_on_the_pooled_map(convnext):
    conversion = fcconv.rewrite(convnext, (3, 64, 64))
    assert [layer.name for layer in conversion.layers] == ["classifier.2"]
    assert conversion.geometry.window is None  # the global pooling is kept: (N, K, 1, 1) at any size
    assert_verified(convnext, conversion.module, (3, 64, 64), conversion)


def test_convnext_dense_map_applies_the_norm_and_linear_at_every_position(convnext):
    conversion = fcconv.rewrite(convnext, (3, 64, 64), dense=True)
    report = fcconv.verify(convnext, conversion.module, (3, 64, 64), batch=1, conversion=conversion)
    assert report.passed, checks(report)
    assert report.checks[-1].output_shape == (1, 10, 8, 8)  # 128×128: stem 4, two downsamplings


def test_the_zoo_convnext_is_analysed_like_the_small_one():
    model = build_architecture("convnext_tiny")
    conversion = fcconv.analyze(model, (3, 224, 224))
    assert [layer.name for layer in conversion.layers] == ["classifier.2"]
    pointwise = [layer.name for layer in conversion.trunk_layers]
    assert len(pointwise) == 36 and "features.1.0.block.3" in pointwise and "features.7.2.block.5" in pointwise


# --- --pointwise: per-position Linear layers of the trunk as 1×1 convolutions -----------------


def test_pointwise_convnext_blocks_lose_their_permutes_and_export_without_matmul(convnext, tmp_path):
    conversion = fcconv.rewrite(convnext, (3, 64, 64), pointwise=True)
    module = conversion.module
    assert isinstance(module.get_submodule("features.1.0.block.3"), PointwiseConv2d)
    assert isinstance(module.get_submodule("features.1.0.block.2"), ChannelLayerNorm)
    assert all(layer.note == "permutes removed" for layer in conversion.trunk_layers)
    permutes = [n for n in module.graph.nodes if getattr(n.target, "__name__", n.target) == "permute"]
    original = fcconv.analyze(convnext, (3, 64, 64)).module.graph.nodes
    before = [n for n in original if getattr(n.target, "__name__", n.target) == "permute"]
    assert len(before) - len(permutes) == 2 * 3  # one pair per block
    path = export_onnx(module, tmp_path / "convnext.onnx", (3, 64, 64))
    ops = onnx_ops(path)
    assert "MatMul" not in ops and "Gemm" not in ops
    assert consumers(path, "features.1.0.block.3.weight") == ["Conv"]
    assert_verified(convnext, path, (3, 64, 64), conversion)


def test_pointwise_keeps_the_state_dict_keys(convnext):
    module = fcconv.convert(convnext, (3, 64, 64), pointwise=True)
    keys = set(module.state_dict())
    assert "features.1.0.block.3.weight" in keys and "features.1.0.block.2.weight" in keys
    assert module.state_dict()["features.1.0.block.3.weight"].shape == (64, 16, 1, 1)


# --- Swin: channels-last trunk, norm and permute before the pooling ---------------------------


@pytest.fixture(scope="module")
def swin():
    return seeded(small_swin)


def test_swin_converts_and_its_export_matches_at_larger_sizes(swin, tmp_path):
    # torchvision's window attention decides from the map's size whether to shift (not at 224×224's
    # last 7×7 stage); the conversion computes that decision in a form the export keeps per size.
    conversion = fcconv.rewrite(swin, (3, 224, 224))
    assert [layer.name for layer in conversion.layers] == ["head"]
    assert any("shifted_window_attention" in note for note in conversion.notes)
    path = export_onnx(conversion.module, tmp_path / "swin.onnx", (3, 224, 224))
    assert_verified(swin, path, (3, 224, 224), conversion)


def test_swin_pointwise_mlps_become_convolutions_on_the_channels_last_map(swin, tmp_path):
    conversion = fcconv.rewrite(swin, (3, 224, 224), pointwise=True)
    names = [layer.name for layer in conversion.trunk_layers]
    assert "features.1.0.mlp.0" in names and "features.2.reduction" in names
    assert isinstance(conversion.module.get_submodule("features.1.0.mlp.0"), ChannelsLastPointwiseConv2d)
    path = export_onnx(conversion.module, tmp_path / "swin.onnx", (3, 224, 224))
    for name in names:
        assert consumers(path, f"{name}.weight") == ["Conv"], name
    assert_verified(swin, path, (3, 224, 224), conversion, sizes=[(224, 224), (256, 320), (448, 448)])


def test_swin_v2_converts_past_its_position_bias_tables():
    model = seeded(small_swin_v2)
    conversion = fcconv.rewrite(model, (3, 256, 256))
    assert [layer.name for layer in conversion.layers] == ["head"]
    assert_verified(model, conversion.module, (3, 256, 256), conversion, sizes=[(256, 256), (320, 288), (512, 512)])


def test_swin_dense_map():
    model = seeded(small_swin)
    conversion = fcconv.rewrite(model, (3, 224, 224), dense=True)
    report = fcconv.verify(model, conversion.module, (3, 224, 224), sizes=[(224, 224), (448, 448)], batch=1,
                           conversion=conversion)  # fmt: skip
    assert report.passed, checks(report)
    assert report.checks[-1].output_shape == (1, 10, 14, 14)


# --- refusals that name what prevents the conversion ------------------------------------------


def test_vit_is_refused_naming_its_fixed_length_position_embedding():
    with pytest.raises(
        NotConvertibleError, match=r"encoder\.pos_embedding is a position embedding of fixed length 197"
    ):
        fcconv.analyze(build_architecture("vit_b_16"), (3, 224, 224))


def test_maxvit_is_refused_because_its_attention_partitions_are_fixed_to_the_native_size():
    with pytest.raises(NotConvertibleError, match=r"departition_op \(WindowDepartition\) cannot take a 448×448"):
        fcconv.analyze(build_architecture("maxvit_t"), native_input_shape("maxvit_t"))


class _Patches(nn.Module):
    """A patch embedding into a token sequence (N, T, C), with no position embedding and no class token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 8, stride=8)

    def forward(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)


class TokenMixer(_Patches):
    """MLP-Mixer's token mixing: a Linear across the token axis."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        tokens = super().forward(x)
        tokens = tokens + self.mix(tokens.transpose(1, 2)).transpose(1, 2)
        return self.head(tokens.mean(1))


class TokenAttention(_Patches):
    """Global self-attention over the tokens."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(24, 72)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        tokens = super().forward(x)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        tokens = tokens + torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        return self.head(tokens.mean(1))


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (TokenMixer, r"^mix \(Linear\) is a Linear across the 16 positions of the map \(token mixing\)"),
        (TokenAttention, r"^matmul\w* \(matmul\) multiplies two activations \(attention\)"),
    ],
)
def test_a_model_that_mixes_every_position_with_every_other_is_refused_naming_the_layer(model, named):
    with pytest.raises(NotConvertibleError, match=named) as refused:
        fcconv.analyze(seeded(model), (3, 32, 32))
    assert "no output reads a window of the input" in str(refused.value)


class TokenPooled(_Patches):
    """A sequence of tokens normalized per token and pooled over the tokens (Hugging Face FocalNet's and Swin's
    pooler): the map's height and width are gone by the pooling."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        tokens = self.norm(super().forward(x))
        return self.head(self.pool(tokens.transpose(1, 2)).flatten(1))


def test_a_pooling_over_the_tokens_of_a_flattened_map_is_refused_naming_the_pooling():
    with pytest.raises(NotConvertibleError, match=r"^pool \(AdaptiveAvgPool1d\) pools the 16 positions of the map"):
        fcconv.analyze(seeded(TokenPooled), (3, 32, 32))


def test_maxvit_head_norm_over_the_pooled_features_converts_exactly():
    # MaxViT's own head (pool, flatten, LayerNorm, Linear, Tanh, Linear) on a trunk that takes any size
    model = seeded(NormalizedPooledHead)
    conversion = fcconv.rewrite(model, (3, 32, 32))
    assert isinstance(conversion.module.get_submodule("classifier.2"), ChannelLayerNorm)
    assert_verified(model, conversion.module, (3, 32, 32), conversion)
    dense = fcconv.rewrite(model, (3, 32, 32), dense=True)
    report = fcconv.verify(model, dense.module, (3, 32, 32), batch=1, conversion=dense)
    assert report.passed, checks(report)
    assert report.checks[-1].output_shape == (1, 4, 29, 29)


# --- models that are fully convolutional already -------------------------------------------------


def test_squeezenet_is_reported_fully_convolutional_and_exports_with_free_size(tmp_path):
    model = seeded(torchvision.models.squeezenet1_1, weights=None, num_classes=10)
    conversion = fcconv.rewrite(model, (3, 224, 224))
    assert conversion.fully_convolutional and not conversion.layers
    path = export_onnx(conversion.module, tmp_path / "squeezenet.onnx", (3, 224, 224))
    x = torch.randn(1, 3, 320, 288)
    with torch.no_grad():
        expected = model(x)
    actual = OnnxRunner(path)(x)
    assert actual.shape == (1, 10, 1, 1)
    assert (actual.flatten(1) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_verified(model, path, (3, 224, 224), conversion)


# --- --pool: test-time pooling of the score map --------------------------------------------------


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pooled_output_is_n_by_k_and_pools_the_score_map(lenet, kind):
    pooled = fcconv.rewrite(lenet, (1, 28, 28), pool=kind)
    dense_map = fcconv.convert(lenet, (1, 28, 28))
    x = torch.randn(2, 1, 47, 39)
    with torch.no_grad():
        scores = pooled.module(x)
        full = dense_map(x)
        native = torch.randn(2, 1, 28, 28)
        assert torch.allclose(pooled.module(native), lenet(native), atol=1e-5)
    assert scores.shape == (2, 10)
    expected = full.mean((2, 3)) if kind == "avg" else full.amax((2, 3))
    assert torch.allclose(scores, expected, atol=1e-6)
    report = assert_verified(lenet, pooled.module, (1, 28, 28), pooled)
    assert all(c.output_shape == (1, 10) for c in report.checks)


def test_average_pooled_dense_map_of_a_linear_head_is_the_original_at_any_size():
    model = seeded(MeanPooled)
    conversion = fcconv.rewrite(model, (3, 33, 41), dense=True, pool="avg")
    x = torch.randn(2, 3, 70, 95)
    with torch.no_grad():
        assert torch.allclose(conversion.module(x), model(x), atol=1e-5)
    report = fcconv.verify(model, conversion.module, (3, 33, 41), batch=1, conversion=conversion)
    assert report.passed, checks(report)


def test_pooled_export_records_the_pooling_and_verifies(tmp_path):
    model = seeded(LeNet)
    conversion = fcconv.rewrite(model, (1, 28, 28), pool="max")
    path = export_onnx(conversion.module, tmp_path / "lenet.onnx", (1, 28, 28))
    assert OnnxRunner(path).metadata["fcconv.pool"] == "max"
    assert "ReduceMax" in onnx_ops(path)
    assert_verified(model, path, (1, 28, 28), conversion)


# --- squeeze-and-excitation gates written with Linear layers --------------------------------------


def test_linear_squeeze_and_excitation_gates_become_1x1_convolutions(tmp_path):
    model = seeded(SENet)
    conversion = fcconv.rewrite(model, (3, 32, 32))
    gates = [layer.name for layer in conversion.trunk_layers]
    assert gates == ["stage1.2.fc.0", "stage1.2.fc.2", "stage2.2.down", "stage2.2.up"]
    for name in gates:
        conv = conversion.module.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert_verified(model, conversion.module, (3, 32, 32), conversion)
    path = export_onnx(conversion.module, tmp_path / "senet.onnx", (3, 32, 32))
    ops = onnx_ops(path)
    assert "MatMul" not in ops and "Gemm" not in ops
    # no feature map is reshaped: a Reshape there is the exporter's arithmetic on sizes (the shape expand_as takes)
    assert not reshaped_floats(path)
    assert_verified(model, path, (3, 32, 32), conversion)


def test_gates_keep_the_torchvision_models_that_already_use_convolutions_unchanged():
    conversion = fcconv.analyze(build_architecture("efficientnet_b0"), (3, 224, 224))
    assert not conversion.trunk_layers and [layer.name for layer in conversion.layers] == ["classifier.1"]


def test_inception_dense_reaches_past_the_dropout_to_the_pooling():
    conversion = fcconv.analyze(build_architecture("inception_v3"), (3, 299, 299), dense=True)
    assert any("avgpool" in item and "dense" in item for item in conversion.removed)
    assert conversion.geometry.window == (1, 1)


def test_permuted_layer_norm_on_the_unpooled_map_is_still_refused():
    class NormThenFlatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).flatten(1))

    with pytest.raises(NotConvertibleError, match="permuted map"):
        fcconv.convert(seeded(NormThenFlatten), (1, 8, 8))


# --- the command line ----------------------------------------------------------------------------


def run(*args):
    # from the tests folder (so that --arch custom_models:... imports), with this checkout's fcconv
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "fcconv", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=TESTS, env=env)


def test_cli_squeezenet_with_pool_converts_and_verify_reads_the_pooling_back(tmp_path):
    checkpoint = tmp_path / "squeezenet.pt"
    torch.save(seeded(torchvision.models.squeezenet1_1, weights=None, num_classes=10).state_dict(), checkpoint)
    converted = run("convert", checkpoint, "--arch", "squeezenet1_1", "--pool", "avg", "--sizes", "224x224,257x301")
    assert converted.returncode == 0, converted.stderr
    assert "already fully convolutional" in converted.stdout and "2×10 " in converted.stdout
    exported = tmp_path / "squeezenet.fcn.onnx"
    assert OnnxRunner(exported).metadata["fcconv.pool"] == "avg"
    verified = run("verify", exported, "--reference", checkpoint, "--arch", "squeezenet1_1", "--sizes", "300x260")
    assert verified.returncode == 0, verified.stderr
    assert "2×10 " in verified.stdout
    bad = run("inspect", checkpoint, "--arch", "squeezenet1_1", "--pool", "mean")
    assert bad.returncode == 2 and "--pool 'mean' is not avg or max" in bad.stderr


def test_cli_inspect_lists_the_per_position_linear_layers(tmp_path):
    checkpoint = tmp_path / "convnext.pt"
    torch.save(seeded(small_convnext).state_dict(), checkpoint)
    args = ("inspect", checkpoint, "--arch", "custom_models:small_convnext", "--input-shape", "3,64,64")
    listed = run(*args)
    assert listed.returncode == 0, listed.stderr
    assert "features.1.0.block.3" in listed.stdout and "--pointwise makes them" in listed.stdout
    rewritten = run(*args, "--pointwise")
    assert rewritten.returncode == 0, rewritten.stderr
    assert "Conv2d(16 → 64)" in rewritten.stdout and "permutes removed" in rewritten.stdout


def test_cli_refuses_vit_with_exit_code_3_and_one_line(tmp_path):
    checkpoint = tmp_path / "vit.pt"
    model = build_architecture("vit_b_32", num_classes=4)
    torch.save({k: torch.zeros(v.shape) for k, v in model.state_dict().items()}, checkpoint)
    refused = run("inspect", checkpoint, "--arch", "vit_b_32")
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "position embedding of fixed length 50" in refused.stderr


class ChannelsLastPooled(nn.Module):
    """A channels-last trunk pooled over its spatial axes as timm's Swin and MambaOut heads pool: x.mean((1, 2))."""

    def __init__(self, keepdim=False):
        super().__init__()
        self.keepdim = keepdim
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.mlp = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.mlp(self.conv(x).permute(0, 2, 3, 1)))
        pooled = x.mean((1, 2), keepdim=self.keepdim)
        return self.fc(pooled.flatten(1))


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_mean_over_the_spatial_axes_of_a_channels_last_map_is_the_global_pooling(keepdim):
    model = seeded(ChannelsLastPooled, keepdim=keepdim)
    conversion = fcconv.rewrite(model, (3, 32, 32))
    assert [layer.name for layer in conversion.layers] == ["fc"]
    assert_verified(model, conversion.module, (3, 32, 32), conversion, sizes=[(32, 32), (41, 37), (64, 64)])
    dense = fcconv.rewrite(model, (3, 32, 32), dense=True)
    report = fcconv.verify(model, dense.module, (3, 32, 32), sizes=[(32, 32), (41, 37)], batch=1, conversion=dense)
    assert report.passed, checks(report)
    assert report.checks[-1].output_shape == (1, 4, 20, 18)


def test_a_mean_over_channels_and_height_of_a_channels_first_map_is_no_pooling():
    class MeanOverChannelsAndHeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(30, 4)

        def forward(self, x):
            return self.fc(self.conv(x).mean((1, 2)))

    with pytest.raises(NotConvertibleError):
        fcconv.analyze(seeded(MeanOverChannelsAndHeight), (3, 32, 32))


class SplitAttention(nn.Module):
    """ResNeSt's split attention: a gate computed from the global pooling by 1×1 convolutions and a softmax over
    reshaped groups, reshaped back and multiplied onto the map; then a plain pooled head."""

    def __init__(self, channels=8, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(3, channels * radix, 3)
        self.fc1 = nn.Conv2d(channels, 4, 1)
        self.fc2 = nn.Conv2d(4, channels * radix, 1)
        self.fc = nn.Linear(channels, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = torch.relu(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True)))
        attn = self.fc2(gap).view(b, 1, self.radix, -1).transpose(1, 2)
        attn = torch.softmax(attn, dim=1).reshape(b, -1)
        x = (x * attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)
        return self.fc(x.mean((2, 3)))


def test_a_gate_of_convolutions_over_the_global_pooling_is_kept_and_the_head_after_it_converts():
    model = seeded(SplitAttention)
    conversion = fcconv.rewrite(model, (3, 32, 32))
    assert [layer.name for layer in conversion.layers] == ["fc"]
    assert_verified(model, conversion.module, (3, 32, 32), conversion, sizes=[(32, 32), (41, 37), (64, 64)])
