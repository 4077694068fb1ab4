"""Checkpoints as torchvision and timm models save them: non-persistent buffers, auxiliary classifiers, module versions.

Each file is written with ``torch.save(model.state_dict(), path)`` and read by
:func:`fcconv.load.load_model` exactly as ``load_state_dict(strict=True)`` would read it,
then converted and verified at its native size.
"""

import sys

import pytest
import torch
import torchvision
from conftest import seeded

import fcconv
from fcconv.load import load_model, native_input_shape

# A stride-2 blur as timm's TResNet and anti-aliased ResNets downsample: its filter is a buffer
# registered persistent=False, computed by the constructor and never saved.
BLURRED_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Blur(nn.Module):
    def __init__(self, channels):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (k[:, None] * k[None, :] / 16).repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.filt.shape[0])


class BlurredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Blur(8), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))
"""


def converts_and_verifies(model, loaded):
    """``loaded`` computes what ``model`` does, and its conversion matches it at the native size."""
    shape = loaded.input_shape
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    conversion = fcconv.rewrite(loaded.module, shape)
    report = fcconv.verify(loaded.module, conversion.module, shape, sizes=[shape[1:]], batch=1, conversion=conversion)
    assert report.passed, [(c.input_size, c.reference, c.max_rel, c.message) for c in report.checks]


def test_a_non_persistent_buffer_is_not_expected_in_the_file_and_comes_from_the_architecture(tmp_path, monkeypatch):
    (tmp_path / "blurred_net.py").write_text(BLURRED_NET)
    monkeypatch.chdir(tmp_path)  # --arch module:callable imports from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "blurred_net", raising=False)
    import blurred_net

    model = seeded(blurred_net.BlurredNet)
    assert "features.2.filt" not in model.state_dict()
    torch.save(model.state_dict(), tmp_path / "blurred.pt")

    loaded = load_model(tmp_path / "blurred.pt", arch="blurred_net:BlurredNet", input_shape=(3, 32, 32))

    assert torch.equal(loaded.module.features[2].filt, model.features[2].filt)
    assert set(loaded.module.state_dict()) == set(model.state_dict())
    converts_and_verifies(model, loaded)
    monkeypatch.delitem(sys.modules, "blurred_net", raising=False)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_a_classifier_trained_from_scratch_loads_with_its_auxiliary_classifiers_and_converts(tmp_path, name):
    # weights=None builds them with aux_logits=True: their heads are in the state_dict, idle in eval mode
    model = seeded(torchvision.models.get_model, name, weights=None, num_classes=5, init_weights=True)
    state = model.state_dict()
    assert any(k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in state)
    torch.save(state, tmp_path / f"{name}.pt")

    loaded = load_model(tmp_path / f"{name}.pt")

    assert (loaded.arch, loaded.detected, loaded.input_shape) == (name, True, native_input_shape(name))
    held = loaded.module.state_dict()
    assert set(held) == set(state) and all(torch.equal(held[k], state[k]) for k in state)
    converts_and_verifies(model, loaded)


def test_an_mnasnet_state_dict_keeps_the_module_versions_torch_saved_and_converts(tmp_path):
    # MNASNet reads its version from the state_dict's _metadata, which DataParallel's own entry must not stand for
    model = seeded(torchvision.models.mnasnet0_5, weights=None, num_classes=5)
    torch.save(model.state_dict(), tmp_path / "mnasnet.pt")
    torch.save(torch.nn.DataParallel(model).state_dict(), tmp_path / "data_parallel.pt")

    loaded, unwrapped = load_model(tmp_path / "mnasnet.pt"), load_model(tmp_path / "data_parallel.pt")

    assert [(m.arch, m.detected) for m in (loaded, unwrapped)] == [("mnasnet0_5", True)] * 2
    x = torch.randn(1, *loaded.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(unwrapped.module(x), model(x))
    converts_and_verifies(model, loaded)
