"""A converted module compiles whole with torch.compile(fullgraph=True, dynamic=True) and computes what it computes
eagerly, at the native size and at larger ones (one graph for every larger size)."""

import math
import operator

import pytest
import torch
from conftest import seeded
from custom_models import SoftmaxVGG, TinyResNet
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from traced_whole import BlockCheckedWindow

import fcconv
from fcconv import layers
from fcconv.export import as_export_module


class TinyAlexNet(nn.Module):
    """AlexNet's layout with a few channels: an 11×11 stride-4 stem and three 3×3 stride-2 max poolings to a 6×6
    map at 224×224, ``AdaptiveAvgPool2d(6)``, then Dropout → Linear → ReLU → Dropout → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(),
            nn.Linear(16, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class StridedSignal(nn.Module):
    """A 1D classifier of 1×64 signals: two strided Conv1d stages (to 8×7), then flatten → Linear → Linear.

    No MaxPool1d: torch.compile fixes a max_pool1d's length to the one it traced (max_pool2d's sizes stay symbolic).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv1d(4, 8, 3, stride=4), nn.ReLU())
        self.fc1 = nn.Linear(8 * 7, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.features(x), 1))))


class TinyVolume(nn.Module):
    """A 3D classifier of 1×8×8×8 volumes: one strided Conv3d (to 4×3×3×3), then flatten → Linear → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2), nn.ReLU())
        self.fc1 = nn.Linear(4 * 3 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.features(x), 1))))


class ChannelsLastMLP(nn.Module):
    """A Linear on each position of a channels-last map (as ConvNeXt's MLPs), then flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = nn.Linear(8, 8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.mlp(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(torch.relu(x), 1))


def conv_and_linear():
    """One strided convolution and a Linear over its whole 4×3×3 map: the fewest kernels for the inductor case."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def compiled_equals_eager(module, inputs, backend="aot_eager"):
    """Compile ``module`` whole with symbolic sizes, call it on each input, compare with eager; the graphs compiled."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    graphs = []
    with torch.no_grad():
        for x in inputs:
            expected, actual = module(x), compiled(x)
            assert actual.shape == expected.shape
            assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6), (tuple(x.shape), backend)
            graphs.append(counter.frame_count)
    torch._dynamo.reset()
    return graphs, counter


def batch(shape, *sizes):
    """Batches of two at each spatial size (every spatial axis set to it) for a (C, *S) input shape."""
    return [torch.randn(2, shape[0], *(size,) * (len(shape) - 1)) for size in sizes]


# name: (model, native input shape, convert's options, two sizes larger than native)
CASES = {
    "vgg-like": (SoftmaxVGG, (3, 16, 16), {}, (24, 36)),
    "alexnet-like": (TinyAlexNet, (3, 224, 224), {}, (256, 320)),
    "vgg-like, pooled": (SoftmaxVGG, (3, 16, 16), {"pool": "avg"}, (24, 36)),
    "resnet-like, dense": (TinyResNet, (3, 64, 64), {"dense": True}, (96, 160)),
    "pointwise layers": (ChannelsLastMLP, (3, 16, 16), {"pointwise": True}, (24, 36)),
    "signal (1D)": (StridedSignal, (1, 64), {}, (72, 96)),
    "volume (3D)": (TinyVolume, (1, 8, 8, 8), {}, (10, 14)),
    "asserts its input size": (BlockCheckedWindow, (3, 32, 32), {}, (64, 96)),
}


@pytest.mark.parametrize("name", CASES)
def test_a_converted_module_compiles_whole_and_equals_eager_at_every_size(name):
    factory, shape, options, larger = CASES[name]
    converted = fcconv.convert(seeded(factory), shape, **options)
    graphs, _ = compiled_equals_eager(converted, batch(shape, shape[-1], *larger))
    assert graphs[2] == graphs[1], "the second larger size compiled a graph of its own: the sizes are not symbolic"


def test_the_gemm_head_format_compiles_whole_and_equals_eager():
    factory, shape, options, larger = CASES["vgg-like"]
    gemm = as_export_module(fcconv.convert(seeded(factory), shape, **options), "gemm")
    assert any(isinstance(m, layers.WindowGemm) for m in gemm.modules())
    graphs, counter = compiled_equals_eager(gemm, batch(shape, shape[-1], *larger))
    assert graphs[2] == graphs[1]
    # each layer's windows are a few views and one copy, not one slice per kernel cell (16 for the first)
    cells = max(math.prod(m.kernel_size) for m in gemm.modules() if isinstance(m, layers.WindowGemm))
    for graph in counter.graphs:
        slices = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is operator.getitem]
        assert len(slices) < cells


def test_the_convolution_fallback_for_large_maps_compiles_whole(monkeypatch):
    monkeypatch.setattr(layers, "UNFOLD_MAX_ELEMENTS", 0)
    factory, shape, _, larger = CASES["vgg-like"]
    compiled_equals_eager(fcconv.convert(seeded(factory), shape), batch(shape, shape[-1], *larger))


def test_the_inductor_compiles_a_dense_map_that_equals_eager():
    converted = fcconv.convert(seeded(conv_and_linear), (1, 8, 8))
    graphs, _ = compiled_equals_eager(converted, batch((1, 8, 8), 12, 14), backend="inductor")
    assert graphs == [1, 1]
