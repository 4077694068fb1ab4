"""The converted module trains: its fast paths give the gradients plain convolutions give.

The FCN way of working fine-tunes a converted classifier. The fully connected
convolutions compute their forward pass as flatten + GEMM at the native size,
gathered windows + GEMM at a larger one, and the convolution itself above a size
limit (:mod:`fcconv.layers`); each must pass gradients back exactly as the plain
convolution of the export form does, to every parameter and to the input.
"""

import pytest
import torch
from conftest import seeded
from custom_models import TinyVGG

import fcconv
from fcconv import layers
from fcconv.export import as_export_module

NATIVE = (3, 224, 224)


@pytest.fixture(scope="module")
def converted():
    """TinyVGG in float64, converted: its fast layers, and the same parameters under plain convolutions."""
    fcn = fcconv.convert(seeded(TinyVGG).double(), NATIVE)
    return fcn, as_export_module(fcn)


def gradients(module, x, target):
    """d(loss)/d(every parameter, the input) for a loss that weighs every score of the map differently."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    loss = (out * target).sum() + out.square().mean()
    params = [p for _, p in sorted(module.named_parameters())]
    return out.detach(), torch.autograd.grad(loss, [*params, x])


def counting(monkeypatch, name):
    calls = []
    original = getattr(layers, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, name, counted)
    return calls


@pytest.mark.parametrize(
    ("size", "path"),
    [((224, 224), "flatten + GEMM"), ((256, 320), "unfold + GEMM"), ((256, 320), "convolution")],
)
def test_every_fast_path_gives_the_gradients_of_plain_convolutions(converted, monkeypatch, size, path):
    fcn, plain = converted
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((2, NATIVE[0], *size), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn(plain(x).shape, generator=generator, dtype=torch.float64)
    unfolds = counting(monkeypatch, "unfold_linear")
    if path == "convolution":  # the size limit above which the fast layer runs the convolution itself
        monkeypatch.setattr(layers, "UNFOLD_MAX_ELEMENTS", 0)
    fast_out, fast = gradients(fcn.train(), x, target)
    assert unfolds == (["unfold_linear"] if path == "unfold + GEMM" else [])
    plain_out, expected = gradients(plain.train(), x, target)

    torch.testing.assert_close(fast_out, plain_out, rtol=1e-12, atol=1e-12)
    names = [name for name, _ in sorted(fcn.named_parameters())] + ["input"]
    assert len(fast) == len(expected) == len(names)
    for name, got, want in zip(names, fast, expected):
        assert got is not None and got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_one_optimizer_step_on_the_dense_map_changes_the_head_and_lowers_the_loss():
    fcn = fcconv.convert(seeded(TinyVGG), NATIVE)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((2, 3, 288, 320), generator=generator)
    with torch.no_grad():
        labels = torch.randint(0, 10, fcn(x)[:, 0].shape, generator=generator)  # one class per map position
    head = {name: p.detach().clone() for name, p in fcn.named_parameters() if name.startswith("classifier")}
    optimizer = torch.optim.SGD(fcn.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    fcn.train()
    before = loss_fn(fcn(x), labels)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(fcn(x), labels)

    assert after < before
    for name, value in head.items():
        assert not torch.equal(dict(fcn.named_parameters())[name], value), f"{name} did not change"
