"""Train the sample signal classifier on generated signals, seeded.

The data is generated here, nothing is downloaded: each 1×512 window holds one kind of
signal, noise alone, a sine, a square wave, a sawtooth or a chirp (a sine whose frequency
sweeps up three octaves, again and again), at a random period, phase, amplitude and offset,
with Gaussian noise. Writes signals_net.pt (a state_dict) and signals_net.json (its model
card: architecture, input shape, class names, held-out accuracy, the checkpoint's sha256) into
sample_models/retrained/, or --out DIR; --replace writes over the shipped pair. It runs on one
thread and took 73 s of CPU time here.

    python sample_models/train_signals.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from training import fit_classifier, output_dir, save_sample  # noqa: E402

from fcconv.samples import SignalsNet  # noqa: E402

SEED = 0
HELD_OUT_SEED = 1  # the held-out windows come from a generator of their own, so a test can rebuild them alone
CLASSES = ["noise", "sine", "square", "sawtooth", "chirp"]
WINDOW = 512
TRAIN_SAMPLES = 16000
HELD_OUT_SAMPLES = 2000
EPOCHS = 8


def generate_signal(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` samples of one kind of signal (one of CLASSES), noise included, as float32.

    Periods run from 8 to 64 samples; a chirp's frequency rises linearly from one cycle per
    64 samples to one per 8 over a sweep of 192 to 768 samples, then starts again, so any
    512-sample stretch of it holds a sweep.
    """
    t = np.arange(length)
    if kind == "chirp":
        sweep = rng.uniform(192, 768)
        progress = ((t + rng.uniform(0, sweep)) % sweep) / sweep
        cycles = np.cumsum(1 / 64 + (1 / 8 - 1 / 64) * progress) + rng.uniform(0, 1)
    else:
        cycles = t / rng.uniform(8, 64) + rng.uniform(0, 1)
    waves = {
        "noise": np.zeros(length),
        "sine": np.sin(2 * np.pi * cycles),
        "square": np.sign(np.sin(2 * np.pi * cycles)),
        "sawtooth": 2 * (cycles % 1) - 1,
        "chirp": np.sin(2 * np.pi * cycles),
    }
    signal = (
        rng.uniform(0.5, 1.5) * waves[kind] + rng.uniform(-0.3, 0.3) + rng.normal(0, rng.uniform(0.05, 0.5), length)
    )
    return signal.astype(np.float32)


def make_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` windows (N, 1, WINDOW) and their labels, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=count)
    windows = np.stack([generate_signal(CLASSES[label], WINDOW, rng) for label in labels])
    return torch.from_numpy(windows).unsqueeze(1), torch.from_numpy(labels).long()


def held_out_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out windows the model card's accuracy is measured on."""
    return make_split(HELD_OUT_SAMPLES, HELD_OUT_SEED)


def main(folder: Path) -> None:
    torch.manual_seed(SEED)
    x_train, y_train = make_split(TRAIN_SAMPLES, SEED)
    x_test, y_test = held_out_split()
    model = SignalsNet(len(CLASSES))
    accuracy = fit_classifier(model, (x_train, y_train), (x_test, y_test), epochs=EPOCHS, seed=SEED)
    card = {
        "arch": "fcconv.samples:SignalsNet",
        "input_shape": [1, WINDOW],
        "classes": CLASSES,
        "held_out_accuracy": round(accuracy, 4),
        "held_out_samples": len(x_test),
        "held_out_seed": HELD_OUT_SEED,
        "trained_by": "sample_models/train_signals.py",
        "seed": SEED,
    }
    save_sample(model, card, folder, "signals_net")


if __name__ == "__main__":
    folder = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    main(folder)
