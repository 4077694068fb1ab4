import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The shared helpers (custom_models, generated_classifiers) live here, the tests in one folder per promise; a few
# tests import a helper from a test module in another folder (test_cli's Hostile pickle), so every folder is on the path.
FOLDERS = sorted(folder for folder in TESTS.iterdir() if folder.is_dir() and any(folder.glob("test_*.py")))
sys.path[:0] = [str(TESTS), *map(str, FOLDERS)]

torch.set_num_threads(2)
# The torchvision signature table is built once per test session, not read from the user's cache.
os.environ["FCCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcconv-cache-")


def seeded(factory, *args, **kwargs):
    torch.manual_seed(0)
    return factory(*args, **kwargs).eval()


@pytest.fixture(scope="session")
def vgg16():
    return seeded(torchvision.models.vgg16, weights=None, num_classes=10)


@pytest.fixture(scope="session")
def lenet():
    from custom_models import LeNet

    return seeded(LeNet)
