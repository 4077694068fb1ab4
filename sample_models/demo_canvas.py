"""Compose a large picture of samples at known places, and check where the sample models' score maps peak.

The samples are drawn by the training scripts' own generators from seeds the
training never used, so the models have not seen them: digits as the digit
classifier saw them (no shift, the noise added over the whole picture), shapes
with the shape classifier's random sizes, colours and rotations on one noisy
background. Each picture holds one sample of each of several different classes,
so a class's peak is the place of its one sample.

    python sample_models/demo_canvas.py digits -o canvas_digits.png
    python sample_models/demo_canvas.py shapes -o canvas_shapes.png --heatmap heatmap_shapes.png

prints each sample's class and centre and, for each, where the model's map of
that class peaks and whether that is within one output stride of it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_digits  # noqa: E402
import train_shapes  # noqa: E402

MODELS = {"digits": HERE / "digits_lenet.pt", "shapes": HERE / "shapes_vgg.pt"}
CANVAS_SIZES = {"digits": (150, 200), "shapes": (180, 240)}  # height, width
SAMPLES_PER_CANVAS = {"digits": 6, "shapes": 5}
DEMO_SEED = 1000  # the training scripts use seeds 0 and 1


@dataclass(frozen=True)
class PlacedSample:
    """One sample on the picture: its class and the centre (y, x) of the window it fills, in pixel coordinates."""

    name: str
    top_left: tuple[int, int]
    window: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.top_left[0] + (self.window - 1) / 2, self.top_left[1] + (self.window - 1) / 2


def _top_lefts(rng: np.random.Generator, count: int, size: tuple[int, int], window: int) -> list[tuple[int, int]]:
    """Window corners inside the picture, each pair at least a window and a bit apart along some axis."""
    spacing = window + 4
    while True:
        corners: list[tuple[int, int]] = []
        for _ in range(200):
            corner = (int(rng.integers(0, size[0] - window + 1)), int(rng.integers(0, size[1] - window + 1)))
            if all(max(abs(corner[0] - y), abs(corner[1] - x)) >= spacing for y, x in corners):
                corners.append(corner)
                if len(corners) == count:
                    return corners


def compose_digits(seed: int, size: tuple[int, int] = CANVAS_SIZES["digits"], count: int = 6):
    """A grayscale picture with ``count`` different digits at random places, and where each one is."""
    rng = np.random.default_rng(seed)
    window = 28
    digits = rng.choice(10, size=count, replace=False)
    layer = np.zeros(size, dtype=np.float32)
    placed = []
    for digit, (top, left) in zip(digits, _top_lefts(rng, count, size, window)):
        patch = train_digits.render_digit(int(digit), rng, window, shift=0, noise=0)
        region = layer[top : top + window, left : left + window]
        np.maximum(region, patch, out=region)
        placed.append(PlacedSample(str(digit), (top, left), window))
    pixels = np.clip(layer + rng.normal(0, 0.1, size), 0, 1)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L"), placed


def compose_shapes(seed: int, size: tuple[int, int] = CANVAS_SIZES["shapes"], count: int = 5):
    """An RGB picture with ``count`` different shapes at random places on one noisy background, and where each is."""
    rng = np.random.default_rng(seed)
    window = train_shapes.SIZE
    kinds = rng.choice(len(train_shapes.SHAPES), size=count, replace=False)
    picture = train_shapes.noisy_background(rng, *size)
    placed = []
    for kind, (top, left) in zip(kinds, _top_lefts(rng, count, size, window)):
        name = train_shapes.SHAPES[int(kind)]
        # Pillow's coordinates put pixel k between k and k + 1: a window's middle is at its corner + SIZE / 2.
        centre = (left + window / 2, top + window / 2)
        train_shapes.paint(picture, train_shapes.random_shape(rng, name, centre, picture))
        placed.append(PlacedSample(name, (top, left), window))
    return Image.fromarray(np.round(picture * 255).astype(np.uint8), mode="RGB"), placed


COMPOSERS = {"digits": compose_digits, "shapes": compose_shapes}


@dataclass(frozen=True)
class Found:
    """Where the map of a placed sample's class peaks, and whether that is within one stride of the sample."""

    sample: PlacedSample
    peak_centre: tuple[float, float]
    probability: float
    within_one_stride: bool


def find_samples(score_map, placed: list[PlacedSample]) -> list[Found]:
    """For each placed sample, the peak of its class's map and whether it lies within one output stride of it."""
    stride = score_map.placement.stride
    found = []
    for sample in placed:
        peak = score_map.peak(score_map.class_index(sample.name))
        near = all(abs(p - c) <= s for p, c, s in zip(peak.centre, sample.centre, stride))
        found.append(Found(sample, peak.centre, peak.probability, near))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(COMPOSERS), help="which sample model's data to compose")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the picture to write (PNG)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--heatmap", type=Path, help="also draw the placed classes' maps into this PNG")
    args = parser.parse_args()

    import torch

    from fcconv.figure import heatmap_figure, write_png
    from fcconv.heatmap import load_dense_model, score_map

    torch.set_num_threads(1)
    picture, placed = COMPOSERS[args.model](args.seed)
    picture.save(args.output)
    height, width = CANVAS_SIZES[args.model]
    print(f"wrote {args.output}: {width}×{height} pixels, {len(placed)} samples (seed {args.seed})")
    scores = score_map(load_dense_model(MODELS[args.model]), picture)
    found = find_samples(scores, placed)
    for item in found:
        (y, x), (py, px) = item.sample.centre, item.peak_centre
        verdict = "within one stride" if item.within_one_stride else "MISSED"
        print(f"  {item.sample.name:>8} at x {x:g}, y {y:g}: its map peaks at x {px:g}, y {py:g} "
              f"(p {item.probability:.2f}), {verdict}")  # fmt: skip
    if args.heatmap:
        peaks = [scores.peak(scores.class_index(item.sample.name)) for item in found]
        write_png(heatmap_figure(scores, peaks, f"{args.output.name}: the placed classes"), args.heatmap)
        print(f"wrote {args.heatmap}")


if __name__ == "__main__":
    main()
