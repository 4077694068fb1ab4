"""One interpreter for the head: how each operation after the collapse carries over to every position of the map.

Each head tensor has a state. Right after the collapse it is a :class:`Window` (each sample's vector is a whole
k×k window of the map, its features read in a known order) or :class:`Features` (each position of the map holds
the features, each on a known channel). The first Linear over a window becomes a k×k convolution, every other
Linear a 1×1 one; element-wise operations carry over as they are, per-feature ones per channel, no-op reshapes
go, and anything else is refused with a reason from :data:`REASONS`. Decisions are plain data that the front
ends turn into their own edits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fcconv.errors import NotConvertibleError
from fcconv.head.vocabulary import Family, HeadOp, Kind

_BEFORE_LINEAR = "only element-wise layers may stand between the flatten and the first Linear"

REASONS: dict[str, str] = {
    # after the operation's label
    "no-equivalent": "has no exact per-position equivalent",
    "window-slopes": "has one slope per element of the flattened window ({slopes} slopes), not one per channel, "
    f"not per position; {_BEFORE_LINEAR}",
    "window-normalization": f"normalizes over the flattened window, not per position; {_BEFORE_LINEAR}",
    "window-constant": "applies a different constant to each feature of the flattened window",
    "window-softmax": "is taken over the whole flattened window, not over each position's features",
    "not-over-features": "is not taken over the features",
    "not-per-feature": "reads a constant of shape {shape} that is not one value per feature",
    "unlike-layouts": "combines tensors whose features are not laid out alike",
    "no-head-input": "reads no tensor of the head",
    "window-size": "reads {features} features from a {window} window",
    "map-size": "reads {features} features from a map of {channels} channels",
    # front-end facts, refused as they are found
    "other-input": "combines the flattened features with {name}, which fcconv cannot read per position",
    "not-constant": "reads {name}, which is neither a constant nor computed by the head",
    "not-scalar": "reads a tensor that is not a constant scalar",
    "mask-read": "has its mask read",
    "parameters-not-constant": "has parameters that are not constants",
    "from-the-right": "multiplies the features from the right",
    "weight-not-matrix": "has a weight that is not a constant matrix",
    "transposed-input": "transposes its input (transA)",
    "bias-not-constant": "has a bias that is not a constant",
    "not-per-output": "adds a constant of shape {shape} that is not one value per output feature",
    "weight-not-constant": "has a weight that is not a constant",
    "kernel-not-pointwise": "has a {kernel} kernel; on the pooled map only a 1×1 kernel acts on each position alone",
    "changes-shape": "makes a tensor of shape {shape}, not one of the shape it reads",
    # whole sentences about the outputs
    "output-window": "the flatten at {collapse} is not followed by a Linear layer{before}; "
    "a flattened window has no per-position reading",
    "no-linear": "the flatten at {collapse} is not followed by a Linear layer",
    "output-order": "the output {output} lists the map's channels in another order, and no Linear follows "
    "{collapse} to take them in that order",
    "output-not-head": "the model also returns {output}, which is not computed by the head",
}


def refusal(key: str, label: str | None = None, **facts: object) -> NotConvertibleError:
    """The one-line error for reason ``key``, after ``label`` (the operation) when given."""
    text = REASONS[key].format(**facts)
    return NotConvertibleError(f"{label} {text}" if label else text)


@dataclass(frozen=True, eq=False)
class Window:
    """Each sample's vector is a whole window of shape (C, *k): feature i reads element ``order[i]`` of it."""

    shape: tuple[int, ...]
    order: np.ndarray

    def same(self, other: object) -> bool:
        return isinstance(other, Window) and self.shape == other.shape and np.array_equal(self.order, other.order)


@dataclass(frozen=True, eq=False)
class Features:
    """Each position holds the features: feature i sits on channel ``channels[i]`` of the map."""

    channels: np.ndarray

    def same(self, other: object) -> bool:
        return isinstance(other, Features) and np.array_equal(self.channels, other.channels)


State = Window | Features


class Action(enum.Enum):
    """What becomes of one head operation on the map."""

    KXK_CONV = "k×k conv"
    POINTWISE_CONV = "1×1 conv"
    CARRY = "carry"
    """Kept as it is: it acts on each feature alone."""
    CARRY_PER_CHANNEL = "carry per channel"
    """Kept, acting on the channel axis; its per-feature constants are laid out per channel."""
    DROP = "drop"


@dataclass(frozen=True, eq=False)
class Decision:
    """What becomes of ``op``, and the layout that tells the emitter how.

    KXK_CONV: ``order`` is the window's feature order (weight column i multiplies element ``order[i]`` of the
    (C, *k) window) and ``window`` its shape. POINTWISE_CONV and CARRY_PER_CHANNEL: ``order`` is the channel each
    input feature sits on.
    """

    op: HeadOp
    action: Action
    order: np.ndarray | None = None
    window: tuple[int, ...] | None = None


@dataclass
class Interpretation:
    """The decisions in the operations' order, and the state of every head tensor after them."""

    decisions: list[Decision] = field(default_factory=list)
    states: dict[str, State] = field(default_factory=dict)

    def decision(self, op: HeadOp) -> Decision:
        return next(d for d in self.decisions if d.op is op)


def identity_features(channels: int) -> Features:
    return Features(np.arange(channels))


def per_channel(value: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """A per-feature constant (or one value) as one value per map channel: the value of the feature on each."""
    flat = np.asarray(value).reshape(-1)
    if flat.size == 1:
        return flat
    laid_out = np.empty_like(flat)
    laid_out[channels] = flat
    return laid_out


def interpret(ops: Iterable[HeadOp], initial: dict[str, State]) -> Interpretation:
    """Decide every operation in order, from the states of the tensors the head starts from; refuse the first
    that has no exact per-position form."""
    result = Interpretation(states=dict(initial))
    for op in ops:
        decision = _decide(op, [result.states[name] for name in op.reads if name in result.states])
        result.decisions.append(decision)
        state = _state_after(decision, [result.states[name] for name in op.reads if name in result.states])
        result.states.update((name, state) for name in op.writes)
    return result


def _decide(op: HeadOp, inputs: list[State]) -> Decision:
    if op.kind is Kind.OTHER and op.reason != "no-equivalent":
        raise refusal(op.reason, op.label, **dict(op.detail))
    if not inputs:
        raise refusal("no-head-input", op.label)
    state = inputs[0]
    if any(not state.same(other) for other in inputs[1:]):
        raise refusal("unlike-layouts", op.label)
    window = isinstance(state, Window)
    if op.kind is Kind.LINEAR:
        return _decide_linear(op, state)
    if op.kind in (Kind.ELEMENTWISE, Kind.SQUASHING, Kind.BINARY):
        return Decision(op, Action.CARRY)
    if op.kind is Kind.NOOP_RESHAPE:
        return Decision(op, Action.DROP)
    if op.kind is Kind.BINARY_CONSTANT and all(_size(shape) == 1 for shape in op.constants):
        return Decision(op, Action.CARRY)
    if window:
        raise refusal(_window_reason(op), op.label, slopes=max(map(_size, op.constants), default=1))
    if op.kind in (Kind.PER_FEATURE, Kind.BINARY_CONSTANT, Kind.CHANNEL_SOFTMAX):
        if not op.over_features:
            raise refusal("not-over-features", op.label)
        for shape in op.constants:
            # one value, or one per feature along the feature (last) axis
            if _size(shape) != 1 and (_size(shape) != state.channels.size or shape[-1] != state.channels.size):
                raise refusal("not-per-feature", op.label, shape=shape)
        return Decision(op, Action.CARRY_PER_CHANNEL, state.channels)
    raise refusal("no-equivalent", op.label)


def _window_reason(op: HeadOp) -> str:
    """Why ``op`` cannot act on a flattened window: it acts on the window's features as a whole or one by one."""
    if op.kind is Kind.CHANNEL_SOFTMAX:
        return "window-softmax"
    if op.kind is Kind.BINARY_CONSTANT or op.family is Family.CONSTANT:
        return "window-constant"
    if op.family is Family.SLOPES:
        return "window-slopes"
    if op.family is Family.NORMALIZATION:
        return "window-normalization"
    return "no-equivalent"


def _decide_linear(op: HeadOp, state: State) -> Decision:
    if isinstance(state, Window):
        if op.in_features is not None and op.in_features != state.order.size:
            raise refusal("window-size", op.label, features=op.in_features, window="×".join(map(str, state.shape)))
        return Decision(op, Action.KXK_CONV, state.order, state.shape)
    if op.in_features is not None and op.in_features != state.channels.size:
        raise refusal("map-size", op.label, features=op.in_features, channels=state.channels.size)
    return Decision(op, Action.POINTWISE_CONV, state.channels)


def _state_after(decision: Decision, inputs: list[State]) -> State:
    if decision.action in (Action.KXK_CONV, Action.POINTWISE_CONV):
        return identity_features(int(decision.op.out_features))
    return inputs[0]


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def check_outputs(outputs: Sequence[str], states: dict[str, State], collapse: str, *, before: bool = False) -> None:
    """Refuse an output that is not computed by the head, still a flattened window, or whose features are not the
    map's channels in order (nothing would put them back in order). ``before`` names the output in the reason."""
    for name in outputs:
        state = states.get(name)
        if state is None:
            raise refusal("output-not-head", output=name)
        if isinstance(state, Window):
            raise refusal("output-window", collapse=collapse, before=f" before {name}" if before else "")
        if not np.array_equal(state.channels, np.arange(state.channels.size)):
            raise refusal("output-order", output=name, collapse=collapse)
