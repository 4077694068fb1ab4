"""Every fast path of the converted layers gives the plain convolution's numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcconv import layers
from fcconv.layers import FULLY_CONNECTED_CONV, linear_as_conv

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def make(rank, channels, kernel, out=6, bias=True):
    torch.manual_seed(rank)
    linear = nn.Linear(channels * int(torch.tensor(kernel).prod()), out, bias=bias)
    return linear, linear_as_conv(linear, channels, kernel)


@pytest.mark.parametrize(
    "rank,kernel,spatial",
    [
        (2, (3, 4), (3, 4)),  # the map is the kernel: flatten + GEMM
        (2, (1, 1), (5, 7)),  # pointwise: GEMM over positions
        (2, (3, 4), (6, 9)),  # larger map: unfold + GEMM
        (1, (5,), (5,)),
        (1, (5,), (17,)),
        (1, (1,), (9,)),
        (3, (2, 3, 2), (2, 3, 2)),
        (3, (2, 3, 2), (4, 5, 3)),
        (3, (1, 1, 1), (3, 4, 5)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_each_path_equals_the_plain_convolution(rank, kernel, spatial, bias):
    _, conv = make(rank, 5, kernel, bias=bias)
    x = torch.randn(3, 5, *spatial)
    expected = CONV[rank](x, conv.weight, conv.bias)
    actual = conv(x)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_convolution_fallback_for_large_maps_equals_the_plain_convolution(monkeypatch):
    monkeypatch.setattr(layers, "UNFOLD_MAX_ELEMENTS", 0)
    _, conv = make(2, 4, (3, 3))
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)


def test_the_native_size_computes_what_the_linear_computes():
    linear, conv = make(2, 8, (4, 4), out=5)
    x = torch.randn(4, 8, 4, 4)
    assert torch.equal(conv(x).flatten(1), linear(x.flatten(1)))


def test_state_dict_is_a_plain_convolutions():
    _, conv = make(2, 3, (2, 2))
    plain = nn.Conv2d(3, 6, 2)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 5, 5)
    assert torch.allclose(plain(x), conv(x), atol=1e-6)
    assert isinstance(conv, FULLY_CONNECTED_CONV[2]) and isinstance(conv, nn.Conv2d)


@pytest.mark.parametrize("kernel", [(3, 4), (1, 1), (5,), (2, 3, 2)])
def test_window_rows_are_the_gathered_windows(kernel):
    x = torch.randn(2, 3, *(k + 3 for k in kernel))
    assert torch.equal(layers.window_rows(x, kernel), layers.gather_windows(x, kernel))


@pytest.mark.parametrize(
    "kernel,spatial",
    [((3, 4), (6, 9)), ((1, 1), (5, 7)), ((1,), (9,)), ((1, 1, 1), (3, 4, 5))],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_forms_used_on_cuda_equal_the_plain_convolution(kernel, spatial, bias, batch):
    """Run here on the CPU: the columns form of a channels-first 1×1 map, and the GEMM with the bias added after."""
    rank = len(kernel)
    _, conv = make(rank, 5, kernel, bias=bias)
    x = torch.randn(batch, 5, *spatial)
    expected = CONV[rank](x, conv.weight, conv.bias)
    rows = layers.window_rows(x, kernel)
    forms = [layers.channels_first(layers.rows_times_weight(rows, conv.weight, conv.bias, bias_after=True))]
    if math.prod(kernel) == 1:
        forms.append(layers.pointwise_columns(x, conv.weight, conv.bias))
    for actual in forms:
        assert actual.shape == expected.shape
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_pointwise_layer_reads_the_channels_last_output_of_the_layer_before_without_a_copy(monkeypatch):
    _, first = make(2, 5, (3, 3))
    _, second = make(2, 6, (1, 1), out=4)
    y = first(torch.randn(2, 5, 7, 8))
    assert layers.channels_last(y).is_contiguous()
    multiplied = []
    real = layers.rows_times_weight
    monkeypatch.setattr(
        layers, "rows_times_weight", lambda rows, *a, **k: multiplied.append(rows) or real(rows, *a, **k)
    )
    assert torch.allclose(second(y), F.conv2d(y, second.weight, second.bias), rtol=1e-5, atol=1e-5)
    (rows,) = multiplied
    assert rows.data_ptr() == y.data_ptr() and rows.is_contiguous()  # y's own memory, read as rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "rank,kernel,spatial",
    [(2, (7, 7), (7, 7)), (2, (1, 1), (5, 7)), (2, (7, 7), (14, 14)), (1, (5,), (17,)), (3, (2, 3, 2), (4, 5, 3))],
)
def test_each_path_on_cuda_equals_the_plain_convolution(rank, kernel, spatial):
    from fcconv.verify import full_float32_precision

    _, conv = make(rank, 8, kernel)
    conv = conv.cuda()
    x = torch.randn(2, 8, *spatial, device="cuda")
    with full_float32_precision():
        expected = CONV[rank](x, conv.weight, conv.bias)
        actual = conv(x)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
