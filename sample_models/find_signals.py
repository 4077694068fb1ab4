"""Find where each kind of signal occurs in a long recording, with the converted signal classifier.

The recording is a row of segments of known kinds and lengths (generated as in
train_signals.py, seeded). The classifier was trained on 512-sample windows; converted by
fcconv, it takes the whole recording at once and returns one score vector per 512-sample
window, every 32 samples. Each segment is then read off the map's argmax, and the map is
compared with the original classifier run on each of those windows on its own.

    python sample_models/find_signals.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_signals import CLASSES, WINDOW, generate_signal  # noqa: E402

import fcconv  # noqa: E402
from fcconv.samples import SignalsNet  # noqa: E402

RECORDING_SEED = 3
SEGMENTS = ["noise", "sine", "chirp", "square", "noise", "sawtooth", "chirp", "sine", "square", "sawtooth"]
STRIDE = 32  # the classifier's total stride: one map position per 32 samples
LETTERS = {"noise": "n", "sine": "s", "square": "q", "sawtooth": "w", "chirp": "c"}


@dataclass(frozen=True)
class Segment:
    kind: str
    start: int
    stop: int


def make_recording(seed: int = RECORDING_SEED) -> tuple[np.ndarray, list[Segment]]:
    """The recording (float32 samples) and its segments, 1,200 to 2,400 samples each."""
    rng = np.random.default_rng(seed)
    pieces, segments, start = [], [], 0
    for kind in SEGMENTS:
        length = int(rng.integers(1200, 2401))
        pieces.append(generate_signal(kind, length, rng))
        segments.append(Segment(kind, start, start + length))
        start += length
    return np.concatenate(pieces), segments


def load_classifier() -> SignalsNet:
    model = SignalsNet(len(CLASSES))
    model.load_state_dict(torch.load(HERE / "signals_net.pt", weights_only=True))
    return model.eval()


def true_kind(position: int, segments: list[Segment]) -> str | None:
    """The kind of the segment that holds the whole window at map ``position``, or None where it spans two."""
    start, stop = position * STRIDE, position * STRIDE + WINDOW
    inside = [s.kind for s in segments if s.start <= start and stop <= s.stop]
    return inside[0] if inside else None


@torch.inference_mode()
def score_map(converted: torch.nn.Module, recording: np.ndarray) -> torch.Tensor:
    """(K, positions): the converted classifier's scores for every window of the recording, in one pass."""
    return converted(torch.from_numpy(recording)[None, None])[0]


def main() -> None:
    torch.set_num_threads(1)
    card = json.loads((HERE / "signals_net.json").read_text())
    model = load_classifier()
    converted = fcconv.convert(model, tuple(card["input_shape"]))
    recording, segments = make_recording()
    scores = score_map(converted, recording)
    found = [CLASSES[i] for i in scores.argmax(0).tolist()]
    positions = len(found)

    # the original classifier on each window by itself, for comparison
    windows = torch.from_numpy(recording).unfold(0, WINDOW, STRIDE)[:positions, None]
    with torch.inference_mode():
        one_by_one = model(windows).T
    difference = (scores - one_by_one).abs().max().item() / one_by_one.abs().max().item()

    print(f"recording: {len(recording):,} samples in {len(segments)} segments")
    print(f"map: {tuple(scores.shape)}, one score vector per {WINDOW}-sample window every {STRIDE} samples")
    print(f"largest difference from the classifier run on each window alone: {difference:.1e} of the largest score")
    print()
    print(f"{'segment':>7}  {'samples':>13}  {'kind':<8}  {'windows inside':>14}  {'found as its kind':>17}")
    for number, segment in enumerate(segments, 1):
        inside = [p for p in range(positions) if true_kind(p, [segment]) == segment.kind]
        hits = sum(found[p] == segment.kind for p in inside)
        samples = f"{segment.start:,}–{segment.stop:,}"
        print(
            f"{number:>7}  {samples:>13}  {segment.kind:<8}  {len(inside):>14}  {hits:>10} ({hits / len(inside):.0%})"
        )
    print()
    legend = ", ".join(f"{letter} {kind}" for kind, letter in LETTERS.items())
    print(f"one letter per window ({legend}; · a window across two segments):")
    truth = "".join(LETTERS[k] if (k := true_kind(p, segments)) else "·" for p in range(positions))
    guess = "".join(LETTERS[k] for k in found)
    for start in range(0, positions, 80):
        print(f"  sample {start * STRIDE:>6,}  truth {truth[start : start + 80]}")
        print(f"  {'':>13}  found {guess[start : start + 80]}")


if __name__ == "__main__":
    main()
