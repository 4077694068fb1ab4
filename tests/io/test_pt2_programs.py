"""Programs saved with torch.export.save as input: a batch fixed at 1, and heads with a LayerNorm or an in-place dropout."""

import pytest
import torch
from conftest import seeded
from test_cli import run
from torch import nn
from torch.export import Dim

import fcconv
from fcconv.load import load_model


class SqueezeExcite(nn.Module):
    """A trunk that spells the batch and map sizes it reads (view(b, c, -1), expand(b, c, h, w)), then a pooled head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b, c, h, w = x.shape
        y = torch.sigmoid(self.gate(x.view(b, c, -1).mean(2).view(b, c, 1, 1)))
        return self.fc((x * y.expand(b, c, h, w)).mean((2, 3)))


class ClassToken(nn.Module):
    """A learnt token expanded to the batch (to 1 in a program with the batch fixed at 1) and joined to the map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.token = nn.Parameter(torch.randn(1, 8, 1))
        self.fc = nn.Linear(8 * 37, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(2)
        return self.fc(torch.cat([self.token.expand(x.shape[0], -1, -1), x], 2).flatten(1))


class NormedHead(nn.Module):
    """Pooling, flatten, LayerNorm over the channels (with or without its weight and bias), in-place dropout, Linear."""

    def __init__(self, **norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(8, **norm)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.uniform_(0.5, 2)

    def forward(self, x):
        return self.fc(self.drop(self.norm(self.pool(torch.relu(self.conv(x))).flatten(1))))


FREE_MAP = {2: Dim("height", min=8), 3: Dim("width", min=8)}


def saved(path, model, example, dynamic_shapes=None):
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes), path)
    return path


def test_a_program_exported_at_a_fixed_batch_of_1_converts_verifies_and_takes_any_batch(tmp_path):
    model = seeded(SqueezeExcite)
    path = saved(tmp_path / "se.pt2", model, torch.randn(1, 3, 8, 8), (FREE_MAP,))
    result = run("convert", path, "-o", tmp_path / "se.fcn.pt2")
    assert result.returncode == 0, result.stderr
    written = torch.export.load(tmp_path / "se.fcn.pt2").module()
    x = torch.randn(3, 3, 12, 10)
    with torch.no_grad():
        expected = torch.cat([model(sample) for sample in x.split(1)])
        assert torch.allclose(written(x).flatten(1), expected, rtol=1e-4, atol=1e-6)


def test_a_program_with_its_batch_and_size_fixed_is_refused_for_its_size_not_its_batch(tmp_path):
    path = saved(tmp_path / "se.pt2", seeded(SqueezeExcite), torch.randn(1, 3, 8, 8))
    result = run("convert", path)
    assert result.returncode == 3, result.stderr
    assert "fixed to the native 8×8" in result.stderr and "cannot take an input of shape" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_program_that_computes_with_its_fixed_batch_of_1_is_refused_in_one_line_saying_so(tmp_path):
    path = saved(tmp_path / "token.pt2", seeded(ClassToken), torch.randn(1, 3, 8, 8))
    result = run("convert", path)
    assert result.returncode == 2
    assert "batch fixed at 1" in result.stderr and "Dim('batch')" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("norm", [{"bias": False}, {"elementwise_affine": False}], ids=["no bias", "no weight"])
def test_a_program_head_with_a_layer_norm_after_the_pooling_converts_and_equals_the_program(tmp_path, norm):
    model = seeded(NormedHead, **norm)
    path = saved(tmp_path / "head.pt2", model, torch.randn(2, 3, 8, 8), ({0: Dim("batch"), **FREE_MAP},))
    loaded = load_model(path)
    converted = fcconv.convert(loaded.module, loaded.input_shape).eval()
    program = torch.export.load(path).module()
    with torch.no_grad():
        for size in [(8, 8), (11, 13), (16, 16)]:
            x = torch.randn(2, 3, *size)
            assert torch.allclose(converted(x).flatten(1), program(x), rtol=1e-4, atol=1e-6), size


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_program_head_with_an_in_place_dropout_converts_as_the_model_in_eval_mode(tmp_path, mode):
    model = seeded(NormedHead)
    path = saved(tmp_path / "head.pt2", getattr(model, mode)(), torch.randn(2, 3, 8, 8), ({0: Dim("batch")},))
    assert any("dropout" in str(n.target) for n in torch.export.load(path).graph.nodes)  # recorded, in either mode
    result = run("convert", path, "-o", tmp_path / "head.fcn.pt2")
    assert result.returncode == 0, result.stderr
    written = torch.export.load(tmp_path / "head.fcn.pt2").module()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(written(x).flatten(1), model.eval()(x), rtol=1e-4, atol=1e-6)


def test_a_program_exported_in_training_mode_with_a_batch_norm_is_refused_in_one_line(tmp_path):
    model = seeded(
        nn.Sequential, nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    path = saved(tmp_path / "train.pt2", model.train(), torch.randn(2, 3, 8, 8), ({0: Dim("batch")},))
    result = run("convert", path)
    assert result.returncode == 2
    assert "training mode" in result.stderr and "model.eval()" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
