"""Optional forward() arguments: a model is called with one tensor, so the others keep their defaults.

``forward(self, x, attn_mask=None, return_features=False)`` takes one input; torch.fx traces
it with the optional arguments at their defaults. An argument without a default is an input,
and a model that needs two inputs is refused naming them.
"""

import pytest
import torch
from conftest import seeded
from torch import nn

import fcconv
import fcconv.capture
from fcconv.capture import FX, trace
from fcconv.errors import NotConvertibleError

SHAPE = (3, 8, 8)
SIZES = [(8, 8), (11, 13)]


class OptionalArguments(nn.Module):
    """Branches on its optional arguments in Python, as attention masks and feature switches do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x, attn_mask=None, return_features=False, *, scale=1.0):
        features = torch.relu(self.conv(x))
        if attn_mask is not None:
            features = features * attn_mask
        if scale != 1.0:
            features = features * scale
        flat = torch.flatten(features, 1)
        if return_features:
            return flat
        return self.fc(flat)


class UnusedOptionalArguments(OptionalArguments):
    """Takes optional arguments it never reads: nothing in the trace depends on them."""

    def forward(self, x, attn_mask=None, return_features=False):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class RequiredMask(OptionalArguments):
    """Needs a second tensor: a model of two inputs."""

    def forward(self, x, mask, return_features=False):
        return super().forward(x, mask, return_features)


def assert_verified(model, conversion):
    report = fcconv.verify(model, conversion.module, SHAPE, sizes=SIZES, batch=1, conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]


@pytest.mark.parametrize("kind", [OptionalArguments, UnusedOptionalArguments])
def test_a_model_with_optional_arguments_is_traced_with_one_input_at_their_defaults(kind):
    model = seeded(kind)
    traced = trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(2, *SHAPE)
    assert torch.equal(traced(x), model(x))
    planned = fcconv.analyze(traced, SHAPE)
    assert [layer.name for layer in planned.layers] == ["fc"]


@pytest.mark.parametrize("kind", [OptionalArguments, UnusedOptionalArguments])
def test_a_model_with_optional_arguments_converts_and_verifies_from_the_fx_trace(kind):
    model = seeded(kind)
    conversion = fcconv.rewrite(trace(model), SHAPE)
    assert conversion.captured_by == FX
    assert_verified(model, conversion)


def test_a_model_with_optional_arguments_converts_and_verifies_where_the_export_fails(monkeypatch):
    def export_fails(*args, **kwargs):
        raise RuntimeError("no export")

    monkeypatch.setattr(fcconv.capture, "export_graph", export_fails)
    model = seeded(OptionalArguments)
    conversion = fcconv.rewrite(model, SHAPE)
    assert conversion.captured_by == FX
    assert_verified(model, conversion)


def test_a_model_with_optional_arguments_converts_and_verifies_from_the_first_capture():
    model = seeded(OptionalArguments)
    assert_verified(model, fcconv.rewrite(model, SHAPE))


def test_a_model_with_a_required_second_argument_is_refused_naming_its_inputs():
    model = seeded(RequiredMask)
    assert [n.target for n in trace(model).graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    for refused in (lambda: fcconv.analyze(trace(model), SHAPE), lambda: fcconv.rewrite(model, SHAPE)):
        with pytest.raises(NotConvertibleError, match=r"^forward\(\) takes 2 inputs \(x, mask\); fcconv converts"):
            refused()


class KeywordArguments(OptionalArguments):
    """Takes ``**kwargs`` it does not read, as Hugging Face classifiers' ``forward(pixel_values, **kwargs)`` does."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x)


def test_a_model_taking_keyword_arguments_it_does_not_read_is_traced_with_one_input():
    model = seeded(KeywordArguments)
    graph = trace(model)
    assert [n.target for n in graph.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(graph(x), model(x))
