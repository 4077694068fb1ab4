"""Draw a :class:`~fcconv.heatmap.ScoreMap` as a PNG: the picture with one class's probabilities laid over it per panel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fcconv.heatmap import Peak, ScoreMap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["heatmap_figure", "write_png"]

COLOUR_MAP = "inferno"
MAX_ALPHA = 0.85
PANEL_INCHES = 4.0
MAX_COLUMNS = 3


def _extent(score_map: ScoreMap) -> tuple[float, float, float, float]:
    """imshow's (left, right, bottom, top) for the map: each position a stride-sized block around its window's centre."""
    placement = score_map.placement
    rows, columns = score_map.probabilities.shape[1:]
    first_y, first_x = placement.centre(0, 0)
    last_y, last_x = placement.centre(rows - 1, columns - 1)
    half_y, half_x = placement.stride[0] / 2, placement.stride[1] / 2
    return first_x - half_x, last_x + half_x, last_y + half_y, first_y - half_y


def _overlay(probabilities: np.ndarray) -> np.ndarray:
    """RGBA colours of a probability map: the colour map's colour, as opaque as the probability is high."""
    from matplotlib import colormaps

    clipped = np.clip(probabilities, 0, 1)
    rgba = colormaps[COLOUR_MAP](clipped)
    rgba[..., 3] = MAX_ALPHA * clipped
    return rgba


def heatmap_figure(score_map: ScoreMap, peaks: Sequence[Peak], title: str) -> Figure:
    """A matplotlib Figure with one panel per peak's class: its probability map laid over the picture (clear where
    the class is improbable), the window of its peak outlined, the area the map covers dashed, and one colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    picture = score_map.picture
    height, width = picture.shape[:2]
    columns = min(len(peaks), MAX_COLUMNS)
    rows = -(-len(peaks) // columns)
    panel_height = PANEL_INCHES * height / width
    figure = Figure(
        figsize=(PANEL_INCHES * columns + 1.0, (panel_height + 0.45) * rows + 0.4), dpi=100, layout="constrained"
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    left, right, bottom, top = _extent(score_map)
    for ax in axes[len(peaks) :]:
        ax.set_axis_off()
    for rank, (ax, peak) in enumerate(zip(axes, peaks), start=1):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.imshow(
            _overlay(score_map.probabilities[peak.class_index]),
            extent=(left, right, bottom, top),
            interpolation="nearest",
        )
        ax.add_patch(
            Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white", linewidth=0.6,
                      linestyle=(0, (3, 3)), alpha=0.7)
        )  # fmt: skip
        window_top, window_left, window_bottom, window_right = score_map.placement.window_at(*peak.position)
        ax.add_patch(
            Rectangle((window_left - 0.5, window_top - 0.5), window_right - window_left, window_bottom - window_top,
                      fill=False, edgecolor="cyan", linewidth=1.2)
        )  # fmt: skip
        ax.plot([peak.centre[1]], [peak.centre[0]], marker="+", color="cyan", markersize=8)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(f"{rank}. {peak.name}: peak {peak.probability:.2f} at x {peak.centre[1]:g}, y {peak.centre[0]:g}")
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    colour_bar = figure.colorbar(
        ScalarMappable(Normalize(0, 1), COLOUR_MAP), ax=list(axes), shrink=0.9, pad=0.01, aspect=30
    )
    colour_bar.set_label("class probability (more opaque where higher)", fontsize=8)
    colour_bar.ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=9)
    return figure


def write_png(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` to ``path`` as a PNG (whatever the suffix) of 256 colours, which keeps noisy pictures small;
    the file holds no timestamp, so the same figure gives the same bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    palette = pixels.convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.FLOYDSTEINBERG)
    palette.save(path, format="PNG", optimize=True)
