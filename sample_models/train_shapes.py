"""Train the sample shape classifier on generated pictures, seeded, with PyTorch's deterministic algorithms.

The data is generated here, nothing is downloaded. Each 32×32 RGB picture is a
noisy background of a random colour with one coloured shape (circle, square,
triangle, star, cross or ring) drawn near its centre, at a random size, colour and
rotation, sometimes with parts of other shapes at its edges; the seventh class,
``background``, is a picture whose shapes are all well off-centre or absent. That
class is what lets the score map of a large picture stay dark between objects, and
it is why the map peaks where a shape is centred in the window rather than
anywhere it is merely visible.

Writes shapes_vgg.pt (a state_dict) and shapes_vgg.json (its model card:
architecture, input shape, class names, preprocessing, held-out accuracy and the
checkpoint's sha256) into sample_models/retrained/, or --out DIR; --replace writes
over the shipped pair. Takes about three minutes on one CPU core:

    python sample_models/train_shapes.py
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from training import output_dir, save_sample  # noqa: E402

from fcconv.samples import ShapesVGG  # noqa: E402

SEED = 0
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
BACKGROUND = "background"
CLASSES = [*SHAPES, BACKGROUND]
SIZE = 32
MEAN, STD = 0.5, 0.25
TRAIN_SAMPLES, HELD_OUT_SAMPLES = 16000, 2000
EPOCHS = 8
CENTRED_SHIFT = 3  # a labelled shape's centre is at most this far from the picture's centre, per axis
OFF_CENTRE = 11  # the centre of every other shape in a picture is at least this far from it
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then reduced, for smooth edges


@dataclass(frozen=True)
class Shape:
    """One shape to paint: its kind, centre (x, y) in pixels, radius, rotation in degrees and RGB colour in [0, 1]."""

    kind: str
    centre: tuple[float, float]
    radius: float
    angle: float
    colour: tuple[float, float, float]


def noisy_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A height×width×3 float picture: one random colour with Gaussian noise on every pixel and channel."""
    base = rng.uniform(0, 1, size=3)
    noise = rng.normal(0, 0.06, size=(height, width, 3))
    return np.clip(base + noise, 0, 1).astype(np.float32)


def contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[float, float, float]:
    """A random colour at least 0.45 away (RGB distance) from the background's mean colour, so the shape shows."""
    mean = background.reshape(-1, 3).mean(0)
    while True:
        colour = rng.uniform(0, 1, size=3)
        if np.linalg.norm(colour - mean) >= 0.45:
            return (float(colour[0]), float(colour[1]), float(colour[2]))


def _outline(kind: str, radius: float) -> list[tuple[float, float]]:
    """The polygon of ``kind`` around (0, 0), unrotated, for the polygonal shapes."""
    if kind == "square":
        r = radius * 1.15
        return [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    if kind == "triangle":
        r = radius * 1.2
        return [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if kind == "star":
        points = []
        for k in range(10):
            r = radius * (1.2 if k % 2 == 0 else 0.5)
            a = -math.pi / 2 + k * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
        return points
    if kind == "cross":
        arm, half = radius * 1.1, radius * 0.35
        quarter = [(half, -half), (arm, -half), (arm, half), (half, half)]
        points = []
        for k in range(4):  # the same L-shaped step, turned four times
            a = k * math.pi / 2
            points += [(x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)) for x, y in quarter]
        return points
    raise ValueError(f"{kind} is not a polygonal shape")


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
    """The coverage of ``shape`` on a height×width picture: a float mask in [0, 1], antialiased."""
    scale = SUPERSAMPLE
    canvas = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = shape.centre[0] * scale, shape.centre[1] * scale
    r = shape.radius * scale
    if shape.kind in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape.kind == "ring":
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        turn = math.radians(shape.angle)
        cos, sin = math.cos(turn), math.sin(turn)
        points = [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in _outline(shape.kind, r)]
        draw.polygon(points, fill=255)
    small = canvas.reduce(scale)
    return np.asarray(small, dtype=np.float32) / 255.0


def paint(picture: np.ndarray, shape: Shape) -> None:
    """Paint ``shape`` onto ``picture`` (height×width×3, in place), blending its edges."""
    mask = shape_mask(shape, picture.shape[0], picture.shape[1])[..., None]
    picture *= 1 - mask
    picture += mask * np.asarray(shape.colour, dtype=np.float32)


def random_shape(rng: np.random.Generator, kind: str, centre: tuple[float, float], background: np.ndarray) -> Shape:
    """A shape of ``kind`` at ``centre`` with a random radius, rotation and a colour that stands out."""
    return Shape(
        kind=kind,
        centre=centre,
        radius=float(rng.uniform(6, 11)),
        angle=float(rng.uniform(0, 360)),
        colour=contrasting_colour(rng, background),
    )


def _off_centre(rng: np.random.Generator) -> tuple[float, float]:
    """A point at least OFF_CENTRE pixels from the picture's centre, close enough that its shape may show."""
    distance = rng.uniform(OFF_CENTRE, 24)
    direction = rng.uniform(0, 2 * math.pi)
    middle = SIZE / 2
    return (middle + distance * math.cos(direction), middle + distance * math.sin(direction))


def render_sample(label: int, rng: np.random.Generator) -> np.ndarray:
    """One SIZE×SIZE×3 picture of class ``CLASSES[label]``, floats in [0, 1]."""
    picture = noisy_background(rng, SIZE, SIZE)
    others = int(rng.integers(0, 3)) if CLASSES[label] == BACKGROUND else int(rng.integers(0, 2))
    for _ in range(others):
        kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
        paint(picture, random_shape(rng, kind, _off_centre(rng), picture))
    if CLASSES[label] != BACKGROUND:
        dx, dy = rng.uniform(-CENTRED_SHIFT, CENTRED_SHIFT, size=2)
        centre = (SIZE / 2 + float(dx), SIZE / 2 + float(dy))
        paint(picture, random_shape(rng, CLASSES[label], centre, picture))
    return picture


def make_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pictures as an N×3×SIZE×SIZE tensor in [0, 1] and their labels; each split has its own seed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=count)
    pictures = np.stack([render_sample(int(label), rng) for label in labels])
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


def training_split() -> tuple[torch.Tensor, torch.Tensor]:
    return make_split(TRAIN_SAMPLES, SEED)


def held_out_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out pictures the model card's accuracy is measured on (a seed the training split does not use)."""
    return make_split(HELD_OUT_SAMPLES, SEED + 1)


def normalize(pictures: torch.Tensor) -> torch.Tensor:
    """What the model card's ``preprocess`` says: (pixel - MEAN) / STD, pixels in [0, 1]."""
    return (pictures - MEAN) / STD


def accuracy(model: nn.Module, pictures: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(normalize(batch)).argmax(1) for batch in pictures.split(500)])
    return (predicted == labels).float().mean().item()


def main(folder: Path) -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    x_train, y_train = training_split()
    x_test, y_test = held_out_split()
    model = ShapesVGG(len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = EPOCHS * math.ceil(len(x_train) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 128):
            batch = order[start : start + 128]
            pictures = x_train[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # shapes are mirror-symmetric classes
            pictures = torch.where(flip[:, None, None, None], pictures.flip(3), pictures)
            optimizer.zero_grad()
            loss = loss_fn(model(normalize(pictures)), y_train[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
        held_out = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {held_out:.4f}", flush=True)
    card = {
        "arch": "fcconv.samples:ShapesVGG",
        "input_shape": [3, SIZE, SIZE],
        "classes": CLASSES,
        "background_class": BACKGROUND,
        "preprocess": {"mode": "RGB", "mean": [MEAN] * 3, "std": [STD] * 3},
        "held_out_accuracy": round(held_out, 4),
        "held_out_samples": len(x_test),
        "trained_by": "sample_models/train_shapes.py",
        "seed": SEED,
    }
    save_sample(model, card, folder, "shapes_vgg")


if __name__ == "__main__":
    folder = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    main(folder)
