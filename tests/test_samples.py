"""The shipped sample models: their weights keep their model cards' promises."""

import json
import sys

import pytest
import torch
from conftest import REPO

SAMPLES = REPO / "sample_models"
sys.path.insert(0, str(SAMPLES))

import architectures  # noqa: E402
import train_digits  # noqa: E402
import train_shapes  # noqa: E402

# (checkpoint stem, architecture, held-out split as pictures in [0, 1] and labels)
HELD_OUT = {
    "digits_lenet": (architectures.DigitsLeNet, lambda: train_digits.splits()[1]),
    "shapes_vgg": (architectures.ShapesVGG, train_shapes.held_out_split),
}


@pytest.mark.parametrize("stem", sorted(HELD_OUT))
def test_the_shipped_weights_reproduce_the_cards_held_out_accuracy(stem):
    card = json.loads((SAMPLES / f"{stem}.json").read_text())
    build, held_out = HELD_OUT[stem]
    model = build(len(card["classes"])).eval()
    model.load_state_dict(torch.load(SAMPLES / f"{stem}.pt", weights_only=True))
    pictures, labels = held_out()
    assert len(labels) == card["held_out_samples"]
    assert tuple(pictures.shape[1:]) == tuple(card["input_shape"])
    # The card's preprocessing, not the training script's, so that a wrong card fails here too.
    mean = torch.tensor(card["preprocess"]["mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(card["preprocess"]["std"]).reshape(1, -1, 1, 1)
    with torch.no_grad():
        predicted = torch.cat([model((batch - mean) / std).argmax(1) for batch in pictures.split(500)])
    accuracy = (predicted == labels).float().mean().item()
    # Another CPU may round a near-tie differently: allow 4 of the 2,000 pictures to change.
    assert accuracy == pytest.approx(card["held_out_accuracy"], abs=0.002)
