"""``-o NAME.pt2`` beyond VGG: ConvNeXt, Swin and 3D video classifiers as programs with free batch and spatial axes.

Each of these once failed to export. A map that is 1 wide at the native size and wider above it (the head's
output, a clip's time axis) had that choice fixed by the traced example; ConvNeXt's and Swin's channels-last
maps met ATen's adaptive pooling asking whether the batch is above 1; Swin's window attention chose its shift
in Python. Each program here is written, read back and run at the native size (batch 1) and at a larger one
(batch 3), against the converted module, with torch's settings as torch has them. Small configurations of
torchvision's classes keep it fast: the same layers and code paths as convnext_tiny, swin_t, r3d_18 and
r2plus1d_18.
"""

import pytest
import torch
import torchvision
from conftest import seeded
from custom_models import TinyVGG, small_convnext
from torchvision.models.swin_transformer import SwinTransformer

import fcconv
from fcconv.torch_export import ProgramModel, export_program, save_program


def tiny_swin():
    """swin_t's blocks and 7×7 windows in two stages: at 56×56 the second stage's map is one window, so it does
    not shift there, and shifts at larger sizes."""
    return SwinTransformer([4, 4], 16, [2, 2], [1, 2], [7, 7], num_classes=4)


FAMILIES = {
    # name: (model, native input shape, a larger size)
    "convnext": (small_convnext, (3, 64, 64), (96, 80)),
    "swin": (tiny_swin, (3, 56, 56), (72, 88)),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=4), (3, 8, 32, 32), (11, 40, 48)),
    "r2plus1d_18": (lambda: torchvision.models.video.r2plus1d_18(num_classes=4), (3, 8, 32, 32), (12, 48, 40)),
}


@pytest.fixture(autouse=True)
def torchs_own_settings(monkeypatch):
    """Every export here runs with torch's settings as torch has them: fcconv changes none of its private ones."""
    import torch.fx.experimental._config as fx_config

    before = fx_config.get_config_copy()
    export = torch.export.export

    def checked(*args, **kwargs):
        changed = sorted(k for k, v in fx_config.get_config_copy().items() if before.get(k) != v)
        assert not changed, f"torch.export ran with private settings changed: {changed}"
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", checked)


def written_program(model, shape, path):
    converted = fcconv.convert(model, shape)
    return converted, ProgramModel(save_program(export_program(converted, shape), path, {}))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_that_converts_to_onnx_converts_to_a_program_equal_to_the_converted_module(name, tmp_path):
    factory, shape, larger = FAMILIES[name]
    converted, program = written_program(seeded(factory), shape, tmp_path / f"{name}.pt2")
    # every axis but the channels': the batch from 1 up, each spatial axis from the native size up
    assert program.spatial_ranges(first=0) == [(1, None), (shape[0], shape[0]), *((n, None) for n in shape[1:])]
    for batch, size in ((1, shape[1:]), (3, larger)):
        x = torch.randn(batch, shape[0], *size)
        with torch.no_grad():
            expected = converted(x)
        got = program(x)
        assert got.shape == expected.shape and got.shape[0] == batch
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_the_vgg_program_exports_with_torchs_settings_as_they_are(tmp_path):
    """VGG's head gives a 1×1 map at the native size and a larger one above it; no private torch setting is needed."""
    converted, program = written_program(seeded(TinyVGG), (3, 224, 224), tmp_path / "vgg.pt2")
    for batch, size, scores in ((1, (224, 224), (1, 1)), (2, (300, 261), (3, 2))):
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = converted(x)
        assert expected.shape == (batch, 10, *scores)
        torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-6)
