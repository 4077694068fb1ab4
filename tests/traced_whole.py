"""Layers whose functions this module declares for torch.fx to keep whole (``torch.fx.wrap``), as torchvision's Swin does.

Kept apart from the other helpers: a model whose class is defined in a module that declares
such functions is traced with torch.fx directly, so the models that hold these layers are
defined elsewhere and reach the export first.
"""

import torch
from torch import nn


def scaled_by_rows(x: torch.Tensor) -> torch.Tensor:
    """Each channel's map as one row, as window attention lays it out: the export sees reshapes to a matrix."""
    n, c, h, w = x.shape
    return (x.reshape(n * c, h * w) * 2).reshape(n, c, h, w)


def columns_one_by_one(x: torch.Tensor) -> torch.Tensor:
    """A Python loop over the columns: the export unrolls it at the traced width, fixing that axis."""
    return torch.stack([2 * x[..., i] for i in range(x.shape[-1])], -1)


torch.fx.wrap("scaled_by_rows")
torch.fx.wrap("columns_one_by_one")


class ScaledByRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_by_rows(x)


class ColumnsOneByOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return columns_one_by_one(x)


class BlockCheckedWindow(nn.Module):
    """A window head over a stride-4 map the model asserts tiles into blocks of 8 (inputs 32 pixels apart); defined
    here, so torch.fx traces it and records the checks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        torch._assert(x.shape[2] % 8 == 0, "height is not a whole number of blocks")
        torch._assert(x.shape[3] % 8 == 0, "width is not a whole number of blocks")
        return self.fc(torch.flatten(x, 1))
