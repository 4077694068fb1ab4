"""Capture: torch.export first, torch.fx where the export cannot serve; Hugging Face and timm classifiers convert exactly."""

import inspect
import signal
import time

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from conftest import seeded
from torch import nn
from traced_whole import ColumnsOneByOne, ScaledByRows

import fcconv
import fcconv.capture
from fcconv.capture import CAPTURED_BY, EXPORT, FX, capture, export_graph, trace
from fcconv.errors import NotConvertibleError
from fcconv.load import load_model
from fcconv.outputs import output_names
from fcconv.verify import verify

SHAPE = (3, 64, 64)
SIZES = [(64, 64), (81, 73)]  # the native size and a larger one, odd on both axes (TF "same" padding differs there)


class FunctionalLinear(nn.Linear):
    """A Linear whose forward calls ``F.linear`` (timm's ``Linear`` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FunctionalLinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = FunctionalLinear(4 * 3 * 3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class WidthParity(nn.Module):
    """Chooses what to compute from the map's width in Python: fx cannot trace it, torch.export keeps one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[-1] % 2 == 0:
            x = 2 * x
        return self.fc(x.mean((2, 3)))


class ValueBranch(nn.Module):
    """Chooses what to compute from the values of its map: neither capture can see that."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _verified(model: nn.Module, shape=SHAPE, sizes=SIZES):
    conversion = fcconv.rewrite(model, shape)
    report = verify(model, conversion.module, shape, sizes=sizes, conversion=conversion)
    assert report.passed, [check for check in report.checks if not check.passed]
    assert {check.input_size for check in report.checks} == set(sizes)
    return conversion


# --- the captures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("captured_by", ["fx", "export"])
def test_a_linear_subclass_calling_f_linear_converts_as_a_linear_in_both_captures(captured_by):
    model = seeded(FunctionalLinearHead)
    shape = (3, 8, 8)
    graph = trace(model) if captured_by == "fx" else export_graph(model, shape)
    conversion = fcconv.rewrite(graph, shape)
    assert [(layer.name, layer.kernel) for layer in conversion.layers] == [("fc", (3, 3))]
    report = verify(model, conversion.module, shape, sizes=[(8, 8), (13, 11)], conversion=conversion)
    assert report.passed


def test_a_model_fx_cannot_trace_is_captured_by_torch_export():
    model = seeded(WidthParity)
    with pytest.raises(Exception, match="control flow"):
        trace(model)
    graph = capture(model, (3, 10, 10))
    assert any(node.op == "call_module" and node.target == "fc" for node in graph.graph.nodes)


def test_a_capture_that_kept_one_size_dependent_branch_is_caught_by_verification():
    model = seeded(WidthParity)
    conversion = fcconv.rewrite(model, (3, 10, 10))  # the export took the even-width branch
    report = verify(model, conversion.module, (3, 10, 10), sizes=[(10, 10), (10, 12), (11, 11)], conversion=conversion)
    verdicts = {(check.input_size, check.reference): check.passed for check in report.checks}
    # the sliding window runs the captured trunk, with the same branch; the eager original does not
    assert (
        verdicts[((10, 10), "original")] and verdicts[((10, 12), "original")] and verdicts[((11, 11), "sliding window")]
    )
    assert not verdicts[((11, 11), "original")] and not report.passed


def test_a_model_neither_capture_can_see_is_refused_naming_the_line_where_capture_stopped():
    line = next(i for i, text in enumerate(inspect.getsource(ValueBranch).splitlines()) if "x.sum() > 0" in text)
    where = f"test_capture.py:{inspect.getsourcelines(ValueBranch)[1] + line}"
    with pytest.raises(NotConvertibleError) as refused:
        fcconv.rewrite(seeded(ValueBranch), (3, 10, 10))
    message = str(refused.value)
    assert "\n" not in message
    assert "torch.export stopped at" in message and where in message
    assert "ONNX" in message


# --- Hugging Face transformers: built from small configs, random weights --------------------------------


def _hf(model_class: str, config_class: str, **config):
    return getattr(transformers, model_class)(getattr(transformers, config_class)(num_labels=5, **config))


HUGGING_FACE = {
    "resnet": lambda: _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                          depths=[1, 1]),
    "convnext": lambda: _hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[8, 16], depths=[1, 1],
                            num_stages=2),
    "regnet": lambda: _hf("RegNetForImageClassification", "RegNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                          depths=[1, 1], groups_width=8),
    "mobilenet_v2": lambda: _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=0.35,
                                image_size=64, tf_padding=False),
}  # fmt: skip


@pytest.mark.parametrize("name", HUGGING_FACE)
def test_a_hugging_face_classifier_converts_from_the_model_object_and_matches_at_two_sizes(name):
    model = seeded(HUGGING_FACE[name])
    conversion = _verified(model)
    assert [layer.name for layer in conversion.layers] in (["classifier"], ["classifier.1"])
    with torch.no_grad():
        # the original returns a ModelOutput holding the logits; the converted model a dict holding their map
        assert output_names(conversion.module(torch.zeros(1, *SHAPE))) == ["logits"]


# --- timm: F.linear heads, VGG, TF "same" padding ------------------------------------------------------

TIMM = ["mobilenetv3_small_050", "vgg11", "tf_efficientnet_b0"]


@pytest.mark.parametrize("name", TIMM)
def test_a_timm_classifier_converts_from_the_model_object_and_matches_at_two_sizes(name):
    model = seeded(timm.create_model, name, pretrained=False, num_classes=5)
    conversion = _verified(model)
    assert len(conversion.layers) == 1


@pytest.mark.parametrize(
    "arch", ["timm.models.mobilenetv3:mobilenetv3_small_050", "timm.models.efficientnet:tf_efficientnet_b0"]
)
def test_a_timm_state_dict_with_its_architecture_converts_and_matches(arch, tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model(arch.split(":")[1], pretrained=False).state_dict(), tmp_path / "weights.pt")
    loaded = load_model(tmp_path / "weights.pt", arch=arch, input_shape=SHAPE)
    _verified(loaded.module)


def test_a_hugging_face_mobilenet_v2_with_tf_padding_is_refused_by_verification_at_other_sizes():
    # its TF padding is computed with int() of the map's size: torch.export fixes it at the native size
    model = seeded(_hf, "MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=0.35, image_size=64)
    assert model.config.tf_padding
    conversion = fcconv.rewrite(model, SHAPE)
    report = verify(model, conversion.module, SHAPE, sizes=SIZES, conversion=conversion)
    verdicts = {(check.input_size, check.reference): check.passed for check in report.checks}
    assert verdicts[((64, 64), "original")] and not verdicts[((81, 73), "original")]
    assert not report.passed


class PooledHead(nn.Module):
    """A torchvision classifier's shape: modules throughout, one ReLU module called twice, a pooled, flattened head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.relu(self.conv2(self.relu(self.conv1(x))))))


class MeanHead(nn.Module):
    """Modules in the trunk, a mean over the map, a Linear: the head reads the whole map at any size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _plan(graph: torch.fx.GraphModule, shape: tuple[int, ...]) -> tuple:
    conversion = fcconv.analyze(graph, shape)
    return conversion.layers, conversion.removed, conversion.geometry, conversion.notes


def test_an_export_written_as_traced_calls_the_modules_fx_keeps_whole_and_plans_as_the_trace_does():
    model = seeded(PooledHead).eval()
    shape = (3, 12, 12)
    graph = export_graph(model, shape, as_traced=True)
    called = [node.target for node in graph.graph.nodes if node.op == "call_module"]
    assert called == ["conv1", "relu", "conv2", "relu", "avgpool", *(f"classifier.{i}" for i in range(5))]
    assert _plan(graph, shape) == _plan(trace(model), shape)
    x = torch.randn(2, *shape)
    torch.testing.assert_close(graph(x), model(x))


def test_the_export_is_the_capture_a_traceable_model_is_planned_from_and_verified_with_its_eager_original():
    model = seeded(MeanHead)
    conversion = fcconv.rewrite(model, (3, 12, 12))
    assert conversion.captured_by == EXPORT
    report = verify(model, conversion.module, (3, 12, 12), sizes=[(12, 12), (17, 15)], conversion=conversion)
    # a value the export fixed at the native size would differ from the eager original at 17×15
    assert ((17, 15), "original") in {(check.input_size, check.reference) for check in report.checks}
    assert report.passed


def test_an_export_that_runs_past_its_time_limit_is_replaced_by_the_trace(monkeypatch):
    monkeypatch.setattr(fcconv.capture, "EXPORT_SECONDS", 1e-3)
    # an interruption can be lost (one inside torch's C++ code); the next comes well before this export ends
    monkeypatch.setattr(fcconv.capture, "_REPEAT_SECONDS", 0.05)
    model = seeded(PooledHead)
    conversion = fcconv.rewrite(model, (3, 12, 12))
    assert conversion.captured_by == FX
    assert [layer.name for layer in conversion.layers] == ["classifier.2", "classifier.4"]


def test_the_time_limit_interrupts_again_where_its_first_interruption_is_swallowed():
    swallowed = 0
    start = time.perf_counter()
    with pytest.raises(fcconv.capture._TimedOut):
        with fcconv.capture._time_limit(0.05):
            while time.perf_counter() - start < 10:
                try:
                    while time.perf_counter() - start < 10:
                        pass
                except fcconv.capture._TimedOut:
                    if swallowed:
                        raise
                    swallowed += 1
    assert swallowed == 1
    assert time.perf_counter() - start < 5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


class ColumnLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.columns = ColumnsOneByOne()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.columns(self.conv(x)), 1), 1))


def test_an_export_that_fixed_a_spatial_axis_comes_after_the_trace():
    model = seeded(ColumnLoop)
    assert export_graph(model, (3, 10, 10)).meta["fcconv_fixed_axes"] == [3]
    conversion = fcconv.rewrite(model, (3, 10, 10))
    assert conversion.captured_by == FX
    report = verify(model, conversion.module, (3, 10, 10), sizes=[(10, 10), (11, 11), (12, 15)], conversion=conversion)
    assert report.passed


@pytest.mark.parametrize("name", ["swin", "tf_efficientnet_b0"])
def test_a_model_that_declares_parts_for_fx_to_keep_whole_is_traced_without_waiting_for_the_export(name):
    # torchvision's Swin wraps its window attention with torch.fx.wrap; timm lists Conv2dSame as not traceable.
    # Both take the export past its time limit, which would be spent before the trace is used.
    from custom_models import small_swin

    model = seeded(small_swin) if name == "swin" else seeded(timm.create_model, name, pretrained=False, num_classes=5)
    start = time.perf_counter()
    graph = capture(model, (3, 224, 224))
    assert graph.meta[CAPTURED_BY] == FX
    assert time.perf_counter() - start < fcconv.capture.EXPORT_SECONDS


class RowsInTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.rows = ScaledByRows()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rows(self.conv(x)).mean((2, 3)))


def test_a_model_whose_export_plan_is_refused_is_planned_from_its_trace():
    # as torchvision's Swin: fx keeps the wrapped function whole, the export takes it apart into reshapes
    model = seeded(RowsInTrunk)
    exported = capture(model, (3, 10, 10))
    assert exported.meta[CAPTURED_BY] == EXPORT
    with pytest.raises(NotConvertibleError, match="turns the 4×8×8 feature map into a vector"):
        fcconv.analyze(exported, (3, 10, 10))
    conversion = fcconv.rewrite(model, (3, 10, 10))
    assert conversion.captured_by == FX
    assert verify(model, conversion.module, (3, 10, 10), sizes=[(10, 10), (13, 12)], conversion=conversion).passed


class RowsInTrunkRunningSum(RowsInTrunk):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(super().forward(x), dim=1)  # no per-position equivalent over the classes


def test_a_model_both_plans_refuse_is_refused_with_the_reason_read_from_its_trace():
    model = seeded(RowsInTrunkRunningSum)
    with pytest.raises(NotConvertibleError) as from_export:
        fcconv.analyze(capture(model, (3, 10, 10)), (3, 10, 10))
    with pytest.raises(NotConvertibleError) as from_trace:
        fcconv.analyze(trace(model), (3, 10, 10))
    with pytest.raises(NotConvertibleError) as refused:
        fcconv.rewrite(model, (3, 10, 10))
    assert str(refused.value) == str(from_trace.value) != str(from_export.value)


class SharedContainerHead(nn.Module):
    """A linear layer whose weight is not called ``weight``, in a module that holds more than that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Module()
        self.head.proj_weight = nn.Parameter(torch.randn(6, 36))
        self.head.proj_bias = nn.Parameter(torch.randn(6))
        self.head.scale = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(x), 1)
        return F.linear(x, self.head.proj_weight, self.head.proj_bias) * self.head.scale


def test_a_linear_layer_built_from_an_export_leaves_the_container_its_weight_came_from_whole():
    model = seeded(SharedContainerHead).eval()
    graph = export_graph(model, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(graph(x), model(x))


class ColumnLoopFlattened(nn.Module):
    """A loop over the map's columns in forward() (fx cannot trace it, the export unrolls it) and a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = torch.stack([2 * x[..., i] for i in range(x.shape[-1])], -1)
        return self.fc(torch.flatten(x, 1))


def test_an_export_that_fixed_an_axis_under_a_window_head_is_refused_since_nothing_could_check_other_sizes():
    model = seeded(ColumnLoopFlattened)
    with pytest.raises(TypeError, match="Proxy"):
        trace(model)
    with pytest.raises(
        NotConvertibleError, match=r"^torch.export fixed the input's height at 10 and width at 10 .*keep that size"
    ):
        fcconv.rewrite(model, (3, 10, 10))


class WidthParityFlattened(nn.Module):
    """A Python branch on the map's width (fx cannot trace it, the export keeps the native one), a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if x.shape[-1] % 2 == 0:
            x = 2 * x
        return self.fc(torch.flatten(self.conv2(x), 1))


def test_a_size_branch_the_export_kept_under_a_window_head_is_caught_by_the_originals_own_map():
    # the original cannot take a larger input (its Linear reads 6×6), so its map is read where the head starts
    model = seeded(WidthParityFlattened)
    conversion = fcconv.rewrite(model, (3, 10, 10))
    assert conversion.captured_by == EXPORT and conversion.geometry.window == (6, 6)
    report = verify(model, conversion.module, (3, 10, 10), sizes=[(10, 10), (12, 14), (12, 13)], conversion=conversion)
    verdicts = {(check.input_size, check.reference): check.passed for check in report.checks}
    assert verdicts[((10, 10), "sliding window")] and verdicts[((12, 14), "sliding window")]
    assert not verdicts[((12, 13), "sliding window")] and not report.passed


class FunctionalMaxPooled(nn.Module):
    """A head pooled by ``F.adaptive_max_pool2d``, which torch.export records with its indices."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.adaptive_max_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


def test_a_functional_max_pooling_captured_by_the_export_is_the_global_pooling_dense_drops():
    model = seeded(FunctionalMaxPooled)
    kept = fcconv.rewrite(model, (3, 12, 12))
    dense = fcconv.rewrite(model, (3, 12, 12), dense=True)
    assert kept.captured_by == dense.captured_by == EXPORT
    with torch.no_grad():
        assert dense.module(torch.randn(1, 3, 20, 16)).shape == (1, 4, 18, 14)
        assert kept.module(torch.randn(1, 3, 20, 16)).shape == (1, 4, 1, 1)
    report = verify(model, dense.module, (3, 12, 12), sizes=[(12, 12), (20, 16)], batch=1, conversion=dense)
    assert report.passed


@timm.layers.register_notrace_module
class CachedScale(nn.Module):
    """Caches a tensor it computes in eval mode, by device, as timm's EfficientViT and LeViT cache their attention
    biases; a module torch.fx keeps whole, as timm declares those."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8, 1, 1))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if not self.training and key not in self.cache:
            self.cache[key] = self.scale * 2
        return x * (self.cache[key] if not self.training else self.scale * 2)


class CachedScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.scaled = CachedScale()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.scaled(self.conv(x)).mean((2, 3)))


def test_capture_and_shape_propagation_leave_a_models_cached_tensors_as_they_found_them():
    model = seeded(CachedScaleNet)
    conversion = fcconv.rewrite(model, (3, 12, 12))
    assert model.scaled.cache == {}
    report = verify(model, conversion.module, (3, 12, 12), batch=1, conversion=conversion)
    assert report.passed
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 20, 16))).all()
