"""The head: one interpreter decides every head family, and both front ends (torch.fx and ONNX) agree on it.

The first part states the interpreter's rules on plain head operations (no torch, no onnx); the second runs
each head family through both front ends side by side: a small model converted with :func:`fcconv.rewrite`,
and the same model exported to ONNX and rewritten with :func:`fcconv.onnx_rewrite.rewrite_onnx`.
"""

from __future__ import annotations

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


def test_every_reason_is_one_line():
    assert all("\n" not in text for text in REASONS.values())
