"""The core contract, for every classifier hypothesis can build: random conv/pool trunks, sizes and heads.

Each example is a 2D :class:`~generated_classifiers.Description`, a plain value hypothesis
prints when a property fails; :func:`~generated_classifiers.build` turns it into an eval-mode
model whose weights come from its seed. The trunk's sizes and total stride are worked out from
the description itself, never from fcconv, so the checks below do not lean on the code they check.
"""

from __future__ import annotations

import torch
from generated_classifiers import ACTIVATIONS, FLATTENS, Conv, Dense, Description, Pool, build, draw_head, feature_side
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fcconv

EXAMPLES = 100
"""Generated classifiers per property (derandomized, so CI sees the same ones every run)."""

RTOL = 1e-4  # the contract's float32 tolerance: max |converted - reference| <= RTOL * max |reference|
MAX_SIDE = 40

PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def random_input(description: Description, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(description.seed + 1)
    return torch.randn((batch, description.in_channels, *size), generator=generator)


# --- how hypothesis draws them --------------------------------------------------------------------


def pairs(low: int, high: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(low, high), st.integers(low, high))


@st.composite
def descriptions(draw, may_pad: bool = True) -> Description:
    """A classifier description whose feature map is not empty at its native size."""
    trunk: list[Conv | Pool] = []
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(pairs(1, 5))
        padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))) if may_pad else (0, 0)
        trunk.append(Conv(draw(st.integers(2, 8)), kernel, draw(pairs(1, 2)), padding, draw(st.booleans())))
        if draw(st.booleans()):
            pool_kernel = draw(pairs(2, 3))
            stride = draw(st.sampled_from([(1, 1), (2, 2), pool_kernel, (1, 2), (2, 1)]))
            trunk.append(Pool(draw(st.sampled_from(["max", "avg"])), pool_kernel, stride))
    trunk_ = tuple(trunk)
    # the smallest side with a non-empty map, so that few draws are rejected
    smallest = [next((s for s in range(1, MAX_SIDE + 1) if feature_side(trunk_, s, a) >= 1), None) for a in (0, 1)]
    assume(None not in smallest)
    size = (draw(st.integers(max(8, smallest[0]), MAX_SIDE)), draw(st.integers(max(8, smallest[1]), MAX_SIDE)))

    on_window = draw(st.lists(st.sampled_from([*ACTIVATIONS, "Dropout"]), max_size=1))
    head = draw_head(draw)
    description = Description(
        in_channels=draw(st.integers(1, 3)),
        size=size,
        trunk=trunk_,
        flatten=draw(st.sampled_from(FLATTENS)),
        on_window=tuple(on_window),
        head=head,
        seed=draw(st.integers(0, 2**16)),
    )
    assume(min(description.feature_size(size)) >= 1)
    return description


# Always run, whatever hypothesis draws: BatchNorm1d between Linears, a view flatten, a non-square map.
BATCH_NORM_BETWEEN_LINEARS = Description(
    in_channels=3,
    size=(21, 34),
    trunk=(Conv(6, (3, 5), (1, 2), (0, 0), True), Pool("max", (2, 2), (2, 2)), Conv(4, (3, 3), (2, 1), (0, 0), True)),
    flatten="x.view(x.size(0), -1)",
    on_window=("Dropout",),
    head=(Dense(12, False, True, "GELU", 0.5), Dense(9, True, True, "Tanh", None), Dense(5, True, False, None, None)),
    seed=7,
)


def larger_sizes(description: Description) -> tuple[tuple[int, int], tuple[int, int]]:
    """A non-square size that is the native one plus whole strides (so crops line up), and an odd unaligned one."""
    (h, w), (sh, sw) = description.size, description.stride
    aligned = (h + sh, w + 2 * sw) if h + sh != w + 2 * sw else (h + 2 * sh, w + sw)
    return aligned, (2 * h + 1, 2 * w + 1)


def assert_within_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= RTOL * scale, f"max abs diff {error:.3g} > {RTOL} × {scale:.3g}"


# --- the properties -------------------------------------------------------------------------------


@PROPERTY
@example(BATCH_NORM_BETWEEN_LINEARS)
@given(descriptions())
def test_at_the_native_size_the_output_equals_the_original(description):
    model = build(description)
    converted = fcconv.rewrite(model, (description.in_channels, *description.size)).module
    x = random_input(description, description.size, batch=3)
    with torch.no_grad():
        expected, actual = model(x), converted(x)
    assert actual.shape == (3, description.head[-1].width, 1, 1)
    assert_within_tolerance(actual.flatten(1), expected)


@PROPERTY
@example(BATCH_NORM_BETWEEN_LINEARS)
@given(descriptions())
def test_larger_inputs_pass_verification_with_the_map_the_geometry_predicts(description):
    model = build(description)
    shape = (description.in_channels, *description.size)
    conversion = fcconv.rewrite(model, shape)
    geometry = conversion.geometry
    native_features = description.feature_size(description.size)
    assert geometry.feature_shape == (description.channels, *native_features)
    assert geometry.window == native_features and geometry.stride == (1, 1)

    sizes = larger_sizes(description)
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, conversion=conversion)
    assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]
    for size, check in zip(sizes, report.checks):
        features = description.feature_size(size)
        positions = tuple((f - k) // s + 1 for f, k, s in zip(features, geometry.window, geometry.stride))
        assert check.output_shape == (2, description.head[-1].width, *positions)


@PROPERTY
@example(BATCH_NORM_BETWEEN_LINEARS)
@given(descriptions(may_pad=False))
def test_without_padding_each_position_is_the_original_run_on_its_crop(description):
    # Independent of fcconv's sliding-window reference: an unpadded trunk sees the same
    # pixels in a crop taken at a multiple of its total stride as in the whole input.
    assert not description.padded
    model = build(description)
    converted = fcconv.convert(model, (description.in_channels, *description.size))
    (h, w), (sh, sw) = description.size, description.stride
    size = larger_sizes(description)[0]
    x = random_input(description, size)
    with torch.no_grad():
        scores = converted(x)
        rows, cols = (size[0] - h) // sh + 1, (size[1] - w) // sw + 1
        assert scores.shape == (2, description.head[-1].width, rows, cols)
        crops = torch.stack(
            [
                torch.stack([model(x[:, :, i * sh : i * sh + h, j * sw : j * sw + w]) for j in range(cols)], -1)
                for i in range(rows)
            ],
            -2,
        )
    assert_within_tolerance(scores, crops)


@PROPERTY
@example(BATCH_NORM_BETWEEN_LINEARS)
@given(descriptions())
def test_every_converted_linear_is_a_convolution_the_first_one_covering_the_feature_map(description):
    model = build(description)
    conversion = fcconv.rewrite(model, (description.in_channels, *description.size))
    linears = [f"classifier.fc{i}" for i in range(1, len(description.head) + 1)]
    assert [layer.name for layer in conversion.layers] == linears
    state = conversion.module.state_dict()
    assert not [name for name, value in state.items() if value.dim() == 2]  # no Linear weight is left
    weights = [state[f"{name}.weight"] for name in linears]
    assert all(weight.dim() == 4 for weight in weights)
    assert all(isinstance(conversion.module.get_submodule(name), nn.Conv2d) for name in linears)
    assert tuple(weights[0].shape[2:]) == description.feature_size(description.size)
    assert all(tuple(weight.shape[2:]) == (1, 1) for weight in weights[1:])
