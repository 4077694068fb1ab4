"""Architectures of the sample classifiers in ``sample_models/``.

They live in the package so that the samples' model cards (``fcconv.samples:DigitsLeNet``)
name an architecture fcconv builds without ``--trust``, as it builds torchvision's; a card
that names a module lying beside the checkpoint is refused unless trusted.
"""

import torch
from torch import nn


class DigitsLeNet(nn.Module):
    """A LeNet-style digit classifier for 1×28×28 images: two conv/pool stages, then a two-layer FC head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(self.relu(self.fc1(x)))


def _conv_block(channels_in: int, channels_out: int, convolutions: int) -> list[nn.Module]:
    """VGG's block: 3×3 convolutions that keep the size, each followed by ReLU, then a 2×2 max pooling."""
    layers: list[nn.Module] = []
    for index in range(convolutions):
        layers += [nn.Conv2d(channels_in if index == 0 else channels_out, channels_out, 3, padding=1), nn.ReLU()]
    return [*layers, nn.MaxPool2d(2)]


class ShapesVGG(nn.Module):
    """A small VGG-style classifier for 3×32×32 images: three blocks of 3×3 convolutions and a 2×2 max pooling
    (1, 2 and 1 convolutions; 32→16→8→4 pixels), then a two-layer FC head.

    The head reads the 64×4×4 map through a flatten: Linear(1024 → 128) → ReLU → Dropout → Linear(128 → classes).
    """

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_block(3, 16, 1), *_conv_block(16, 32, 2), *_conv_block(32, 64, 1))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class SignalsNet(nn.Module):
    """A 1D classifier for 1×512 signal windows: four unpadded conv/pool stages (stride 32), then a two-layer FC head.

    Unpadded, so that each window of a longer recording at a multiple of 32 samples sees
    exactly the features it would see alone: the converted model's map is this classifier
    run on every such window.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 9), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 9), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 9), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(32, 32, 5), nn.ReLU(), nn.MaxPool1d(4),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(32 * 13, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
