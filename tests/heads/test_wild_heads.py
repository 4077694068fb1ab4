"""Heads as they are in the wild: permuted flattens, per-channel layers, several outputs, --logits and --until."""

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import TESTS, seeded
from custom_models import LeNet, SlopePerWindowElement, SoftmaxVGG, TwoHeadedDetector
from torch import nn

import fcconv
from fcconv.errors import BadInputError, NotConvertibleError

# --- the two-headed detector: (W, H, C) flatten, PReLU per feature, class scores and boxes ---------

DETECTOR_SHAPE = (3, 14, 16)
DETECTOR_STRIDE = 2  # two unpadded 3×3 convolutions around a 2×2 max pooling
DETECTOR_SIZES = [(18, 18), (16, 22)]  # two larger sizes, one of them not square


def crops(x, native, stride):
    """Every crop of ``x`` at multiples of ``stride`` that the original reads as one window, by map position."""
    rows = (x.shape[2] - native[0]) // stride + 1
    cols = (x.shape[3] - native[1]) // stride + 1
    for i in range(rows):
        for j in range(cols):
            yield (i, j), x[:, :, i * stride : i * stride + native[0], j * stride : j * stride + native[1]]


@pytest.mark.parametrize("as_tuple", [False, True], ids=["dict", "tuple"])
def test_a_two_headed_detector_gives_every_output_as_a_dense_map_in_the_same_structure(as_tuple):
    model = seeded(TwoHeadedDetector, as_tuple)
    with torch.no_grad():
        model.act.weight.uniform_(-0.5, 0.5)  # a slope of its own for every feature
    conversion = fcconv.rewrite(model, DETECTOR_SHAPE)
    converted = conversion.module

    torch.manual_seed(1)
    x = torch.randn(2, *DETECTOR_SHAPE)
    out, expected = converted(x), model(x)
    assert type(out) is type(expected)
    if as_tuple:
        out, expected = dict(enumerate(out)), dict(enumerate(expected))
    assert list(out) == list(expected)
    for name, value in expected.items():
        assert out[name].shape == (*value.shape, 1, 1)
        torch.testing.assert_close(out[name], value.reshape(*value.shape, 1, 1), rtol=1e-5, atol=1e-6)

    for size in DETECTOR_SIZES:
        big = torch.randn(2, 3, *size)
        maps = converted(big)
        maps = dict(enumerate(maps)) if as_tuple else maps
        positions = [position for position, _ in crops(big, DETECTOR_SHAPE[1:], DETECTOR_STRIDE)]
        assert all(m.shape[2:] == tuple(p + 1 for p in positions[-1]) for m in maps.values())
        for (i, j), crop in crops(big, DETECTOR_SHAPE[1:], DETECTOR_STRIDE):
            window = model(crop)
            window = dict(enumerate(window)) if as_tuple else window
            for name, value in window.items():
                torch.testing.assert_close(maps[name][:, :, i, j], value, rtol=1e-5, atol=1e-6)


def test_the_detector_conversion_records_its_branches_permutation_and_carried_layers():
    model = seeded(TwoHeadedDetector)
    weight = model.fc.weight.detach().clone()
    conversion = fcconv.rewrite(model, DETECTOR_SHAPE)

    assert conversion.branches == [
        ("class_scores", ["fc", "act", "classes", "softmax"]),
        ("boxes", ["fc", "act", "boxes"]),
    ]
    assert conversion.flatten_permutation == (0, 3, 2, 1)
    assert "act (PReLU, 32 slopes) → per channel" in conversion.carried
    assert conversion.cut_points == ["fc", "act", "classes", "boxes"]
    first = conversion.layers[0]
    assert first.name == "fc" and first.kernel == (4, 5) and "re-ordered (a copy)" in first.note
    # the kernel is the Linear's weight over (W, H, C), read back in (C, H, W) order; the original is kept
    kernel = conversion.module.get_submodule("fc").weight
    assert torch.equal(kernel, weight.view(32, 5, 4, 6).permute(0, 3, 2, 1))
    assert torch.equal(model.fc.weight, weight)
    assert kernel.data_ptr() != model.fc.weight.data_ptr()
    assert not [n for n in conversion.module.graph.nodes if n.target in ("permute", "flatten")]


# --- every way of writing the permutation ---------------------------------------------------------


class PermutedFlatten(nn.Module):
    """A conv trunk whose map of ``rank`` spatial axes is flattened through ``permuted(map)``."""

    def __init__(self, rank, permuted, input_shape):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        self.conv = conv(input_shape[0], 3, 3)
        self.permuted = permuted
        self.fc = nn.Linear(3 * torch.Size([s - 2 for s in input_shape[1:]]).numel(), 4)

    def forward(self, x):
        return self.fc(torch.relu(self.permuted(self.conv(x))))


def _view_contiguous(x):
    y = torch.transpose(x, 1, 2).contiguous()
    return y.view(y.size(0), -1)


PERMUTED_FLATTENS = {
    "channels-last": (2, lambda x: x.permute(0, 2, 3, 1).flatten(1), (0, 2, 3, 1)),
    "width before height": (2, lambda x: x.permute(0, 3, 2, 1).flatten(1), (0, 3, 2, 1)),
    "transpose(1, 3)": (2, lambda x: x.transpose(1, 3).flatten(1), (0, 3, 2, 1)),
    "torch.permute, reshape": (2, lambda x: torch.permute(x, (0, 2, 3, 1)).reshape(x.size(0), -1), (0, 2, 3, 1)),
    "torch.transpose, contiguous, view": (2, _view_contiguous, (0, 2, 1, 3)),
    "movedim": (2, lambda x: x.movedim(1, -1).flatten(1), (0, 2, 3, 1)),
    "two permutes": (2, lambda x: x.permute(0, 2, 3, 1).transpose(1, 2).flatten(1), (0, 3, 2, 1)),
    "1D (N, L, C)": (1, lambda x: x.transpose(1, 2).flatten(1), (0, 2, 1)),
    "3D channels-last": (3, lambda x: x.permute(0, 2, 3, 4, 1).flatten(1), (0, 2, 3, 4, 1)),
}
SHAPES = {1: ((2, 12), [(17,), (20,)]), 2: ((2, 7, 9), [(9, 9), (10, 13)]), 3: ((1, 5, 6, 7), [(6, 8, 7), (7, 7, 9)])}


@pytest.mark.parametrize("case", PERMUTED_FLATTENS, ids=list(PERMUTED_FLATTENS))
def test_a_permuted_flatten_converts_exactly_with_the_permutation_undone_in_the_kernel(case):
    rank, permuted, expected = PERMUTED_FLATTENS[case]
    shape, sizes = SHAPES[rank]
    model = seeded(PermutedFlatten, rank, permuted, shape)
    conversion = fcconv.rewrite(model, shape)

    assert conversion.flatten_permutation == expected
    ops = {getattr(n.target, "__name__", n.target) for n in conversion.module.graph.nodes}
    assert not ops & {"permute", "transpose", "movedim", "contiguous", "flatten", "view", "reshape"}
    sizes_out = [s - 2 for s in shape[1:]]
    permuted_sizes = [([3, *sizes_out])[axis - 1] for axis in expected[1:]]
    inverse = [expected.index(axis) for axis in range(rank + 2)]
    reordered = model.fc.weight.detach().view(4, *permuted_sizes).permute(inverse)
    assert torch.equal(conversion.module.get_submodule("fc").weight, reordered)

    report = fcconv.verify(model, conversion.module, shape, sizes=[shape[1:], *sizes])
    assert report.passed, [(c.input_size, c.reference, c.max_abs) for c in report.checks]


def test_the_pooled_channels_last_path_still_reads_the_pooled_map():
    class PooledChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.norm(self.pool(self.conv(x)).permute(0, 2, 3, 1)).flatten(1))

    model = seeded(PooledChannelsLast)
    conversion = fcconv.rewrite(model, (3, 12, 12), dense=True)
    assert conversion.flatten_permutation is None
    assert fcconv.verify(model, conversion.module, (3, 12, 12), sizes=[(12, 12), (15, 19)], dense=True).passed


# --- per-channel layers ---------------------------------------------------------------------------


class PerChannelHead(nn.Module):
    """Linear → PReLU (per feature) → BatchNorm1d → Linear → PReLU (one slope) → LayerNorm → Linear → log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(4 * 5 * 6, 16)
        self.act1 = nn.PReLU(16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.PReLU()
        self.norm = nn.LayerNorm(12)
        self.fc3 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.bn(self.act1(self.fc1(self.conv(x).flatten(1))))
        x = self.norm(self.act2(self.fc2(x)))
        return F.log_softmax(self.fc3(x), dim=-1)


def test_per_channel_layers_carry_over_to_every_position():
    model = seeded(PerChannelHead)
    with torch.no_grad():
        for tensor in (model.act1.weight, model.bn.weight, model.bn.bias, model.bn.running_mean, model.norm.bias):
            tensor.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 1.5)
    conversion = fcconv.rewrite(model, (2, 7, 8))
    assert conversion.carried == [
        "act1 (PReLU, 16 slopes) → per channel",
        "bn (BatchNorm1d) → BatchNorm2d, per channel",
        "act2 (PReLU, 1 slope) → element-wise",
        "norm (LayerNorm over 12) → over the channels",
        "log_softmax (log_softmax over the features) → over the channels",
    ]
    assert isinstance(conversion.module.get_submodule("bn"), nn.BatchNorm2d)
    report = fcconv.verify(model, conversion.module, (2, 7, 8), sizes=[(7, 8), (11, 11), (9, 14)])
    assert report.passed, [(c.input_size, c.reference, c.max_abs) for c in report.checks]


class NormalizesTheWindowWithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm1d(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x).flatten(1)))


def test_layers_over_the_flattened_window_are_refused_naming_the_layer_and_the_reason():
    with pytest.raises(NotConvertibleError, match=r"act \(PReLU\) .*one slope per element of the flattened window"):
        fcconv.convert(seeded(SlopePerWindowElement), (1, 8, 8))
    with pytest.raises(NotConvertibleError, match=r"bn \(BatchNorm1d\) .*normalizes over the flattened window"):
        fcconv.convert(seeded(NormalizesTheWindowWithBatchNorm), (1, 8, 8))


# --- --logits and --until ---------------------------------------------------------------------------

VGG_SHAPE = (3, 16, 16)


def windows_of(model, x):
    """The original's classifier input for every 4×4 window of its feature map: (positions, N, 256), and the grid."""
    feats = model.features(x)
    rows, cols = feats.shape[2] - 3, feats.shape[3] - 3
    flat = [
        torch.flatten(model.avgpool(feats[:, :, i : i + 4, j : j + 4]), 1) for i in range(rows) for j in range(cols)
    ]
    return flat, (rows, cols)


@torch.no_grad()
def test_logits_gives_the_pre_softmax_scores_of_every_window():
    model = seeded(SoftmaxVGG)
    conversion = fcconv.rewrite(model, VGG_SHAPE, logits=True)
    assert conversion.geometry.logits and conversion.module.fcconv_geometry.logits
    assert any("softmax" in item and "--logits" in item for item in conversion.removed)
    assert not [n for n in conversion.module.graph.nodes if getattr(n.target, "__name__", "") == "softmax"]

    x = torch.randn(2, *VGG_SHAPE)
    scores = model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
    torch.testing.assert_close(conversion.module(x), scores.reshape(2, 6, 1, 1), rtol=1e-5, atol=1e-6)
    big = torch.randn(2, 3, 24, 32)
    score_map = conversion.module(big)
    flat, grid = windows_of(model, big)
    assert score_map.shape == (2, 6, *grid)
    for k, window in enumerate(flat):
        i, j = divmod(k, grid[1])
        torch.testing.assert_close(score_map[:, :, i, j], model.classifier(window), rtol=1e-5, atol=1e-6)

    assert fcconv.verify(model, conversion.module, VGG_SHAPE, sizes=[(16, 16), (20, 20), (24, 32)]).passed


@torch.no_grad()
def test_until_ends_the_model_at_a_head_layer_whose_output_becomes_a_dense_feature_map():
    model = seeded(SoftmaxVGG)
    conversion = fcconv.rewrite(model, VGG_SHAPE, until="classifier.4")
    assert conversion.geometry.until == "classifier.4"
    assert [layer.name for layer in conversion.layers] == ["classifier.0", "classifier.3"]

    x = torch.randn(2, *VGG_SHAPE)
    fc7 = model.classifier[:5](torch.flatten(model.avgpool(model.features(x)), 1))
    torch.testing.assert_close(conversion.module(x), fc7.reshape(2, 32, 1, 1), rtol=1e-5, atol=1e-6)
    big = torch.randn(1, 3, 32, 32)
    feature_map = conversion.module(big)
    flat, grid = windows_of(model, big)
    assert feature_map.shape == (1, 32, 5, 5) and grid == (5, 5)
    for k, window in enumerate(flat):
        i, j = divmod(k, grid[1])
        torch.testing.assert_close(feature_map[:, :, i, j], model.classifier[:5](window), rtol=1e-5, atol=1e-6)

    truncated = fcconv.truncate(model, VGG_SHAPE, until="classifier.4")
    assert truncated.get_submodule("classifier.0").weight is model.classifier[0].weight  # shares the weights
    assert fcconv.verify(model, conversion.module, VGG_SHAPE, sizes=[(16, 16), (20, 28)]).passed


def test_logits_drops_the_softmax_of_the_outputs_that_have_one():
    model = seeded(TwoHeadedDetector, True)
    truncated = fcconv.truncate(model, DETECTOR_SHAPE, logits=True)
    x = torch.randn(2, *DETECTOR_SHAPE)
    scores, boxes = truncated(x)
    hidden = model.act(model.fc(model.features(x).permute(0, 3, 2, 1).flatten(1)))
    torch.testing.assert_close(scores, model.classes(hidden))
    torch.testing.assert_close(boxes, model.boxes(hidden))
    converted = fcconv.convert(model, DETECTOR_SHAPE, logits=True)
    torch.testing.assert_close(converted(x)[0], model.classes(hidden).reshape(2, 5, 1, 1), rtol=1e-5, atol=1e-6)


def test_logits_and_until_refuse_what_they_cannot_do_naming_it():
    with pytest.raises(BadInputError, match=r"--logits: no output ends in .*scores ends in fc2 \(Linear\)"):
        fcconv.truncate(seeded(LeNet), (1, 28, 28), logits=True)
    accepted = "classifier.0, classifier.1, classifier.2, classifier.3, classifier.4, classifier.5, classifier.6"
    with pytest.raises(BadInputError, match=f"--until 'features.0' is not a layer of the head; it accepts {accepted}"):
        fcconv.rewrite(seeded(SoftmaxVGG), VGG_SHAPE, until="features.0")


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    from fcconv.cli import app

    monkeypatch.chdir(TESTS)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def checkpoint(tmp_path, factory, *args):
    path = tmp_path / f"{factory.__name__.lower()}.pt"
    torch.save(seeded(factory, *args).state_dict(), path)
    return path


VGG_ARCH = ["--arch", "custom_models:SoftmaxVGG", "--input-shape", "3,16,16", "--sizes", "16x16,20x28"]


def test_convert_logits_exports_the_raw_scores_and_says_so_in_the_metadata(tmp_path, cli):
    path, out = checkpoint(tmp_path, SoftmaxVGG), tmp_path / "logits.onnx"
    result = cli("convert", path, *VGG_ARCH, "--logits", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "--logits" in result.stdout
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fcconv.logits"] == "true" and "fcconv.until" not in meta
    assert "Softmax" not in {node.op_type for node in model.graph.node}
    again = cli("verify", out, "--reference", path, *VGG_ARCH)
    assert again.exit_code == 0, again.stdout + again.stderr
    against_softmax = cli("verify", out, "--reference", path, *VGG_ARCH, "--no-logits")
    assert against_softmax.exit_code == 1


def test_convert_until_exports_the_feature_map_of_that_layer(tmp_path, cli):
    path, out = checkpoint(tmp_path, SoftmaxVGG), tmp_path / "fc7.onnx"
    result = cli("convert", path, *VGG_ARCH, "--until", "classifier.4", "-o", out)
    assert result.exit_code == 0, result.stderr
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fcconv.until"] == "classifier.4" and meta["fcconv.logits"] == "false"
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 32
    again = cli("verify", out, "--reference", path, *VGG_ARCH)
    assert again.exit_code == 0, again.stdout + again.stderr


def test_the_detector_converts_verifies_and_checks_from_the_command_line(tmp_path, cli):
    path, out = checkpoint(tmp_path, TwoHeadedDetector), tmp_path / "detector.fcn.onnx"
    arch = ["--arch", "custom_models:TwoHeadedDetector", "--input-shape", "3,14,16"]
    result = cli("convert", path, *arch, "--sizes", "14x16,18x18,16x22", "-o", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["class_scores", "boxes"]
    assert "Transpose" not in {node.op_type for node in model.graph.node}  # the (W, H, C) permutation is gone
    assert cli("verify", out, "--reference", path, *arch, "--sizes", "14x16,16x22").exit_code == 0
    report = tmp_path / "check.json"
    assert cli("check", out, "--json", report).exit_code == 0
    checks = json.loads(report.read_text())["models"][0]["checks"]
    assert {c["output"] for c in checks if c["check"] == "reference output"} == {"class_scores", "boxes"}


def test_inspect_shows_the_outputs_the_permutation_the_carried_layers_the_cut_points_and_the_capture(tmp_path, cli):
    path = checkpoint(tmp_path, TwoHeadedDetector)
    result = cli("inspect", path, "--arch", "custom_models:TwoHeadedDetector", "--input-shape", "3,14,16")
    assert result.exit_code == 0, result.stderr
    for text in (
        "class_scores ← fc → act → classes → softmax",
        "boxes ← fc → act → boxes",
        "permuted by (0, 3, 2, 1)",
        "act (PReLU, 32 slopes) → per channel",
        "--until accepts: fc, act, classes, boxes",
        "captured by torch.export",
    ):
        assert text in result.stdout, result.stdout


def test_the_cli_gives_one_line_and_exit_2_or_3_for_what_it_cannot_do(tmp_path, cli):
    lenet = checkpoint(tmp_path, LeNet)
    refused = {
        "--logits without a softmax": (
            ["convert", lenet, "--arch", "custom_models:LeNet", "--input-shape", "1,28,28", "--logits"],
            2,
            "scores ends in fc2 (Linear)",
        ),
        "--until not a head layer": (
            ["convert", lenet, "--arch", "custom_models:LeNet", "--input-shape", "1,28,28", "--until", "conv1"],
            2,
            "it accepts fc1, relu, fc2",
        ),
        "a slope per window element": (
            [
                "convert", checkpoint(tmp_path, SlopePerWindowElement), "--arch", "custom_models:SlopePerWindowElement",
                "--input-shape", "1,8,8",
            ],
            3,
            "act (PReLU) after flatten has one slope per element of the flattened window (144 slopes)",
        ),
    }  # fmt: skip
    for case, (args, code, text) in refused.items():
        result = cli(*args)
        assert result.exit_code == code, (case, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (case, result.stderr)
    assert not list(tmp_path.glob("*.onnx"))


def test_verify_ends_the_original_where_the_converted_module_was_ended():
    model = seeded(SoftmaxVGG)
    for options in ({"logits": True}, {"until": "classifier.4"}):
        converted = fcconv.convert(model, VGG_SHAPE, **options)
        assert fcconv.verify(model, converted, VGG_SHAPE).passed, options
