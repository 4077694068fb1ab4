"""The shipped 1D sample: its weights give the model card's accuracy, and its converted map finds each signal.

Nothing is trained here: the held-out windows and the long recording are regenerated from
their seeds by sample_models/train_signals.py and sample_models/find_signals.py.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import fcconv

sys.path.insert(0, str(REPO / "sample_models"))
import find_signals  # noqa: E402
import train_signals  # noqa: E402

CARD = json.loads((REPO / "sample_models" / "signals_net.json").read_text())


@pytest.fixture(scope="module")
def classifier():
    return find_signals.load_classifier()


def test_the_card_describes_the_shipped_classifier():
    assert CARD["arch"] == "fcconv.samples:SignalsNet"
    assert CARD["input_shape"] == [1, train_signals.WINDOW]
    assert CARD["classes"] == train_signals.CLASSES
    assert CARD["held_out_samples"] == train_signals.HELD_OUT_SAMPLES
    assert CARD["held_out_seed"] == train_signals.HELD_OUT_SEED


def test_the_shipped_weights_reproduce_the_cards_held_out_accuracy(classifier):
    windows, labels = train_signals.held_out_split()
    assert windows.shape == (CARD["held_out_samples"], 1, train_signals.WINDOW)
    with torch.inference_mode():
        accuracy = (classifier(windows).argmax(1) == labels).float().mean().item()
    # the card rounds to 4 digits; one window decided the other way by a different BLAS is allowed
    assert abs(accuracy - CARD["held_out_accuracy"]) <= 1 / len(labels)
    assert accuracy > 0.95


@pytest.fixture(scope="module")
def recording_map(classifier):
    recording, segments = find_signals.make_recording()
    converted = fcconv.convert(classifier, tuple(CARD["input_shape"]))
    return recording, segments, find_signals.score_map(converted, recording)


def test_the_map_has_one_score_vector_per_window_every_32_samples(recording_map, classifier):
    recording, _, scores = recording_map
    positions = (len(recording) - train_signals.WINDOW) // find_signals.STRIDE + 1
    assert scores.shape == (len(train_signals.CLASSES), positions)
    # the trunk is unpadded, so each position is exactly the classifier run on its window alone
    windows = torch.from_numpy(recording).unfold(0, train_signals.WINDOW, find_signals.STRIDE)[:, None]
    with torch.inference_mode():
        one_by_one = classifier(windows).T
    assert (scores - one_by_one).abs().max() <= 1e-4 * one_by_one.abs().max()


def test_the_maps_argmax_finds_the_kind_of_signal_away_from_the_segment_boundaries(recording_map):
    recording, segments, scores = recording_map
    found = [train_signals.CLASSES[i] for i in scores.argmax(0).tolist()]
    assert {s.kind for s in segments} == set(train_signals.CLASSES)
    assert segments[-1].stop == len(recording)
    correct = total = 0
    for segment in segments:
        inside = [p for p in range(len(found)) if find_signals.true_kind(p, [segment]) == segment.kind]
        hits = sum(found[p] == segment.kind for p in inside)
        assert len(inside) >= 10 and hits >= 0.8 * len(inside), (segment, hits, len(inside))
        correct, total = correct + hits, total + len(inside)
    assert correct >= 0.95 * total


def test_the_sample_converts_by_path_alone(tmp_path):
    out = tmp_path / "signals.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "fcconv", "convert", REPO / "sample_models" / "signals_net.pt", "-o", out],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for text in ("fcconv.samples:SignalsNet", "Linear(416 → 64)", "Conv1d(32 → 64)", "│ 13 ", "2×5×17", "ok"):
        assert text in result.stdout, text
    assert "FAIL" not in result.stdout and out.is_file()
