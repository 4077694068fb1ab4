"""``--rank``: each fully connected layer of the head becomes two convolutions from its truncated SVD.

The contract: the converted model equals the original with each fully connected weight replaced by its rank-R
truncation, computed here independently (numpy's SVD in float64), at the native size and, read position by
position, at larger sizes; for 1, 2 and 3 spatial axes, and where the rewrite folds an adaptive pooling into
the first kernel. The command says it is an approximation, measures it, records it, and refuses ranks that
do not exist in one line.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from torch import nn

from fcconv.errors import BadInputError
from fcconv.low_rank import factor_head, parse_rank, truncated_original
from fcconv.rewrite import rewrite

DIGITS = REPO / "sample_models" / "digits_lenet.pt"


def truncated_copy(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """``model`` with each named Linear's weight replaced by its rank-R truncation, by numpy's SVD."""
    truncated = copy.deepcopy(model)
    for name, rank in ranks.items():
        linear = truncated.get_submodule(name)
        u, s, vt = np.linalg.svd(linear.weight.detach().double().numpy(), full_matrices=False)
        linear.weight = nn.Parameter(torch.from_numpy((u[:, :rank] * s[:rank]) @ vt[:rank]).float())
    return truncated


def conv_net(rank: int) -> tuple[nn.Module, tuple[int, ...]]:
    """An unpadded convolution, a pooling and a two-layer head over a (C, *S) map of the given spatial rank."""
    conv, pool = {1: (nn.Conv1d, nn.MaxPool1d), 2: (nn.Conv2d, nn.MaxPool2d), 3: (nn.Conv3d, nn.MaxPool3d)}[rank]
    native = {1: (40,), 2: (12, 12), 3: (6, 8, 8)}[rank]
    mapped = [(n - 2) // 2 for n in native]
    torch.manual_seed(rank)
    model = nn.Sequential(
        conv(2, 6, 3), nn.ReLU(), pool(2), nn.Flatten(),
        nn.Linear(6 * int(np.prod(mapped)), 24), nn.ReLU(), nn.Linear(24, 5),
    ).eval()  # fmt: skip
    return model, (2, *native)


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_the_factored_model_is_the_original_with_truncated_weights_at_native_and_larger_sizes(spatial_rank):
    model, input_shape = conv_net(spatial_rank)
    conversion = rewrite(model, input_shape)
    factored = factor_head(conversion, 3)
    assert [(f.name, f.rank) for f in factored] == [("4", 3), ("6", 3)]
    reference = truncated_copy(model, {"4": 3, "6": 3})
    native = input_shape[1:]
    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, *input_shape)
        torch.testing.assert_close(conversion.module(x).flatten(1), reference(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(reference(x), model(x), atol=1e-3)  # rank 3 is an approximation here
        # the trunk is unpadded with total stride 2: each output position is the truncated original on its crop
        larger = tuple(n + 4 for n in native)
        x = torch.randn(1, input_shape[0], *larger)
        out = conversion.module(x)
        for position in np.ndindex(*out.shape[2:]):
            crop = x[(slice(None), slice(None), *(slice(2 * p, 2 * p + n) for p, n in zip(position, native)))]
            torch.testing.assert_close(out[(0, slice(None), *position)], reference(crop)[0], rtol=1e-5, atol=1e-6)


def test_an_adaptive_pooling_folded_into_the_kernel_is_factored_with_the_layer_it_feeds():
    # a 5×5 map pooled to 2×2 by overlapping bins: the rewrite folds the pooling into a 5×5 kernel
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()  # fmt: skip
    conversion = rewrite(model, (3, 7, 7))
    assert conversion.module.get_submodule("3").kernel_size == (5, 5)
    factor_head(conversion, 2)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            conversion.module(x).flatten(1), truncated_copy(model, {"3": 2, "5": 2})(x), rtol=1e-5, atol=1e-6
        )


def test_factored_layers_report_the_weights_and_work_they_save():
    model, input_shape = conv_net(2)
    conversion = rewrite(model, input_shape)
    first, second = factor_head(conversion, 4)
    window = 6 * 5 * 5
    assert (first.parameters, first.factored_parameters) == (24 * window + 24, 4 * (window + 24) + 24)
    assert (first.macs, first.factored_macs) == (24 * window, 4 * (window + 24))
    assert (second.full_rank, second.factored_parameters) == (5, 4 * (24 + 5) + 5)
    s = np.linalg.svd(model[4].weight.detach().double().numpy(), compute_uv=False)
    assert first.energy == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()), rel=1e-9)


@pytest.mark.parametrize("share", [0.5, 0.9, 0.999])
def test_a_fraction_keeps_the_fewest_singular_values_holding_that_share_of_each_layers_energy(share):
    model, input_shape = conv_net(2)
    conversion = rewrite(model, input_shape)
    factored = factor_head(conversion, share)
    for layer in factored:
        s = np.linalg.svd(model.get_submodule(layer.name).weight.detach().double().numpy(), compute_uv=False)
        cumulative = np.cumsum(s**2) / (s**2).sum()
        assert layer.rank == int(np.argmax(cumulative >= share)) + 1
        assert layer.energy >= share


def test_the_truncated_original_is_only_lent_and_the_originals_weights_come_back_as_they_were():
    model, input_shape = conv_net(2)
    weights = {name: tensor for name, tensor in model.state_dict().items()}
    before = {name: tensor.clone() for name, tensor in weights.items()}
    conversion = rewrite(model, input_shape)
    factor_head(conversion, 2)
    x = torch.randn(1, *input_shape)
    with torch.no_grad(), truncated_original(conversion):
        torch.testing.assert_close(model(x), truncated_copy(model, {"4": 2, "6": 2})(x))
    assert all(model.state_dict()[name] is not None for name in weights)
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == weights[name].data_ptr() and torch.equal(tensor, before[name])


@pytest.mark.parametrize(
    ("given", "expected"), [("3", 3), ("1", 1), ("0.99", 0.99), ("1.0", 1.0), (" 12 ", 12), (0.5, 0.5)]
)
def test_rank_is_an_integer_or_a_share_of_the_energy(given, expected):
    parsed = parse_rank(given)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize("given", ["0", "-2", "1.5", "0.0", "nan", "abc", ""])
def test_other_ranks_are_refused_naming_the_valid_values(given):
    with pytest.raises(BadInputError, match="an integer of at least 1 .* or a fraction above 0 and at most 1"):
        parse_rank(given)


# --- the command ------------------------------------------------------------------------------------------


def fcconv(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_convert_with_rank_writes_a_checked_export_that_says_it_is_an_approximation(tmp_path):
    before = DIGITS.read_bytes()
    out = tmp_path / "digits.r8.onnx"
    run = fcconv("convert", DIGITS, "--rank", "8", "-o", out)
    assert run.returncode == 0, run.stderr
    assert "Low-rank head, an approximation" in run.stdout and "vs original at 28×28" in run.stdout
    assert "8 of 64" in run.stdout and "8 of 10" in run.stdout
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert {name: layer["rank"] for name, layer in json.loads(meta["fcconv.low_rank"]).items()} == {"fc1": 8, "fc2": 8}
    # the export is what it claims: the truncated original, read independently, at the native size
    import onnxruntime as ort

    from fcconv.samples import DigitsLeNet

    original = DigitsLeNet()
    original.load_state_dict(torch.load(DIGITS, weights_only=True))
    reference = truncated_copy(original.eval(), {"fc1": 8, "fc2": 8})
    x = torch.randn(3, 1, 28, 28)
    session = ort.InferenceSession(str(out))
    scores = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(scores.reshape(3, 10), reference(x).numpy(), rtol=1e-4, atol=1e-5)
    assert fcconv("check", out).returncode == 0
    assert DIGITS.read_bytes() == before


def test_convert_with_rank_writes_a_program_too(tmp_path):
    out = tmp_path / "digits.r4.pt2"
    run = fcconv("convert", DIGITS, "--rank", "0.9", "-o", out, "--quiet")
    assert run.returncode == 0, run.stderr
    assert out.exists()


@pytest.mark.parametrize(
    ("rank", "says"),
    [
        ("0", "a rank is at least 1"),
        ("2.5", "a fraction of the energy is above 0 and at most 1"),
        ("many", "is not a number"),
        ("11", "above the rank of fc2 (Linear(64 → 10)), whose smaller dimension is 10: give a rank from 1 to 10"),
    ],
)
def test_a_rank_the_layers_do_not_have_is_refused_in_one_line_with_exit_2(tmp_path, rank, says):
    out = tmp_path / "digits.onnx"
    run = fcconv("convert", DIGITS, "--rank", rank, "-o", out)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []


def test_rank_is_refused_for_a_state_dict_output_and_for_an_onnx_classifier(tmp_path):
    run = fcconv("convert", DIGITS, "--rank", "4", "-o", tmp_path / "digits.safetensors")
    assert run.returncode == 2 and "--rank writes ONNX or .pt2" in run.stderr and run.stderr.count("\n") == 1
    exported = tmp_path / "digits.onnx"
    assert fcconv("convert", DIGITS, "-o", exported, "--quiet").returncode == 0
    run = fcconv("convert", exported, "--rank", "4", "-o", tmp_path / "again.onnx")
    assert run.returncode == 2 and "--rank does not apply to an ONNX model" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]


def test_verify_compares_a_low_rank_export_with_the_original_truncated_as_its_metadata_records(tmp_path):
    out = tmp_path / "digits.r6.onnx"
    assert fcconv("convert", DIGITS, "--rank", "6", "-o", out, "--quiet").returncode == 0
    run = fcconv("verify", out, "--reference", DIGITS)
    assert run.returncode == 0, run.stdout + run.stderr
    # without the record, the export is compared with the original itself, which it is not
    model = onnx.load(out)
    kept = [p for p in model.metadata_props if p.key != "fcconv.low_rank"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    unrecorded = tmp_path / "unrecorded.onnx"
    onnx.save(model, unrecorded)
    run = fcconv("verify", unrecorded, "--reference", DIGITS)
    assert run.returncode == 1 and "FAIL" in run.stdout
