"""What cannot be rewritten exactly is refused, naming the layer and the reason."""

import pytest
import torch
from conftest import seeded
from custom_models import FlattenOnly, NormalizesTheWindow
from torch import nn

import fcconv
from fcconv.errors import BadInputError, NotConvertibleError


class ConcatenatesABranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6 + 1, 3)

    def forward(self, x):
        flat = self.conv(x).flatten(1)
        return self.fc(torch.cat([flat, x.mean((1, 2, 3)).unsqueeze(1)], 1))


class MovesTheBatchAxis(nn.Module):
    """Swaps the batch and channel axes before the flatten (two channels, as the shape probe's batch of two)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).permute(1, 0, 2, 3).flatten(1))


def test_a_normalization_over_the_flattened_window_is_refused_by_name():
    with pytest.raises(NotConvertibleError, match=r"norm \(LayerNorm\).*not per position"):
        fcconv.convert(seeded(NormalizesTheWindow), (1, 8, 8))


def test_a_flatten_without_a_linear_is_refused():
    with pytest.raises(NotConvertibleError, match="not followed by a Linear"):
        fcconv.convert(seeded(FlattenOnly), (1, 8, 8))


def test_mixing_the_flattened_window_with_another_branch_is_refused():
    with pytest.raises(NotConvertibleError, match="cat"):
        fcconv.convert(seeded(ConcatenatesABranch), (1, 8, 8))


def test_a_flatten_of_a_map_whose_batch_axis_moved_is_refused_naming_the_permute():
    with pytest.raises(NotConvertibleError, match=r"permute \(\.permute\(\)\) moved \(to axis 1\)"):
        fcconv.convert(seeded(MovesTheBatchAxis), (1, 8, 8))


def test_an_input_shape_the_model_cannot_take_is_bad_input(lenet):
    with pytest.raises(BadInputError, match="cannot take an input of shape 3×28×28"):
        fcconv.convert(lenet, (3, 28, 28))


def test_an_already_fully_convolutional_model_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(NotConvertibleError, match="already fully convolutional"):
        fcconv.convert(model, (3, 16, 16))
