"""Inputs without a channel axis: a model that takes (N, L) and adds its axes itself (``--input-shape L``).

A frame-wise audio classifier reads a waveform as (N, L), makes (N, 1, L, 1) for Conv2d over an
(L, 1) map and flattens a permuted, fixed-length map into its Linear head. Converted at the
channel-free shape (L,), it takes (N, L') for any L' ≥ L and returns (N, K, positions): the axis
the model added keeps one position at every length and is squeezed from the output. Where the
map does not run along the length alone, the conversion is refused naming the node.
"""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from conftest import TESTS, seeded
from custom_models import FramewiseAudio, PooledAudio, WaveformMLP
from torch import nn

import fcconv
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.grid import probe_output_grid
from fcconv.runtime import OnnxRunner
from fcconv.sizes import parse_input_shape

warnings.filterwarnings("ignore", category=UserWarning)

NATIVE = 400
STRIDE, FIELD = 8, 393  # three unpadded stride-2 stages (kernels 5, 3, 3): 393 to 400 samples give the 48-cell map


def framewise():
    return seeded(FramewiseAudio)


def test_a_single_number_is_a_channel_free_input_shape():
    assert parse_input_shape("16000") == (16000,)
    assert parse_input_shape((400,)) == (400,)
    for refused in ("0", "-3", "1,2,3,4,5"):
        with pytest.raises(BadInputError, match="L \\(no channel axis\\)"):
            parse_input_shape(refused)


def test_a_framewise_classifier_of_a_channel_free_input_is_rewritten_as_a_convolution_along_the_length():
    conversion = fcconv.rewrite(framewise(), (NATIVE,))
    first, last = conversion.layers
    assert (first.name, first.before, first.after) == ("fc1", "Linear(768 → 32)", "Conv2d(16 → 32)")
    assert first.in_map == (16, 48, 1) and first.kernel == (48, 1)
    assert last.after == "Conv2d(32 → 6)" and last.kernel == (1, 1)
    assert conversion.flatten_permutation == (0, 3, 1, 2)
    assert conversion.geometry.input_shape == (NATIVE,) and conversion.geometry.added_axes == (1,)
    grid = probe_output_grid(conversion.module, (NATIVE,))
    assert grid is not None and (grid.total_stride, grid.receptive_field) == ((STRIDE,), (FIELD,))


def test_the_converted_model_takes_a_longer_waveform_and_scores_every_window_as_the_original_does():
    model = framewise()
    converted = fcconv.convert(model, (NATIVE,))
    x = torch.randn(2, NATIVE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x).unsqueeze(-1), rtol=0, atol=1e-5)
        long = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2))
        scores = converted(long)
        positions = (1000 - FIELD) // STRIDE + 1
        assert scores.shape == (2, 6, positions)
        for p in (0, 1, positions // 2, positions - 1):
            window = long[:, STRIDE * p : STRIDE * p + FIELD]
            assert torch.allclose(scores[..., p], model(window), rtol=0, atol=1e-5), p


@pytest.mark.parametrize("capture", ["torch.export", "torch.fx"])
def test_verification_passes_at_the_native_and_larger_lengths(capture):
    model = framewise()
    source = torch.fx.symbolic_trace(model) if capture == "torch.fx" else model
    converted = fcconv.convert(source, (NATIVE,))
    report = fcconv.verify(model, converted, (NATIVE,), sizes=[(NATIVE,), (521,), (800,)])
    assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]
    assert {c.input_size for c in report.checks} == {(400,), (521,), (800,)}
    assert [c.output_shape for c in report.checks if c.reference == "sliding window"] == [
        (2, 6, 1),
        (2, 6, 17),
        (2, 6, 51),
    ]
    assert any(c.reference == "original" for c in report.checks)


def test_a_global_pooling_over_the_length_is_kept_pooled_or_made_dense():
    model = seeded(PooledAudio)
    x = torch.randn(2, 600, generator=torch.Generator().manual_seed(3))
    pooled = fcconv.convert(model, (NATIVE,))
    dense = fcconv.convert(model, (NATIVE,), dense=True)
    with torch.no_grad():
        assert torch.allclose(pooled(x), model(x).unsqueeze(-1), rtol=0, atol=1e-5)
        map_ = dense(x)
        assert map_.shape == (2, 6, 73)  # one score vector per cell of the (600 → 73)-cell map
        assert torch.allclose(map_.mean(-1), model(x), rtol=0, atol=1e-5)  # the head is linear after the mean
    for converted in (pooled, dense, fcconv.convert(model, (NATIVE,), pool="avg")):
        report = fcconv.verify(model, converted, (NATIVE,), sizes=[(NATIVE,), (600,)])
        assert report.passed, [(c.input_size, c.reference, c.max_rel) for c in report.checks]


def test_a_conv1d_model_that_adds_only_the_channel_axis_converts_too():
    class Framewise1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 9, stride=4)
            self.fc = nn.Linear(8 * 23, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))

    model = seeded(Framewise1d)
    conversion = fcconv.rewrite(model, (100,))
    assert conversion.layers[0].after == "Conv1d(8 → 5)" and conversion.geometry.added_axes == ()
    report = fcconv.verify(model, conversion.module, (100,))
    assert report.passed and report.checks[-1].output_shape[:2] == (2, 5) and len(report.checks[-1].output_shape) == 3


def test_the_onnx_export_takes_any_length_and_equals_the_original_at_the_native_one(tmp_path):
    model = framewise()
    path = fcconv.export_onnx(fcconv.convert(model, (NATIVE,)), tmp_path / "audio.onnx", input_shape=(NATIVE,))
    graph = onnx.load(str(path)).graph
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (graph.input[0], graph.output[0])
    ]
    assert dims == [["batch", "length"], ["batch", 6, "length"]]
    runner = OnnxRunner(path)
    assert runner.metadata["fcconv.input_shape"] == "400"
    x = torch.randn(3, NATIVE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(runner(x)), model(x).unsqueeze(-1), rtol=0, atol=1e-5)
    assert tuple(runner(torch.randn(1, 1000)).shape) == (1, 6, 76)
    report = fcconv.verify(model, path, (NATIVE,))
    assert report.passed, [(c.input_size, c.reference, c.max_rel) for c in report.checks]


# --- what has no map along the length is refused, naming the node ----------------------------------


class LengthOnChannels(nn.Module):
    """The waveform's samples put on the channel axis: (N, L, 1, 1) into Conv2d(400 → 8, 1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(NATIVE, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.unsqueeze(-1).unsqueeze(-1))).flatten(1))


class OuterProduct(nn.Module):
    """The waveform's outer product with itself, (N, 1, L, L): a map with two axes that follow the length."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 50 * 50, 3)

    def forward(self, x):
        grid = x.unsqueeze(1).unsqueeze(-1) * x.unsqueeze(1).unsqueeze(-2)
        return self.fc(torch.relu(self.conv(grid)).flatten(1))


class ThreeWide(nn.Module):
    """The waveform repeated three times along the added axis, (N, 1, L, 3), then a mean over the whole map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, (5, 1), stride=(2, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x.unsqueeze(1).unsqueeze(-1).repeat(1, 1, 1, 3)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("factory", "options", "expected"),
    [
        (WaveformMLP, {}, "fc1 (Linear) reads the 400 input samples as 400 features"),
        (LengthOnChannels, {}, "conv (Conv2d) cannot take a 800 input"),
        (OuterProduct, {}, "axes 2 and 3 each follow the input's length"),
        (ThreeWide, {"dense": True}, "axis 3 of the head's 8×198×3 map relu"),
    ],
    ids=["linear on the samples", "length on the channels", "two axes follow the length", "dense added axis"],
)
def test_a_channel_free_model_without_one_map_axis_along_the_length_is_refused_naming_the_node(
    factory, options, expected
):
    with pytest.raises(NotConvertibleError, match=expected.replace("(", "\\(").replace(")", "\\)")):
        fcconv.rewrite(seeded(factory), (NATIVE,), **options)


def test_the_added_axis_with_a_global_pooling_kept_is_converted():
    model = seeded(ThreeWide)
    converted = fcconv.convert(model, (NATIVE,))
    assert fcconv.verify(model, converted, (NATIVE,), sizes=[(NATIVE,), (500,)]).passed


# --- the command line ---------------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from fcconv.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_command_line_converts_verifies_and_inspects_with_a_single_number_input_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(TESTS)
    torch.save(framewise().state_dict(), tmp_path / "audio.pt")
    arch = ["--arch", "custom_models:FramewiseAudio"]
    target = tmp_path / "audio.onnx"
    converted = invoke("convert", tmp_path / "audio.pt", *arch, "--input-shape", "400", "-o", target)
    assert converted.exit_code == 0, converted.output
    for text in ("Linear(768 → 32)", "Conv2d(16 → 32)", "48×1", "2×6×1", "2×6×14", "2×6×51", "ok"):
        assert text in converted.stdout, text
    assert "FAIL" not in converted.stdout
    dims = onnx.load(str(target)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "length"]

    checked = invoke("verify", target, "--reference", tmp_path / "audio.pt", *arch, "--sizes", "400,1000")
    assert checked.exit_code == 0, checked.output
    assert "2×6×76" in checked.stdout and "matches" in checked.stdout

    inspected = invoke("inspect", tmp_path / "audio.pt", *arch, "--input-shape", "400")
    assert inspected.exit_code == 0, inspected.output
    assert "axis 3 of the map (not an axis of the channel-free input) is squeezed" in inspected.stdout


def test_the_command_line_refuses_a_channel_free_model_without_a_map_with_exit_3_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(TESTS)
    torch.save(seeded(WaveformMLP).state_dict(), tmp_path / "mlp.pt")
    result = invoke("convert", tmp_path / "mlp.pt", "--arch", "custom_models:WaveformMLP", "--input-shape", "400")
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fc1 (Linear) reads the 400 input samples" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlp.fcn.onnx").exists()
