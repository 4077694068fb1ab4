"""``--stride S``: one score vector every S input pixels, by rewriting the trunk à trous.

The contract: the map at stride S equals the original's own layers read à trous (the verifier's reading: each
changed layer applied to every polyphase component of its input), for 1, 2 and 3 spatial axes, padded and
unpadded trunks, at S = total / 2 and total / 4. Checked here also without that reading, from the original alone:
every (total / S)-th position is the default conversion's map; the map at S holds the map at 2S as its even
subgrid; and where the trunk has no padding, the map is shift-and-stitch of the default conversion and each
position is the original run on its crop. Strides that do not exist and layers that cannot be read à trous are
refused, naming the valid strides or the layer.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from torch import nn

from fcconv.atrous import parse_stride
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.rewrite import rewrite
from fcconv.verify import verify

DIGITS = REPO / "sample_models" / "digits_lenet.pt"
SIGNALS = REPO / "sample_models" / "signals_net.pt"
LAYERS = {
    1: (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d),
    2: (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d),
    3: (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d),
}


def with_head(trunk: nn.Sequential, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """``trunk`` followed by a flatten and a two-layer head over the map it makes at ``input_shape``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        features = trunk(torch.zeros(1, *input_shape)).numel()
    return nn.Sequential(*trunk, nn.Flatten(), nn.Linear(features, 12), nn.ReLU(), nn.Linear(12, 5)).eval()


def strided_net(rank: int, padded: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """A max pooling, an average pooling and a strided convolution (total stride 8 per axis; 2 along a volume's
    depth), with convolutions between and after them: every kind of layer the rewrite changes."""
    conv, max_pool, avg_pool = LAYERS[rank]
    p = 1 if padded else 0
    if rank == 3:  # the depth axis strided once: total stride 2×8×8
        torch.manual_seed(3)
        trunk = nn.Sequential(
            conv(2, 4, 3, padding=p), nn.ReLU(), max_pool((1, 2, 2)), conv(4, 4, 3, padding=p), nn.ReLU(),
            avg_pool(2), conv(4, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, p, p)), nn.ReLU(),
            conv(6, 6, (1, 3, 3), padding=(0, p, p)),
        )  # fmt: skip
        native = (4, 32, 32) if padded else (8, 48, 48)
    else:
        torch.manual_seed(rank)
        trunk = nn.Sequential(
            conv(2, 6, 3, padding=p), nn.ReLU(), max_pool(2), conv(6, 6, 3, padding=p), nn.ReLU(), avg_pool(2),
            conv(6, 8, 3, stride=2, padding=p), nn.BatchNorm1d(8) if rank == 1 else nn.BatchNorm2d(8), nn.ReLU(),
            conv(8, 8, 3, padding=p),
        )  # fmt: skip
        trunk[7].running_mean.uniform_(-0.5, 0.5)
        trunk[7].running_var.uniform_(0.5, 2.0)
        native = ((64,) if padded else (70,)) if rank == 1 else ((32, 32) if padded else (48, 48))
    return with_head(trunk, (2, *native), seed=rank + 10 * padded), (2, *native)


def larger(input_shape: tuple[int, ...], extra: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n + e for n, e in zip(input_shape[1:], extra))


CASES = [
    pytest.param(1, padded, stride, id=f"1d-{'padded' if padded else 'unpadded'}-S{stride}")
    for padded in (True, False)
    for stride in (4, 2)
] + [
    pytest.param(2, padded, stride, id=f"2d-{'padded' if padded else 'unpadded'}-S{stride}")
    for padded in (True, False)
    for stride in (4, 2)
] + [
    pytest.param(3, padded, stride, id=f"3d-{'padded' if padded else 'unpadded'}-S{stride}")
    for padded in (True, False)
    for stride in (4, 2)
]  # fmt: skip


@pytest.mark.parametrize(("rank", "padded", "stride"), CASES)
def test_the_finer_map_equals_the_original_layers_read_a_trous_at_native_and_larger_sizes(rank, padded, stride):
    model, input_shape = strided_net(rank, padded)
    conversion = rewrite(model, input_shape, stride=stride)
    plan = conversion.atrous
    total = (8,) * rank if rank < 3 else (2, 8, 8)
    assert plan.total == total
    assert plan.stride == tuple(min(stride, t) for t in total)  # one value: an axis with a smaller total keeps it
    assert plan.layers and all(layer.kind in ("stride removed", "dilated") for layer in plan.layers)
    sizes = [input_shape[1:], larger(input_shape, (13, 22, 9)[:rank])]
    report = verify(model, conversion.module, input_shape, conversion=conversion, sizes=sizes)
    assert report.passed, [(c.input_size, c.reference, c.max_abs, c.message) for c in report.checks]
    readings = {(c.input_size, c.reference) for c in report.checks}
    assert all((size, "à trous") in readings for size in sizes)
    finer = [c for c in report.checks if c.reference == "à trous"][-1]
    coarse = [c for c in report.checks if c.reference.startswith("sliding window")][-1]
    assert np.prod(finer.output_shape) > np.prod(coarse.output_shape)  # more positions than at the model's stride


@pytest.mark.parametrize(("rank", "padded", "stride"), CASES)
def test_every_total_over_s_th_position_is_the_default_conversion_and_the_map_at_2s_is_its_even_subgrid(
    rank, padded, stride
):
    model, input_shape = strided_net(rank, padded)
    x = torch.randn(2, input_shape[0], *larger(input_shape, (11, 16, 7)[:rank]))
    fine = rewrite(model, input_shape, stride=stride)
    coarser = rewrite(model, input_shape, stride=2 * stride)
    default = rewrite(model, input_shape)
    step = fine.atrous.dilation
    with torch.no_grad():
        at_s, at_2s, at_total = fine.module(x), coarser.module(x), default.module(x)
    subgrid = (Ellipsis, *(slice(None, None, d) for d in step))
    torch.testing.assert_close(at_s[subgrid], at_total, rtol=1e-4, atol=1e-5)
    halves = (Ellipsis, *(slice(None, None, 2) if s * 2 <= t else slice(None) for s, t in zip(fine.atrous.stride,
                                                                                            fine.atrous.total)))  # fmt: skip
    torch.testing.assert_close(at_s[halves], at_2s, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # at the native size the first position is the original's own output
        native = torch.randn(2, *input_shape)
        first = fine.module(native)[(Ellipsis, *(0,) * rank)]
        torch.testing.assert_close(first, model(native), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_without_padding_the_finer_map_is_shift_and_stitch_of_the_default_conversion(rank):
    model, input_shape = strided_net(rank, padded=False)
    stride = 2
    fine = rewrite(model, input_shape, stride=stride)
    default = rewrite(model, input_shape).module
    step, strides = fine.atrous.dilation, fine.atrous.stride
    x = torch.randn(1, input_shape[0], *larger(input_shape, (21, 19, 13)[:rank]))
    with torch.no_grad():
        stitched_from = fine.module(x)
        for phase in np.ndindex(*step):
            shifted = x[(Ellipsis, *(slice(p * s, None) for p, s in zip(phase, strides)))]
            part = stitched_from[(Ellipsis, *(slice(p, None, d) for p, d in zip(phase, step)))]
            torch.testing.assert_close(part, default(shifted), rtol=1e-4, atol=1e-5)


def test_without_padding_every_position_is_the_original_on_its_crop():
    model, input_shape = strided_net(2, padded=False)
    native = input_shape[1:]
    stride = 2
    fine = rewrite(model, input_shape, stride=stride).module
    x = torch.randn(1, 2, native[0] + 9, native[1] + 5)
    with torch.no_grad():
        scores = fine(x)
        crops = (9 // stride + 1, 5 // stride + 1)  # the native-sized crops that fit, one every `stride` pixels
        assert all(s >= c for s, c in zip(scores.shape[2:], crops))
        for i, j in np.ndindex(*crops):
            crop = x[:, :, i * stride : i * stride + native[0], j * stride : j * stride + native[1]]
            torch.testing.assert_close(scores[0, :, i, j], model(crop)[0], rtol=1e-4, atol=1e-5)


def test_the_original_model_and_its_weights_are_left_as_they_were():
    model, input_shape = strided_net(2, padded=True)
    before = {
        name: (m.stride, getattr(m, "dilation", None)) for name, m in model.named_modules() if hasattr(m, "stride")
    }
    conversion = rewrite(model, input_shape, stride=2)
    after = {
        name: (m.stride, getattr(m, "dilation", None)) for name, m in model.named_modules() if hasattr(m, "stride")
    }
    assert before == after
    changed = conversion.module.get_submodule("6")
    assert changed.stride == (1, 1) and changed.dilation == (2, 2) and changed.padding == (2, 2)
    assert changed.weight.data_ptr() == model[6].weight.data_ptr()  # shared, not copied


def test_a_per_axis_stride_changes_each_axis_alone():
    model, input_shape = strided_net(3, padded=True)
    conversion = rewrite(model, input_shape, stride="1,4,8")
    assert conversion.atrous.stride == (1, 4, 8) and conversion.atrous.dilation == (2, 2, 1)
    sizes = [input_shape[1:], larger(input_shape, (3, 8, 5))]
    assert verify(model, conversion.module, input_shape, conversion=conversion, sizes=sizes).passed


@pytest.mark.parametrize(("arch", "stride", "dense"), [("vgg11", 8, False), ("resnet18", 16, True)])
def test_torchvision_classifiers_at_a_finer_stride_verify(arch, stride, dense):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    conversion = rewrite(model, (3, 224, 224), stride=stride, dense=dense)
    assert conversion.atrous.total == (32, 32) and conversion.atrous.stride == (stride, stride)
    report = verify(model, conversion.module, (3, 224, 224), conversion=conversion, sizes=[(224, 224), (256, 288)],
                    batch=1)  # fmt: skip
    assert report.passed, [(c.input_size, c.reference, c.max_abs) for c in report.checks]


@pytest.mark.parametrize("padding", [1, 0])
def test_a_pooling_whose_window_is_not_a_multiple_of_its_stride_is_read_a_trous_exactly(padding):
    # a 3×3 window at stride 2 (ResNet's stem): each polyphase component is pooled as the original pools it
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(3, 2, padding=padding), nn.Conv2d(4, 4, 3, padding=padding))
    model = with_head(trunk, (1, 21, 21), 0)
    conversion = rewrite(model, (1, 21, 21), stride=1)
    assert [(layer.name, layer.kind) for layer in conversion.atrous.layers] == [("1", "stride removed"), ("2", "dilated"),
                                                                            ("4", "dilated")]  # fmt: skip
    report = verify(model, conversion.module, (1, 21, 21), conversion=conversion, sizes=[(21, 21), (30, 26)])
    assert report.passed
    if not padding:  # and without padding, it is the original on every crop
        x = torch.randn(1, 1, 25, 24)
        with torch.no_grad():
            scores = conversion.module(x)
            for i, j in np.ndindex(5, 4):
                torch.testing.assert_close(scores[0, :, i, j], model(x[:, :, i : i + 21, j : j + 21])[0])


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (3, "--stride 3 does not divide the model's total stride 8: the valid strides are 1, 2, 4, 8"),
        (16, "--stride 16 is larger than the model's total stride 8×8"),
        ("2,3", "--stride 3 along the width does not divide"),
        ("1,2,4", "the model has 2 spatial axes; give one stride or 2"),
    ],
)
def test_a_stride_that_is_not_one_of_the_map_is_refused_naming_the_valid_ones(given, says):
    model, input_shape = strided_net(2, padded=True)
    with pytest.raises(BadInputError, match=says.replace("(", r"\(").replace("×", "×")):
        rewrite(model, input_shape, stride=given)


def test_a_stride_inside_one_layers_stride_names_that_layer():
    torch.manual_seed(0)
    model = with_head(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(4), nn.Conv2d(4, 4, 3)), (1, 24, 24), 0)
    with pytest.raises(
        BadInputError, match=r"--stride 2 is no stride of its map \(1 \(MaxPool2d\) takes it from 1 to 4"
    ):
        rewrite(model, (1, 24, 24), stride=2)
    assert rewrite(model, (1, 24, 24), stride=1).atrous.dilation == (4, 4)


@pytest.mark.parametrize("given", ["0", "-2", "x", "2.5", ""])
def test_a_stride_that_is_no_whole_number_is_refused(given):
    with pytest.raises(BadInputError, match="--stride"):
        parse_stride(given)


class MeanGate(nn.Module):
    """Scales each channel by a function of its mean over the whole map (a squeeze-and-excitation gate)."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class Reflecting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    ("later", "names"),
    [
        (MeanGate(), "mean"),
        (nn.GroupNorm(2, 4), "GroupNorm"),
        (Reflecting(), "conv pads with 'reflect'"),
        (nn.MaxPool2d(2, ceil_mode=True), "pools in ceil mode"),
        (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), "averages without its padding"),
    ],
)
def test_a_layer_that_cannot_be_read_a_trous_is_refused_by_name(later, names):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), later, nn.Conv2d(4, 4, 3))
    model = with_head(trunk, (1, 32, 32), 0)
    with pytest.raises(NotConvertibleError, match=f"--stride: .*{names}"):
        rewrite(model, (1, 32, 32), stride=1)


def test_a_head_that_pools_the_whole_map_needs_dense():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    with pytest.raises(BadInputError, match="add --dense"):
        rewrite(model, (1, 16, 16), stride=1)
    with pytest.raises(BadInputError, match="--pool cannot be combined with --stride"):
        rewrite(model, (1, 16, 16), stride=1, dense=True, pool="avg")
    conversion = rewrite(model, (1, 16, 16), stride=1, dense=True)
    assert verify(model, conversion.module, (1, 16, 16), conversion=conversion, sizes=[(16, 16), (21, 19)]).passed


# --- the command ----------------------------------------------------------------------------------------------


def fcconv(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_convert_with_stride_writes_a_finer_map_that_check_and_verify_accept(tmp_path):
    before = SIGNALS.read_bytes()
    out = tmp_path / "signals.s8.onnx"
    run = fcconv("convert", SIGNALS, "--stride", "8", "-o", out)
    assert run.returncode == 0, run.stderr
    assert "À trous: one score vector every 8 samples (the model's own stride: 32)" in run.stdout
    assert "features.14" in run.stdout and "stride removed" in run.stdout and "à trous" in run.stdout
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["fcconv.atrous_stride"] == "8" and meta["fcconv.total_stride"] == "8" and meta["fcconv.stride"] == "1"
    # the export's map at 1024 samples: one position every 8 samples
    import onnxruntime as ort

    session = ort.InferenceSession(str(out))
    x = np.random.default_rng(0).standard_normal((1, 1, 1024)).astype(np.float32)
    scores = session.run(None, {session.get_inputs()[0].name: x})[0]
    receptive = int(meta["fcconv.receptive_field"])
    assert scores.shape[2] == (1024 - receptive) // 8 + 1
    assert fcconv("check", out).returncode == 0
    run = fcconv("verify", out, "--reference", SIGNALS)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "à trous" in run.stdout and "sliding window at stride 32" in run.stdout
    assert SIGNALS.read_bytes() == before


def test_a_gemm_head_and_a_program_at_a_finer_stride_verify(tmp_path):
    shapes = REPO / "sample_models" / "shapes_vgg.pt"
    for out, extra in ((tmp_path / "shapes.gemm.onnx", ["--head-format", "gemm"]), (tmp_path / "shapes.pt2", [])):
        run = fcconv("convert", shapes, "--stride", "2", "-o", out, "--quiet", *extra)
        assert run.returncode == 0, run.stdout + run.stderr
        assert fcconv("check", out).returncode == 0


def test_inspect_shows_the_layers_the_stride_changes():
    run = fcconv("inspect", DIGITS, "--stride", "1")
    assert run.returncode == 0, run.stderr
    assert "À trous: one score vector every 1×1 pixels" in run.stdout
    assert "pool (call 1)" in run.stdout and "pool (call 2)" in run.stdout and "dilation 4×4" in run.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--stride", "16"], "--stride 16 is no stride of its map (features.14 (MaxPool1d) takes it from 8 to 32)"),
        (["--stride", "3"], "the valid strides are 1, 2, 4, 8, 32"),
        (["--stride", "8", "--rank", "4"], "--stride cannot be combined with --rank"),
        (["--stride", "8", "--pool", "avg"], "--pool cannot be combined with --stride"),
        (["--stride", "8", "-o", "{tmp}/signals.safetensors"], "--stride writes ONNX or .pt2"),
    ],
)
def test_convert_refuses_a_stride_it_cannot_make_in_one_line_writing_nothing(tmp_path, args, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", tmp_path / "signals.onnx"]
    run = fcconv("convert", SIGNALS, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_layer_that_cannot_be_read_a_trous_exits_3(tmp_path):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3))
    model = with_head(trunk, (1, 32, 32), 0)
    torch.save(model, tmp_path / "gn.pt")
    run = fcconv("convert", tmp_path / "gn.pt", "--trust", "--input-shape", "1,32,32", "--stride", "1",
                 "-o", tmp_path / "gn.onnx")  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "GroupNorm" in run.stderr and run.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gn.pt"]


def test_stride_is_refused_for_an_onnx_classifier(tmp_path):
    exported = tmp_path / "digits.onnx"
    assert fcconv("convert", DIGITS, "-o", exported, "--quiet").returncode == 0
    run = fcconv("convert", exported, "--stride", "2", "-o", tmp_path / "again.onnx")
    assert run.returncode == 2 and "--stride does not apply to an ONNX model" in run.stderr


def test_heatmap_with_stride_draws_the_finer_map_whose_subgrid_is_the_default_one(tmp_path):
    from PIL import Image

    shapes = REPO / "sample_models" / "shapes_vgg.pt"
    picture = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(picture)
    maps = {}
    for stride in (None, 2):
        extra = [] if stride is None else ["--stride", stride]
        saved = tmp_path / f"map{stride}.npy"
        run = fcconv("heatmap", shapes, picture, "-o", tmp_path / f"h{stride}.png", "--save-map", saved, *extra)
        assert run.returncode == 0, run.stdout + run.stderr
        maps[stride] = np.load(saved)
    assert "every 2×2 pixels" in run.stdout
    assert maps[2].shape[1:] == ((70 - 32) // 2 + 1, (90 - 32) // 2 + 1)  # one 32×32 window every 2 pixels
    np.testing.assert_allclose(maps[2][:, ::4, ::4], maps[None], rtol=1e-4, atol=1e-6)
    onnx_out = tmp_path / "shapes.onnx"
    assert fcconv("convert", shapes, "-o", onnx_out, "--quiet").returncode == 0
    run = fcconv("heatmap", onnx_out, picture, "-o", tmp_path / "x.png", "--stride", "2")
    assert run.returncode == 2 and "keeps the stride it was converted with" in run.stderr
