"""The verifier: tolerances it states, precision it enforces, devices it refuses."""

import pytest
import torch
from conftest import seeded
from custom_models import LeNet

import fcconv
from fcconv.verify import RTOL_BY_DTYPE, default_sizes, full_float32_precision


def test_default_sizes_are_native_then_larger_odd_non_square_then_double():
    native, odd, double = default_sizes((3, 224, 224))
    assert native == (224, 224) and double == (448, 448)
    assert odd[0] != odd[1] and all(s % 2 == 1 and s > 224 for s in odd)


def test_a_reduced_precision_model_is_checked_with_the_tolerance_of_its_dtype_and_says_so():
    model = seeded(LeNet).to(torch.bfloat16)
    report = fcconv.verify(model, fcconv.convert(model, (1, 28, 28)), (1, 28, 28), batch=1)
    assert report.dtype == "bfloat16" and report.rtol == RTOL_BY_DTYPE[torch.bfloat16]
    assert report.passed


def test_an_explicit_tolerance_is_used_as_given(lenet):
    report = fcconv.verify(lenet, fcconv.convert(lenet, (1, 28, 28)), (1, 28, 28), rtol=0.0, atol=0.0, batch=1)
    assert report.rtol == 0.0 and report.atol == 0.0
    assert all(check.tolerance == 0.0 for check in report.checks)


def test_a_wrong_model_fails_with_the_worst_element_named(lenet):
    converted = fcconv.convert(lenet, (1, 28, 28))
    fc2 = converted.get_submodule("fc2")
    shifted = fc2.bias.detach().clone()  # a new tensor: the converted model shares the original's
    shifted[3] += 1.0
    fc2.bias = torch.nn.Parameter(shifted)
    report = fcconv.verify(lenet, converted, (1, 28, 28), batch=1)
    assert not report.passed
    assert all(check.worst[1] == 3 for check in report.checks)


def test_float32_verification_turns_tf32_off_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_float32_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_bad_input(lenet):
    with pytest.raises(fcconv.BadInputError, match="CUDA is not available"):
        fcconv.verify(lenet, fcconv.convert(lenet, (1, 28, 28)), (1, 28, 28), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_float32_verification_meets_the_float32_contract_even_with_tf32_allowed():
    model = seeded(LeNet)
    converted = fcconv.convert(model, (1, 28, 28))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # cuDNN's default
    try:
        report = fcconv.verify(model, converted, (1, 28, 28), device="cuda", sizes=[(28, 28), (45, 61), (120, 96)])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert report.passed and report.rtol == 1e-4


@pytest.mark.parametrize("size", [(27, 28), (28, 28, 28), (40,)])
def test_a_size_below_the_native_or_of_another_rank_is_bad_input(lenet, size):
    with pytest.raises(fcconv.BadInputError, match="at least the native 28×28"):
        fcconv.verify(lenet, fcconv.convert(lenet, (1, 28, 28)), (1, 28, 28), sizes=[size])


class _BatchAndPositionSwapped(torch.nn.Module):
    """The converted LeNet with its positions folded into rows and read back in the wrong order (position-major):
    equal wherever the batch or the map has one element, wrong wherever both have several."""

    def __init__(self, converted: torch.nn.Module) -> None:
        super().__init__()
        self.converted = converted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.converted(x)
        n, k, h, w = out.shape
        rows = out.permute(0, 2, 3, 1).reshape(n * h * w, k)
        return rows.reshape(h * w, n, k).permute(1, 2, 0).reshape(n, k, h, w)


def test_the_largest_size_runs_sample_by_sample_once_a_smaller_size_ran_the_batch_over_several_positions(lenet):
    converted, shapes = fcconv.convert(lenet, (1, 28, 28)), []

    def run(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return converted(x)

    sizes = [(28, 28), (37, 33), (56, 56)]
    assert fcconv.verify(lenet, run, (1, 28, 28), sizes=sizes).passed
    assert shapes == [(2, 1, 28, 28), (2, 1, 37, 33), (1, 1, 56, 56), (1, 1, 56, 56)]
    # with no smaller size over several positions, the largest runs the whole batch
    shapes.clear()
    assert fcconv.verify(lenet, run, (1, 28, 28), sizes=[(56, 56)]).passed
    assert shapes == [(2, 1, 56, 56)]


def test_a_batch_and_a_position_axis_in_the_wrong_order_fail_at_the_sizes_run_as_a_batch(lenet):
    swapped = _BatchAndPositionSwapped(fcconv.convert(lenet, (1, 28, 28)))
    report = fcconv.verify(lenet, swapped, (1, 28, 28), sizes=[(28, 28), (37, 33), (56, 56)])
    assert not report.passed
    failed = {check.input_size for check in report.checks if not check.passed}
    assert failed == {(37, 33)}  # caught where the whole batch runs over several positions
