"""Classifiers built from plain descriptions, in any number of spatial axes, for the property tests.

A :class:`Description` is a plain value hypothesis prints when a property fails;
:func:`build` turns it into an eval-mode model whose weights come from its seed. The
trunk's sizes and total stride are worked out from the description itself, never from
fcconv, so the checks that use them do not lean on the code they check.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {
    ("max", 1): nn.MaxPool1d, ("avg", 1): nn.AvgPool1d,
    ("max", 2): nn.MaxPool2d, ("avg", 2): nn.AvgPool2d,
    ("max", 3): nn.MaxPool3d, ("avg", 3): nn.AvgPool3d,
}  # fmt: skip
ACTIVATIONS = {
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Tanh": nn.Tanh,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "ELU": nn.ELU,
    "SiLU": nn.SiLU,
    "Sigmoid": nn.Sigmoid,
    "Hardswish": nn.Hardswish,
    "Softplus": nn.Softplus,
}
FLATTENS = ("torch.flatten(x, 1)", "nn.Flatten()", "x.view(x.size(0), -1)", "x.reshape(x.shape[0], -1)")


@dataclass(frozen=True)
class Conv:
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    relu: bool


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class Dense:
    """A Linear, then (each optional) BatchNorm1d, an activation and Dropout."""

    width: int
    bias: bool
    batch_norm: bool
    activation: str | None
    dropout: float | None


@dataclass(frozen=True)
class Description:
    """A classifier of any rank: the rank is the number of axes of ``size``."""

    in_channels: int
    size: tuple[int, ...]
    trunk: tuple[Conv | Pool, ...]
    flatten: str
    on_window: tuple[str, ...]
    head: tuple[Dense, ...]
    seed: int

    @property
    def rank(self) -> int:
        return len(self.size)

    @property
    def stride(self) -> tuple[int, ...]:
        """The trunk's total stride along each axis."""
        return tuple(math.prod(layer.stride[axis] for layer in self.trunk) for axis in range(self.rank))

    @property
    def padded(self) -> bool:
        return any(isinstance(layer, Conv) and any(layer.padding) for layer in self.trunk)

    @property
    def channels(self) -> int:
        return [layer.out_channels for layer in self.trunk if isinstance(layer, Conv)][-1]

    def feature_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The trunk's output map for an input of ``size`` (an axis of 0 means the map is empty)."""
        return tuple(feature_side(self.trunk, side, axis) for axis, side in enumerate(size))


def feature_side(trunk: tuple[Conv | Pool, ...], side: int, axis: int) -> int:
    for layer in trunk:
        padding = layer.padding[axis] if isinstance(layer, Conv) else 0
        if side + 2 * padding < layer.kernel[axis]:
            return 0
        side = (side + 2 * padding - layer.kernel[axis]) // layer.stride[axis] + 1
    return side


class GeneratedClassifier(nn.Module):
    """``features`` (convolutions and poolings of the description's rank), the flatten spelt as described, ``classifier``."""

    def __init__(self, description: Description) -> None:
        super().__init__()
        rank = description.rank
        trunk: list[nn.Module] = []
        channels = description.in_channels
        for layer in description.trunk:
            if isinstance(layer, Conv):
                trunk.append(CONV[rank](channels, layer.out_channels, layer.kernel, layer.stride, layer.padding))
                channels = layer.out_channels
                if layer.relu:
                    trunk.append(nn.ReLU())
            else:
                trunk.append(POOL[layer.kind, rank](layer.kernel, layer.stride))
        self.features = nn.Sequential(*trunk)
        self.flatten_as = description.flatten
        if description.flatten == "nn.Flatten()":
            self.flatten = nn.Flatten()
        head: OrderedDict[str, nn.Module] = OrderedDict()
        for name in description.on_window:
            head[f"window_{name.lower()}"] = nn.Dropout(0.3) if name == "Dropout" else ACTIVATIONS[name]()
        features = channels * math.prod(description.feature_size(description.size))
        for i, dense in enumerate(description.head, 1):
            head[f"fc{i}"] = nn.Linear(features, dense.width, bias=dense.bias)
            if dense.batch_norm:
                head[f"bn{i}"] = nn.BatchNorm1d(dense.width)
            if dense.activation is not None:
                head[f"act{i}"] = ACTIVATIONS[dense.activation]()
            if dense.dropout is not None:
                head[f"drop{i}"] = nn.Dropout(dense.dropout)
            features = dense.width
        self.classifier = nn.Sequential(head)

    def forward(self, x):
        x = self.features(x)
        if self.flatten_as == "torch.flatten(x, 1)":
            x = torch.flatten(x, 1)
        elif self.flatten_as == "nn.Flatten()":
            x = self.flatten(x)
        elif self.flatten_as == "x.view(x.size(0), -1)":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.classifier(x)


def build(description: Description) -> GeneratedClassifier:
    """The classifier in eval mode, its weights and BatchNorm statistics drawn from ``description.seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(description.seed)
        model = GeneratedClassifier(description)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):  # trained-looking statistics, not the identity
                n = module.num_features
                module.running_mean.copy_(torch.randn(n) * 0.5)
                module.running_var.copy_(torch.rand(n) * 1.5 + 0.25)
                module.weight.data.copy_(torch.randn(n) * 0.5 + 1.0)
                module.bias.data.copy_(torch.randn(n) * 0.5)
    return model.eval()


def draw_head(draw) -> tuple[Dense, ...]:
    """One to three Linear layers, each with its optional BatchNorm1d, activation and Dropout (hypothesis draws)."""
    head = []
    layers = draw(st.sampled_from([1, 2, 3]))
    for i in range(layers):
        last = i == layers - 1
        head.append(
            Dense(
                width=draw(st.integers(2, 10) if last else st.integers(2, 16)),
                bias=draw(st.booleans()),
                batch_norm=draw(st.booleans()),
                activation=draw(st.none() | st.sampled_from(list(ACTIVATIONS))),
                dropout=draw(st.none() | st.sampled_from([0.1, 0.5])),
            )
        )
    return tuple(head)
