"""The core contract: same scores at the native size, sliding-window scores at larger sizes."""

import pickle
from copy import deepcopy

import pytest
import torch
import torchvision
from conftest import seeded
from custom_models import HeadWithBatchNorm, LeNet, MeanPooled, TrailingView

import fcconv
from fcconv.layers import FullyConnectedConvMixin

MODELS = {
    "vgg16": (lambda: torchvision.models.vgg16(weights=None, num_classes=10), (3, 224, 224)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(weights=None), (3, 224, 224)),
    "alexnet": (lambda: torchvision.models.alexnet(weights=None, num_classes=37), (3, 224, 224)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 224, 224)),
    "lenet": (LeNet, (1, 28, 28)),
    "bn-head": (HeadWithBatchNorm, (3, 16, 18)),
    "mean-pooled": (MeanPooled, (3, 33, 41)),
    "trailing-view": (TrailingView, (1, 8, 8)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    factory, shape = MODELS[request.param]
    model = seeded(factory)
    return request.param, model, shape, fcconv.rewrite(model, shape)


def test_at_the_native_size_the_output_equals_the_original(model_case):
    _, model, shape, conversion = model_case
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected, actual = model(x), conversion.module(x)
    assert actual.shape[:2] == expected.shape and all(s == 1 for s in actual.shape[2:])
    assert (actual.flatten(1) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_every_position_of_a_larger_input_is_the_head_on_its_window(model_case):
    name, model, shape, conversion = model_case
    native = shape[1:]
    sizes = [native, (native[0] + 37, native[1] + 64), (2 * native[0] + 1, 2 * native[1])]
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, batch=1, conversion=conversion)
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]
    larger = report.checks[-1]
    assert larger.output_shape[:2] == (1, larger.expected_shape[1])
    if conversion.geometry.window is not None:
        assert larger.output_shape[2] > 1 and larger.output_shape[3] > 1


def test_lenet_map_equals_the_original_run_on_each_crop(lenet):
    # LeNet has no padding, so a crop of the input at a multiple of its stride (4) sees
    # exactly the features the large input has there: an independent sliding-window check.
    converted = fcconv.convert(lenet, (1, 28, 28))
    x = torch.randn(2, 1, 47, 39)
    with torch.no_grad():
        scores = converted(x)
        assert scores.shape == (2, 10, 5, 3)
        for i in range(scores.shape[2]):
            for j in range(scores.shape[3]):
                crop = x[:, :, 4 * i : 4 * i + 28, 4 * j : 4 * j + 28]
                expected = lenet(crop)
                assert torch.allclose(scores[:, :, i, j], expected, atol=1e-5 * expected.abs().max())


def test_weights_are_reshaped_views_of_the_original(vgg16):
    conversion = fcconv.rewrite(vgg16, (3, 224, 224))
    fc6 = conversion.module.get_submodule("classifier.0")
    assert isinstance(fc6, torch.nn.Conv2d) and isinstance(fc6, FullyConnectedConvMixin)
    assert fc6.weight.shape == (4096, 512, 7, 7)
    assert fc6.weight.data_ptr() == vgg16.classifier[0].weight.data_ptr()
    assert fc6.bias is vgg16.classifier[0].bias
    assert conversion.module.get_submodule("classifier.3").kernel_size == (1, 1)
    assert [layer.name for layer in conversion.layers] == ["classifier.0", "classifier.3", "classifier.6"]
    assert set(conversion.module.state_dict()) <= set(vgg16.state_dict())


def test_the_original_model_is_left_unchanged(vgg16):
    before = {k: v.clone() for k, v in vgg16.classifier.state_dict().items()}
    fcconv.convert(vgg16, (3, 224, 224))
    assert isinstance(vgg16.classifier[0], torch.nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in vgg16.classifier.state_dict().items())


def test_the_forward_reaches_its_layers_without_module_getattr_and_stays_a_normal_module(lenet, monkeypatch):
    """Submodule lookups cost host time on every call; the converted module binds them and stays editable."""
    fcn = fcconv.convert(lenet, (1, 28, 28))
    x = torch.randn(2, 1, 36, 40)
    with torch.no_grad():
        expected = fcn(x)
    lookups = []
    original_getattr = torch.nn.Module.__getattr__

    def counting(self, name):
        if name in self.__dict__.get("_modules", {}):
            lookups.append(name)
        return original_getattr(self, name)

    monkeypatch.setattr(torch.nn.Module, "__getattr__", counting)
    with torch.no_grad():
        assert torch.equal(fcn(x), expected)
    assert lookups == []
    monkeypatch.undo()

    name = next(name for name, module in fcn.named_modules() if isinstance(module, torch.nn.ReLU))
    fcn.set_submodule(name, torch.nn.Tanh())  # a replaced layer is the one that runs
    with torch.no_grad():
        assert not torch.equal(fcn(x), expected)
    fcn.set_submodule(name, torch.nn.ReLU())
    for copy in (deepcopy(fcn), pickle.loads(pickle.dumps(fcn))):
        with torch.no_grad():
            assert torch.equal(copy(x), expected)
    assert set(fcn.state_dict()) == set(lenet.state_dict())


def test_the_head_holds_about_89_percent_of_vgg16(vgg16):
    conversion = fcconv.analyze(torchvision.models.vgg16(weights=None).eval(), (3, 224, 224))
    assert 0.885 < conversion.head_parameters / conversion.total_parameters < 0.895


def test_adaptive_pooling_that_divides_becomes_fixed_average_pooling(vgg16):
    conversion = fcconv.rewrite(vgg16, (3, 448, 448))
    pool = conversion.module.get_submodule("avgpool")
    assert isinstance(pool, torch.nn.AvgPool2d) and pool.kernel_size == (2, 2)
    assert conversion.geometry.window == (14, 14) and conversion.geometry.stride == (2, 2)
    report = fcconv.verify(vgg16, conversion.module, (3, 448, 448), sizes=[(448, 448), (512, 544)], batch=1,
                           conversion=conversion)  # fmt: skip
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]


def test_adaptive_pooling_that_does_not_divide_is_folded_into_the_kernel():
    model = seeded(torchvision.models.vgg11, weights=None, num_classes=5)
    conversion = fcconv.rewrite(model, (3, 96, 128))  # features 3×4, pooled to 7×7
    fc6 = conversion.module.get_submodule("classifier.0")
    assert fc6.kernel_size == (3, 4)
    report = fcconv.verify(model, conversion.module, (3, 96, 128), sizes=[(96, 128), (129, 191)], batch=1,
                           conversion=conversion)  # fmt: skip
    assert report.passed, [(c.input_size, c.max_rel, c.message) for c in report.checks]


def test_global_pooling_is_kept_by_default_and_dropped_with_dense():
    model = seeded(torchvision.models.resnet18, weights=None)
    x = torch.randn(1, 3, 320, 288)
    with torch.no_grad():
        pooled = fcconv.convert(model, (3, 224, 224))(x)
        dense = fcconv.convert(model, (3, 224, 224), dense=True)(x)
        assert pooled.shape == (1, 1000, 1, 1)
        assert torch.allclose(pooled.flatten(1), model(x), atol=1e-4 * model(x).abs().max())
        assert dense.shape == (1, 1000, 10, 9)
        # the head is linear, so the mean of the dense map is the pooled output
        assert torch.allclose(dense.mean((2, 3)), pooled.flatten(1), atol=1e-4 * pooled.abs().max())


def test_dense_maps_pass_the_sliding_window_check():
    model = seeded(torchvision.models.resnet18, weights=None, num_classes=3)
    conversion = fcconv.rewrite(model, (3, 224, 224), dense=True)
    report = fcconv.verify(model, conversion.module, (3, 224, 224), batch=1, dense=True, conversion=conversion)
    assert report.passed
    assert report.checks[-1].output_shape == (1, 3, 14, 14)
