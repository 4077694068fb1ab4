"""Torchvision's classifiers, one per head pattern: each converts and keeps the core contract.

Every model below is built with ``weights=None`` (seed 0) and 10 classes, rewritten at its
native size and verified there and at two larger sizes, one of them non-square: against
the original's own output at the native size, and at every size against the original head
slid over the original's feature map. The Vision Transformers, whose fixed-length position
embedding ties them to one input size, are refused with that reason. The whole zoo, at 1000 classes and the
verifier's default sizes, is ``bench/zoo.py``; its report is ``docs/zoo.md``.
"""

import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import seeded

import fcconv
from fcconv.load import build_architecture, native_input_shape

# name: (the two larger sizes checked, the window one output position reads); the comment is the
# head as torchvision writes it (mobilenet_v3_small's: Linear–Hardswish–Dropout–Linear). Global-pooling heads read the whole map at any size (window None).
# The costlier trunks are checked at the smallest larger sizes that still change their feature map.
CASES = {
    "alexnet": ([(281, 337), (448, 448)], (6, 6)),  # avgpool → flatten → Dropout–Linear–ReLU–Dropout–Linear–ReLU–Linear
    "resnet18": ([(281, 337), (448, 448)], None),  # AdaptiveAvgPool2d → torch.flatten → Linear
    "regnet_x_400mf": ([(281, 337), (448, 448)], None),  # AdaptiveAvgPool2d → x.flatten(1) → Linear
    "mnasnet0_5": ([(281, 337), (448, 448)], None),  # x.mean([2, 3]) → Dropout–Linear
    "shufflenet_v2_x0_5": ([(281, 337), (448, 448)], None),  # x.mean([2, 3]) → Linear
    "efficientnet_b0": ([(257, 289), (320, 320)], None),  # AdaptiveAvgPool2d → flatten → Dropout–Linear
    "mobilenet_v2": ([(257, 289), (320, 320)], None),  # F.adaptive_avg_pool2d → flatten → Dropout–Linear
    "mobilenet_v3_small": ([(281, 337), (448, 448)], None),  # AdaptiveAvgPool2d → flatten → Linear–Hardswish–…
    "densenet121": ([(257, 289), (288, 288)], None),  # F.relu, F.adaptive_avg_pool2d → flatten → Linear
    "googlenet": ([(257, 289), (288, 288)], None),  # like efficientnet, its auxiliary heads idle in eval mode
    "inception_v3": ([(331, 363), (363, 363)], None),  # 299×299; AdaptiveAvgPool2d → Dropout → flatten → Linear
}
REFUSED = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]


def build(name: str) -> torch.nn.Module:
    return seeded(torchvision.models.get_model, name, weights=None, num_classes=10)


@pytest.mark.parametrize("name", list(CASES))
def test_a_torchvision_classifier_converts_and_keeps_the_contract(name):
    larger, window = CASES[name]
    shape = native_input_shape(name)
    model = build(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    conversion = fcconv.rewrite(model, shape)

    assert conversion.layers and {layer.name for layer in conversion.layers} <= linears
    assert conversion.geometry.window == window
    sizes = [shape[1:], *larger]
    assert any(h != w for h, w in larger) and all(h >= n for size in larger for h, n in zip(size, shape[1:]))
    report = fcconv.verify(model, conversion.module, shape, sizes=sizes, batch=1, conversion=conversion)
    assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]
    assert [c.input_size for c in report.checks if c.reference == "sliding window"] == sizes
    assert any(c.reference == "original" for c in report.checks)
    for check in report.checks:
        assert check.output_shape[:2] == (1, 10)
        if window is None:
            assert check.output_shape[2:] == (1, 1)
    if window is not None:
        assert report.checks[-1].output_shape[2] > 1 and report.checks[-1].output_shape[3] > 1


@pytest.mark.parametrize("name", REFUSED)
def test_a_vision_transformer_is_refused(name):
    model = build_architecture(name)  # the architecture alone, on the meta device: no weights needed to refuse
    with pytest.raises(fcconv.NotConvertibleError) as refused:
        fcconv.rewrite(model, native_input_shape(name))
    assert refused.value.exit_code == 3
    message = str(refused.value)
    assert "\n" not in message
    assert "encoder.pos_embedding" in message and "position embedding of fixed length" in message


TINY_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def test_the_command_line_refuses_a_vision_transformer_with_exit_code_3(tmp_path):
    factory = f"import torchvision\n\ndef build():\n    return torchvision.models.VisionTransformer(**{TINY_VIT!r})\n"
    (tmp_path / "tiny_vit.py").write_text(factory)
    torch.save(seeded(torchvision.models.VisionTransformer, **TINY_VIT).state_dict(), tmp_path / "vit.pt")
    result = subprocess.run(
        [sys.executable, "-m", "fcconv", "convert", "vit.pt", "--arch", "tiny_vit:build", "--input-shape", "3,32,32"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("fcconv: error:") and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["tiny_vit.py", "vit.pt"]
