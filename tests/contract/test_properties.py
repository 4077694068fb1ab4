"""The core contract, for every classifier hypothesis can build in 1D, 2D and 3D: random conv/pool trunks, sizes, heads.

Each example is a :class:`~generated_classifiers.Description` of a signal (rank 1), an image (rank 2) or a volume
(rank 3), a plain value hypothesis prints when a property fails; :func:`~generated_classifiers.build` turns it into
an eval-mode model whose weights come from its seed. The trunk's sizes and total stride are worked out from the
description itself, never from fcconv, so the checks below do not lean on the code they check. Each property is
stated once and runs for every rank, on that rank's fixed example and on the ones hypothesis draws.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from generated_classifiers import (
    ACTIVATIONS,
    CONV,
    FLATTENS,
    Conv,
    Dense,
    Description,
    Pool,
    build,
    draw_head,
    feature_side,
)
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fcconv

RANKS = (1, 2, 3)
EXAMPLES = {1: 6, 2: 100, 3: 6}
"""Generated classifiers per property and rank (derandomized, so CI sees the same ones every run); a 1D or 3D
example costs several 2D ones, and the other ranks share the 2D code paths but their convolutions."""

RTOL = 1e-4  # the contract's float32 tolerance: max |converted - reference| <= RTOL * max |reference|
SIDES = {1: (16, 120), 2: (8, 40), 3: (6, 16)}  # the native size's range per axis
KERNELS = {1: 9, 2: 5, 3: 3}  # the largest kernel per axis
STRIDES = {1: 3, 2: 2, 3: 2}  # the largest convolution stride per axis
WIDTHS = {1: 6, 2: 8, 3: 6}  # the most channels a convolution gives
MIXED_POOL_STRIDES = {1: [], 2: [(1, 2), (2, 1)], 3: []}  # besides all 1, all 2 and the kernel


def random_input(description: Description, size: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(description.seed + 1)
    return torch.randn((batch, description.in_channels, *size), generator=generator)


def assert_within_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= RTOL * scale, f"max abs diff {error:.3g} > {RTOL} × {scale:.3g}"


# --- how hypothesis draws them --------------------------------------------------------------------


def per_axis(rank: int, low: int, high: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(low, high)] * rank)


@st.composite
def descriptions(draw, rank: int, may_pad: bool = True) -> Description:
    """A classifier description of ``rank`` whose feature map is not empty at its native size."""
    trunk: list[Conv | Pool] = []
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(per_axis(rank, 1, KERNELS[rank]))
        padding = tuple(draw(st.integers(0, k // 2)) for k in kernel) if may_pad else (0,) * rank
        stride = draw(per_axis(rank, 1, STRIDES[rank]))
        trunk.append(Conv(draw(st.integers(2, WIDTHS[rank])), kernel, stride, padding, draw(st.booleans())))
        if draw(st.booleans()):
            pool_kernel = draw(per_axis(rank, 2, 3))
            pool_stride = draw(st.sampled_from([(1,) * rank, (2,) * rank, pool_kernel, *MIXED_POOL_STRIDES[rank]]))
            trunk.append(Pool(draw(st.sampled_from(["max", "avg"])), pool_kernel, pool_stride))
    trunk_ = tuple(trunk)
    low, high = SIDES[rank]
    # the smallest side with a non-empty map, so that few draws are rejected
    smallest = [next((s for s in range(1, high + 1) if feature_side(trunk_, s, a) >= 1), None) for a in range(rank)]
    assume(None not in smallest)
    size = tuple(draw(st.integers(max(low, s), high)) for s in smallest)
    description = Description(
        in_channels=draw(st.integers(1, 3)),
        size=size,
        trunk=trunk_,
        flatten=draw(st.sampled_from(FLATTENS)),
        on_window=tuple(draw(st.lists(st.sampled_from([*ACTIVATIONS, "Dropout"]), max_size=1))),
        head=draw_head(draw),
        seed=draw(st.integers(0, 2**16)),
    )
    assume(min(description.feature_size(size)) >= 1)
    return description


# Always run, whatever hypothesis draws: BatchNorm1d between Linears, a view flatten, a map that is not square
# (2D) or cubic (3D).
FIXED = {
    1: Description(
        in_channels=2,
        size=(97,),
        trunk=(Conv(6, (7,), (2,), (0,), True), Pool("max", (3,), (3,)), Conv(4, (5,), (1,), (0,), True)),
        flatten="x.view(x.size(0), -1)",
        on_window=("Dropout",),
        head=(Dense(12, False, True, "GELU", 0.5), Dense(9, True, True, "Tanh", None), Dense(5, True, False, None, None)),
        seed=7,
    ),
    2: Description(
        in_channels=3,
        size=(21, 34),
        trunk=(Conv(6, (3, 5), (1, 2), (0, 0), True), Pool("max", (2, 2), (2, 2)), Conv(4, (3, 3), (2, 1), (0, 0), True)),
        flatten="x.view(x.size(0), -1)",
        on_window=("Dropout",),
        head=(Dense(12, False, True, "GELU", 0.5), Dense(9, True, True, "Tanh", None), Dense(5, True, False, None, None)),
        seed=7,
    ),
    3: Description(
        in_channels=1,
        size=(11, 13, 16),
        trunk=(Conv(4, (3, 3, 3), (1, 2, 1), (0, 0, 0), True), Pool("avg", (2, 2, 2), (2, 2, 2)),
               Conv(5, (2, 1, 3), (1, 1, 2), (0, 0, 0), True)),
        flatten="nn.Flatten()",
        on_window=(),
        head=(Dense(8, True, True, "ReLU", None), Dense(3, False, False, None, None)),
        seed=11,
    ),
}  # fmt: skip


def for_every_classifier(rank: int, may_pad: bool = True):
    """Makes a property of one description a hypothesis test of ``rank``: its fixed example and EXAMPLES[rank] drawn.

    Hypothesis's settings and explicit examples belong to one function, and each rank has its own, so every
    parametrized test decorates a property defined in its body (a fresh function per rank)."""
    run = settings(
        max_examples=EXAMPLES[rank], deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    return lambda check: run(example(FIXED[rank])(given(descriptions(rank, may_pad))(check)))


def larger_sizes(description: Description) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A size that is the native one plus whole strides along every axis (so crops line up; in 2D not square), and
    an odd unaligned one."""
    size, stride = description.size, description.stride
    steps = {1: (3,), 2: (1, 2), 3: (1, 2, 1)}[description.rank]
    aligned = tuple(n + k * s for n, k, s in zip(size, steps, stride))
    if description.rank == 2 and aligned[0] == aligned[1]:
        aligned = (size[0] + 2 * stride[0], size[1] + stride[1])
    return aligned, tuple(2 * n + 1 for n in size)


# --- the properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
def test_at_the_native_size_the_output_equals_the_original(rank):
    @for_every_classifier(rank)
    def holds(description):
        model = build(description)
        converted = fcconv.rewrite(model, (description.in_channels, *description.size)).module
        x = random_input(description, description.size, batch=3)
        with torch.no_grad():
            expected, actual = model(x), converted(x)
        assert actual.shape == (3, description.head[-1].width, *(1,) * rank)
        assert_within_tolerance(actual.flatten(1), expected)

    holds()


@pytest.mark.parametrize("rank", RANKS)
def test_larger_inputs_pass_verification_with_the_map_the_geometry_predicts(rank):
    @for_every_classifier(rank)
    def holds(description):
        model = build(description)
        shape = (description.in_channels, *description.size)
        conversion = fcconv.rewrite(model, shape)
        geometry = conversion.geometry
        native_features = description.feature_size(description.size)
        assert geometry.feature_shape == (description.channels, *native_features)
        assert geometry.window == native_features and geometry.stride == (1,) * rank

        sizes = larger_sizes(description)
        report = fcconv.verify(model, conversion.module, shape, sizes=sizes, conversion=conversion)
        assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]
        for size, check in zip(sizes, report.checks):
            features = description.feature_size(size)
            positions = tuple((f - k) // s + 1 for f, k, s in zip(features, geometry.window, geometry.stride))
            assert check.output_shape == (2, description.head[-1].width, *positions)

    holds()


@pytest.mark.parametrize("rank", RANKS)
def test_without_padding_each_position_is_the_original_run_on_its_crop(rank):
    # Independent of fcconv's sliding-window reference: an unpadded trunk sees the same
    # samples in a crop taken at a multiple of its total stride as in the whole input.
    @for_every_classifier(rank, may_pad=False)
    def holds(description):
        assert not description.padded
        model = build(description)
        converted = fcconv.convert(model, (description.in_channels, *description.size))
        size = larger_sizes(description)[0]
        x = random_input(description, size)
        positions = [(s - n) // step + 1 for s, n, step in zip(size, description.size, description.stride)]
        with torch.no_grad():
            scores = converted(x)
            assert scores.shape == (2, description.head[-1].width, *positions)
            for index in itertools.product(*map(range, positions)):
                crop = tuple(
                    slice(i * step, i * step + n) for i, step, n in zip(index, description.stride, description.size)
                )
                assert_within_tolerance(scores[(slice(None), slice(None), *index)], model(x[(..., *crop)]))

    holds()


@pytest.mark.parametrize("rank", RANKS)
def test_every_converted_linear_is_a_convolution_of_the_maps_rank_the_first_covering_it(rank):
    @for_every_classifier(rank)
    def holds(description):
        model = build(description)
        conversion = fcconv.rewrite(model, (description.in_channels, *description.size))
        linears = [f"classifier.fc{i}" for i in range(1, len(description.head) + 1)]
        assert [layer.name for layer in conversion.layers] == linears
        state = conversion.module.state_dict()
        assert not [name for name, value in state.items() if value.dim() == 2]  # no Linear weight is left
        weights = [state[f"{name}.weight"] for name in linears]
        assert all(weight.dim() == rank + 2 for weight in weights)
        assert all(isinstance(conversion.module.get_submodule(name), CONV[rank]) for name in linears)
        assert tuple(weights[0].shape[2:]) == description.feature_size(description.size)
        assert all(tuple(weight.shape[2:]) == (1,) * rank for weight in weights[1:])
        for layer in conversion.layers:
            assert layer.after.startswith(f"Conv{rank}d(")

    holds()
