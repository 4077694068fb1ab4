"""The head: one interpreter decides every head family, and both front ends (torch.fx and ONNX) agree on it.

The first part states the interpreter's rules on plain head operations (no torch, no onnx); the second runs
each head family through both front ends side by side: a small model converted with :func:`fcconv.rewrite`,
and the same model exported to ONNX and rewritten with :func:`fcconv.onnx_rewrite.rewrite_onnx`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fcconv.errors import NotConvertibleError
from fcconv.head.interpret import (
    REASONS,
    Action,
    Features,
    Window,
    check_outputs,
    identity_features,
    interpret,
    per_channel,
)
from fcconv.head.order import feature_order, weight_columns
from fcconv.head.vocabulary import Family, HeadOp, Kind

# --- the interpreter on plain head operations ---------------------------------------------------------------


def op(kind, reads=("x",), writes=("y",), label="node", **facts):
    return HeadOp(label=label, kind=kind, reads=tuple(reads), writes=tuple(writes), **facts)


def window(channels=2, size=(3, 3), order=None):
    count = channels * int(np.prod(size))
    return Window((channels, *size), np.arange(count) if order is None else np.asarray(order))


def reason(key, **facts):
    """The table's text for ``key`` as a regex (its facts filled in)."""
    import re

    return re.escape(REASONS[key].format(**facts))


def test_the_first_linear_over_a_window_becomes_a_kxk_conv_and_the_next_a_pointwise_conv():
    order = np.random.default_rng(0).permutation(18)
    ops = [
        op(Kind.LINEAR, ("x",), ("h",), in_features=18, out_features=4),
        op(Kind.ELEMENTWISE, ("h",), ("a",)),
        op(Kind.LINEAR, ("a",), ("y",), in_features=4, out_features=3),
    ]
    result = interpret(ops, {"x": window(order=order)})
    actions = [d.action for d in result.decisions]
    assert actions == [Action.KXK_CONV, Action.CARRY, Action.POINTWISE_CONV]
    assert np.array_equal(result.decisions[0].order, order) and result.decisions[0].window == (2, 3, 3)
    assert np.array_equal(result.decisions[2].order, np.arange(4))
    assert np.array_equal(result.states["y"].channels, np.arange(3))
    check_outputs(["y"], result.states, "flatten")


def test_a_per_feature_constant_is_laid_out_by_the_channel_each_feature_sits_on():
    channels = np.array([2, 0, 1])
    result = interpret([op(Kind.PER_FEATURE, constants=((3,),))], {"x": Features(channels)})
    (decision,) = result.decisions
    assert decision.action is Action.CARRY_PER_CHANNEL and np.array_equal(decision.order, channels)
    # feature i has value 10 * i and sits on channel channels[i]
    assert per_channel(np.array([0.0, 10.0, 20.0]), channels).tolist() == [10.0, 20.0, 0.0]
    assert per_channel(np.array([5.0]), channels).tolist() == [5.0]


@pytest.mark.parametrize(
    "head_op, decided",
    [
        (op(Kind.ELEMENTWISE), Action.CARRY),
        (op(Kind.SQUASHING), Action.CARRY),
        (op(Kind.NOOP_RESHAPE), Action.DROP),
        (op(Kind.BINARY_CONSTANT, constants=((1,),)), Action.CARRY),
        (op(Kind.BINARY, ("x", "x")), Action.CARRY),
    ],
)
def test_what_acts_on_each_feature_alone_is_carried_over_a_window_as_it_is(head_op, decided):
    assert interpret([head_op], {"x": window()}).decisions[0].action is decided


@pytest.mark.parametrize(
    "head_op, key, facts",
    [
        (op(Kind.PER_FEATURE, family=Family.SLOPES, constants=((18,),)), "window-slopes", {"slopes": 18}),
        (op(Kind.PER_FEATURE, family=Family.NORMALIZATION, constants=((18,),)), "window-normalization", {}),
        (op(Kind.OTHER, family=Family.NORMALIZATION), "window-normalization", {}),
        (op(Kind.BINARY_CONSTANT, constants=((18,),)), "window-constant", {}),
        (op(Kind.CHANNEL_SOFTMAX), "window-softmax", {}),
        (op(Kind.GLOBAL_POOL), "no-equivalent", {}),
        (op(Kind.LINEAR, in_features=7, out_features=2), "window-size", {"features": 7, "window": "2×3×3"}),
    ],
)
def test_what_reads_a_window_feature_by_feature_or_as_a_whole_is_refused_with_its_reason(head_op, key, facts):
    with pytest.raises(NotConvertibleError, match="^node " + reason(key, **facts)):
        interpret([head_op], {"x": window()})


@pytest.mark.parametrize(
    "head_op, key, facts",
    [
        (op(Kind.CHANNEL_SOFTMAX, over_features=False), "not-over-features", {}),
        (op(Kind.PER_FEATURE, constants=((5,),)), "not-per-feature", {"shape": (5,)}),
        (op(Kind.BINARY_CONSTANT, constants=((4, 1),)), "not-per-feature", {"shape": (4, 1)}),
        (op(Kind.LINEAR, in_features=5, out_features=2), "map-size", {"features": 5, "channels": 4}),
        (op(Kind.BINARY, ("x", "w")), "unlike-layouts", {}),
        (op(Kind.ELEMENTWISE, ()), "no-head-input", {}),
        (op(Kind.OTHER, reason="transposed-input"), "transposed-input", {}),
        (op(Kind.COLLAPSE), "no-equivalent", {}),
    ],
)
def test_what_has_no_per_position_form_on_features_is_refused_with_its_reason(head_op, key, facts):
    with pytest.raises(NotConvertibleError, match="^node " + reason(key, **facts)):
        interpret([head_op], {"x": identity_features(4), "w": window()})


def test_an_output_still_a_window_or_in_another_channel_order_is_refused():
    states = {"w": window(), "p": Features(np.array([1, 0])), "y": identity_features(2)}
    check_outputs(["y"], states, "flatten")
    with pytest.raises(NotConvertibleError, match="flatten at flatten is not followed by a Linear layer before w;"):
        check_outputs(["y", "w"], states, "flatten", before=True)
    with pytest.raises(NotConvertibleError, match="the output p lists the map's channels in another order"):
        check_outputs(["p"], states, "flatten")
    with pytest.raises(NotConvertibleError, match="the model also returns z, which is not computed by the head"):
        check_outputs(["z"], states, "flatten")


def test_the_feature_order_of_a_layout_chain_is_the_index_array_passed_through_it():
    # a channels-last flatten of a 3×2×4 map: feature (h, w, c) reads element (c, h, w)
    order = feature_order((3, 2, 4), [("transpose", (1, 2, 0))])
    assert [int(order[(h * 4 + w) * 3 + c]) for h in range(2) for w in range(4) for c in range(3)] == [
        c * 8 + h * 4 + w for h in range(2) for w in range(4) for c in range(3)
    ]
    shuffled = feature_order((4, 1, 1), [("reshape", (2, 2, 1, 1)), ("transpose", (1, 0, 2, 3))])
    assert shuffled.tolist() == [0, 2, 1, 3]
    weight = np.arange(24).reshape(1, 24)
    in_map_order = weight[:, weight_columns(order)]  # column j multiplies map element j
    assert all(in_map_order[0, order[i]] == weight[0, i] for i in range(24))


def test_every_reason_is_one_line():
    assert all("\n" not in text for text in REASONS.values())


# --- each head family through both front ends, side by side ---------------------------------------------------

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn

import fcconv  # noqa: E402
from fcconv.onnx_rewrite import load_onnx_classifier, rewrite_onnx  # noqa: E402

SHAPE = (3, 8, 8)  # a 3×3 conv makes a 4×6×6 map: the flattened window has 144 features


class Head(nn.Module):
    """A conv trunk and the head given as a function of the flattened (or pooled) features."""

    def __init__(self, head, *layers, permute=False):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Conv2d(3, 4, 3)
        self.layers = nn.ModuleList(layers)
        self.head, self.permute = head, permute
        for layer in layers:
            if isinstance(layer, (nn.BatchNorm1d, nn.LayerNorm)):
                with torch.no_grad():  # statistics and affine parameters that are not the identity
                    for tensor in [*layer.parameters(), *layer.buffers()]:
                        if tensor.is_floating_point():
                            tensor.copy_(torch.rand_like(tensor) + 0.5)
        self.register_buffer("scale", torch.rand(10) + 0.5)
        self.register_buffer("window_scale", torch.rand(144) + 0.5)
        self.eval()

    def forward(self, x):
        x = self.trunk(x)
        x = (x.permute(0, 2, 3, 1) if self.permute else x).flatten(1)
        return self.head(self, x, *self.layers)


def linear(features_in=144, features_out=10):
    return nn.Linear(features_in, features_out)


FAMILIES = {
    "element-wise between linears": Head(
        lambda m, x, a, b: b(torch.relu(nn.functional.dropout(a(x), 0.5, False)) * 2.0 - 1.0), linear(), linear(10, 5)
    ),
    "BatchNorm1d": Head(lambda m, x, a, bn, b: b(torch.relu(bn(a(x)))), linear(), nn.BatchNorm1d(10), linear(10, 5)),
    "PReLU per channel": Head(lambda m, x, a, act, b: b(act(a(x))), linear(), nn.PReLU(10, 0.1), linear(10, 5)),
    "LayerNorm over the features": Head(lambda m, x, a, n, b: b(n(a(x))), linear(), nn.LayerNorm(10), linear(10, 5)),
    "channel softmax": Head(lambda m, x, a, b: torch.softmax(b(torch.relu(a(x))), 1), linear(), linear(10, 5)),
    "binary with a per-feature constant": Head(lambda m, x, a, b: b(a(x) * m.scale + 0.5), linear(), linear(10, 5)),
    "no-op reshape": Head(lambda m, x, a: a(x).reshape(x.shape[0], -1), linear()),
    "permuted flatten": Head(lambda m, x, a, b: b(torch.relu(a(x))), linear(), linear(10, 5), permute=True),
    "several outputs": Head(lambda m, x, a, b: (lambda y: (y, torch.sigmoid(b(y))))(a(x)), linear(), linear(10, 5)),
}
REFUSED = {
    "normalization over the window": (
        Head(lambda m, x, n, a: a(n(x)), nn.LayerNorm(144), linear()),
        "window-normalization",
    ),
    "per-feature constant on the window": (Head(lambda m, x, a: a(x * m.window_scale), linear()), "window-constant"),
    "output still a window": (Head(lambda m, x: torch.relu(x)), "output-window"),
}


def export(model, path):
    x = torch.randn(1, *SHAPE)
    with torch.no_grad():
        out = model(x)
    names = [f"out{i}" for i in range(len(out) if isinstance(out, tuple) else 1)]
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and enough for these heads
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=names, opset_version=17)
    return names


def run_onnx(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


def key_of(message):
    """The key of the table's reason that ``message`` gives (its facts matched by anything)."""
    import re

    keys = [
        key
        for key, text in REASONS.items()
        if re.search(".*".join(re.escape(part) for part in re.split(r"\{[^}]*\}", text)), message)
    ]
    assert keys, message
    return max(keys, key=lambda key: len(REASONS[key]))  # the most specific: one reason's text may start another's


@pytest.mark.parametrize("family", list(FAMILIES))
def test_both_front_ends_convert_each_head_family_alike(tmp_path, family):
    model = FAMILIES[family]
    conversion = fcconv.rewrite(model, SHAPE)
    export(model, tmp_path / "model.onnx")
    onnx_conversion = rewrite_onnx(load_onnx_classifier(tmp_path / "model.onnx"))
    assert [layer.kernel for layer in conversion.layers] == [layer.kernel for layer in onnx_conversion.layers]
    assert [layer.in_map for layer in conversion.layers] == [layer.in_map for layer in onnx_conversion.layers]
    with torch.no_grad():
        native = torch.randn(2, *SHAPE)
        expected = as_list(model(native))
        for got in (as_list(conversion.module(native)), run_onnx(onnx_conversion.model, native)):
            for want, out in zip(expected, got, strict=True):
                assert torch.allclose(torch.as_tensor(out).flatten(1), want, atol=1e-5)
        larger = torch.randn(2, 3, 13, 11)  # an 8×6 map of scores from each front end, the same
        for by_fx, by_onnx in zip(as_list(conversion.module(larger)), run_onnx(onnx_conversion.model, larger)):
            assert by_fx.shape == by_onnx.shape == (2, by_fx.shape[1], 6, 4)
            assert torch.allclose(by_fx, torch.as_tensor(by_onnx), atol=1e-5)


@pytest.mark.parametrize("case", list(REFUSED))
def test_both_front_ends_refuse_each_head_that_has_no_per_position_form_with_one_reason(tmp_path, case):
    model, key = REFUSED[case]
    with pytest.raises(NotConvertibleError) as by_fx:
        fcconv.rewrite(model, SHAPE)
    export(model, tmp_path / "model.onnx")
    with pytest.raises(NotConvertibleError) as by_onnx:
        rewrite_onnx(load_onnx_classifier(tmp_path / "model.onnx"))
    assert key_of(str(by_fx.value)) == key_of(str(by_onnx.value)) == key
