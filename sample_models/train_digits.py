"""Train the sample digit classifier on generated digits, seeded.

The data is generated here, nothing is downloaded: each 28×28 image is one digit
drawn with Pillow's built-in font at a random size, stroke width, position and
rotation, with noise. Writes digits_lenet.pt (a state_dict) and digits_lenet.json
(its model card: architecture, input shape, class names, preprocessing: grayscale
pixels / 255 with no normalization, held-out accuracy, the checkpoint's sha256) into
sample_models/retrained/, or --out DIR; --replace writes over the shipped pair.

    python sample_models/train_digits.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from training import fit_classifier, output_dir, save_sample  # noqa: E402

from fcconv.samples import DigitsLeNet  # noqa: E402

SEED = 0
CLASSES = [str(d) for d in range(10)]


def render_digit(
    digit: int, rng: np.random.Generator, size: int = 28, *, shift: int = 3, noise: float = 0.1
) -> np.ndarray:
    """One white-on-black digit in a size×size float image in [0, 1].

    It is moved by up to ``shift`` pixels along each axis and has Gaussian noise of
    standard deviation ``noise`` added (none when 0, for pictures that add their own).
    """
    canvas = Image.new("L", (size * 2, size * 2), 0)
    font = ImageFont.load_default(size=float(rng.uniform(26, 38)))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (size, size),
        str(digit),
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=int(rng.integers(0, 3)),
        stroke_fill=255,
    )
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    dx, dy = rng.integers(-shift, shift + 1, size=2)
    left, top = size // 2 + dx, size // 2 + dy
    image = np.asarray(canvas.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    if noise:
        image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def make_split(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(0, 10, size=count)
    images = np.stack([render_digit(int(d), rng) for d in labels])
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The training split (12,000 digits) and the held-out split (2,000), drawn in turn from one seeded generator."""
    rng = np.random.default_rng(SEED)
    return make_split(12000, rng), make_split(2000, rng)


def main(folder: Path) -> None:
    torch.manual_seed(SEED)
    (x_train, y_train), (x_test, y_test) = splits()
    model = DigitsLeNet()
    accuracy = fit_classifier(model, (x_train, y_train), (x_test, y_test), epochs=6, seed=SEED)
    card = {
        "arch": "fcconv.samples:DigitsLeNet",
        "input_shape": [1, 28, 28],
        "classes": CLASSES,
        "preprocess": {"mode": "L", "mean": [0.0], "std": [1.0]},
        "held_out_accuracy": round(accuracy, 4),
        "held_out_samples": len(x_test),
        "trained_by": "sample_models/train_digits.py",
        "seed": SEED,
    }
    save_sample(model, card, folder, "digits_lenet")


if __name__ == "__main__":
    folder = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(2)
    main(folder)
