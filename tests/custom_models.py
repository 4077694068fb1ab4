"""Small classifiers the tests convert: importable as ``custom_models:<name>`` from this folder."""

import torch
from torch import nn


class LeNet(nn.Module):
    """Caffe's LeNet: 1×28×28 in, ``x.view(x.size(0), -1)``, then Linear(50·4·4, 500) → ReLU → Linear(500, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        x = x.view(x.size(0), -1)
        return self.fc2(self.relu(self.fc1(x)))


class HeadWithBatchNorm(nn.Module):
    """Flatten → Linear → BatchNorm1d → GELU → Dropout → Linear → softmax(dim=-1), no bias on the first Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3), nn.ReLU())
        self.fc1 = nn.Linear(12 * 5 * 6, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 7)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        x = self.drop(torch.nn.functional.gelu(self.bn(self.fc1(x))))
        return torch.softmax(self.fc2(x), dim=-1)


class ScoresAndBoxes(nn.Module):
    """A shared Linear → PReLU trunk splitting into class scores (softmax) and a box regression, returned as a dict.

    3×10×12 in; no padding, so each output position reads exactly one input window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(6 * 4 * 5, 24)
        self.act = nn.PReLU(24)
        self.classes = nn.Linear(24, 5)
        self.boxes = nn.Linear(24, 4)

    def forward(self, x):
        hidden = self.act(self.fc(self.features(x).flatten(1)))
        return {"class_scores": torch.softmax(self.classes(hidden), dim=1), "boxes": self.boxes(hidden)}


class ScoresAndBoxesTuple(ScoresAndBoxes):
    """The same two heads returned as a plain tuple (boxes first)."""

    def forward(self, x):
        out = super().forward(x)
        return out["boxes"], out["class_scores"]


class NormalizesTheWindow(nn.Module):
    """A LayerNorm over the flattened window before the first Linear: not a per-position operation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).flatten(1)))


class FlattenOnly(nn.Module):
    """Ends in a flatten with no Linear after it: the output has no per-position reading."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1)


class MeanPooled(nn.Module):
    """Global pooling written as ``x.mean([2, 3])``, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean([2, 3]))


class TrailingView(nn.Module):
    """Ends in ``x.view(x.size(0), -1)`` after the last Linear, a reshape that changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = self.fc2(torch.relu(self.fc1(self.conv(x).reshape(x.shape[0], -1))))
        return x.view(x.size(0), -1)


class SqueezeExcitation(nn.Module):
    """SENet's gate written with Linear layers: pool, view(N, C), Linear, ReLU, Linear, sigmoid, view(N, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c = x.shape[0], x.shape[1]
        y = self.pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class MeanGate(nn.Module):
    """The same gate with the pooling written as ``x.mean((2, 3))`` and the reshape as two unsqueezes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Linear(channels, channels // 2)
        self.up = nn.Linear(channels // 2, channels)

    def forward(self, x):
        y = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3))))))
        return x * y.unsqueeze(-1).unsqueeze(-1)


class SENet(nn.Module):
    """Two conv stages, each with a Linear squeeze-and-excitation gate, then global pooling and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), SqueezeExcitation(16))
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), MeanGate(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 6)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stage2(self.stage1(x))), 1))


class NormalizedPooledHead(nn.Module):
    """MaxViT's classifier on a small trunk: global pool, flatten, LayerNorm, Linear, Tanh, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.GELU(), nn.Conv2d(12, 16, 3))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.LayerNorm(16),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 4, bias=False),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def small_convnext():
    """torchvision's ConvNeXt in three small stages: its blocks (permute, LayerNorm, Linear, GELU, Linear, permute)
    and its head (pool, LayerNorm2d, Flatten, Linear), at a fraction of convnext_tiny's cost."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 48, 1), CNBlockConfig(48, None, 1)]
    return ConvNeXt(settings, num_classes=10)


def small_swin():
    """torchvision's Swin Transformer (swin_t's layers and 7×7 windows) with 16 to 128 channels."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 2, 2, 4], [7, 7], num_classes=10)


def small_swin_v2():
    """torchvision's Swin Transformer V2 (swin_v2_t's layers and 8×8 windows) with 16 to 128 channels."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    return SwinTransformer(
        [4, 4], 16, [2, 2, 2, 2], [1, 2, 2, 4], [8, 8], num_classes=10,
        block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    )  # fmt: skip


class TinyVGG(nn.Module):
    """VGG's layout with a few channels: five stages of padded 3×3 convolutions and 2×2 max pooling, then
    ``AdaptiveAvgPool2d(7)``, a flatten and two Linear layers (at 224×224 the first reads the whole 7×7 map)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (4, 8, 8, 8, 8):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(inplace=True), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TinyResNet(nn.Module):
    """ResNet's strides with a few channels: a 7×7 stride-2 stem, a 3×3 stride-2 max pooling, three stride-2
    residual stages (3×3 convolutions, 1×1 shortcuts), global average pooling and a Linear."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3))
        self.shortcuts = nn.ModuleList(nn.Conv2d(8, 8, 1, stride=2) for _ in range(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for conv, shortcut in zip(self.convs, self.shortcuts):
            x = torch.relu(conv(x) + shortcut(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SignalClassifier(nn.Module):
    """A 1D signal classifier for 1×1000 input: three Conv1d stages (padded, pooled), then flatten → Linear → Linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 7, padding=3), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
        )  # fmt: skip
        self.fc1 = nn.Linear(32 * 31, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class VolumeClassifier(nn.Module):
    """A 3D volume classifier for 1×64×64×64 input: three Conv3d stages, then ``x.view(N, -1)`` → Linear → Linear."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(16 * 8 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.5))
        self.out = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.out(self.classifier(x.view(x.size(0), -1)))


class TwoHeadedDetector(nn.Module):
    """A detector's head as Keras ports write it: 3×14×16 in, no padding (total stride 2), a 6×4×5 map
    flattened in (W, H, C) order by ``x.permute(0, 3, 2, 1)``, Linear → PReLU (one slope per feature), then
    class scores (Linear → softmax) and box regression (Linear, 4), returned as a dict (or a tuple)."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU())
        self.fc = nn.Linear(5 * 4 * 6, 32)
        self.act = nn.PReLU(32)
        self.classes = nn.Linear(32, 5)
        self.boxes = nn.Linear(32, 4)

    def forward(self, x):
        hidden = self.act(self.fc(self.features(x).permute(0, 3, 2, 1).flatten(1)))
        scores, boxes = torch.softmax(self.classes(hidden), dim=1), self.boxes(hidden)
        return (scores, boxes) if self.as_tuple else {"class_scores": scores, "boxes": boxes}


class SoftmaxVGG(nn.Module):
    """VGG16's layout at 3×16×16: padded convolutions to a 16×4×4 map, an adaptive pooling that is the
    identity there, ``classifier`` = Linear → ReLU → Dropout → Linear → ReLU → Dropout → Linear, then softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 6),
        )  # fmt: skip

    def forward(self, x):
        return torch.softmax(self.classifier(torch.flatten(self.avgpool(self.features(x)), 1)), dim=1)


class SlopePerWindowElement(nn.Module):
    """A PReLU with one slope per element of the flattened 4×6×6 window, before the first Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.PReLU(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x).flatten(1)))


class FramewiseAudio(nn.Module):
    """A frame classifier of 400-sample waveforms taken as (N, L), no channel axis: ``x.unsqueeze(1).unsqueeze(-1)``
    makes (N, 1, L, 1) for Conv2d over an (L, 1) map (three unpadded stride-2 stages, 400 → 48), then the 16×48×1
    map is permuted to (N, 1, 16, 48) and flattened into Linear(768 → 32) → ReLU → Linear(32 → 6)."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, (5, 1), stride=(2, 1)), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, (3, 1), stride=(2, 1)), nn.ReLU(),
            nn.Conv2d(16, 16, (3, 1), stride=(2, 1)), nn.ReLU(),
        )  # fmt: skip
        self.fc1 = nn.Linear(16 * 48, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.features(x.unsqueeze(1).unsqueeze(-1))
        x = x.permute(0, 3, 1, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class PooledAudio(FramewiseAudio):
    """FramewiseAudio's trunk with a global average over the (L, 1) map before one Linear(16 → 6): any length."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__(num_classes)
        del self.fc1, self.fc2
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x.unsqueeze(1).unsqueeze(-1)).mean(dim=(2, 3)))


class WaveformMLP(nn.Module):
    """Linear layers straight on a 400-sample waveform (N, L): no convolution slides along it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(400, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
