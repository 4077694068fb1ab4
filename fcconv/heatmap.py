"""Class-score maps of a picture: a converted classifier run densely, and where each of its scores lies.

A converted classifier run on a picture larger than its native input returns a map
of class scores, one score vector per output position. This module reads a picture
the way the model was trained to see it (its model card's ``preprocess``), runs the
model, turns the scores into class probabilities and says which pixels each position
reads (:class:`Placement`). It returns plain data; the command line draws it
(:mod:`fcconv.figure`).

Where a position lies is measured, not assumed: the model is run on blank inputs of
growing size until its map gains a second position, which gives the stride S, and
the map's size is then checked against ``floor((size - W) / S) + 1`` (W the native
input size) at several sizes and at the picture's own. Where that holds, position
(i, j) reads the window of rows ``[i·S, i·S + W)`` and columns ``[j·S, j·S + W)``
of the picture (exactly so for unpadded trunks; a padded trunk also sees a little
past the window's edges). Where it does not (a trunk whose map does not step like a
sliding window, such as a ResNet converted with its global pooling dropped), the
positions are spread evenly over the picture and :attr:`Placement.sliding` is False.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fcconv.errors import BadInputError, FcconvError
from fcconv.metadata import card_metadata, recorded_card
from fcconv.sizes import spatial_size

if TYPE_CHECKING:
    from fcconv.verify import VerificationReport

__all__ = [
    "DenseModel",
    "Peak",
    "Placement",
    "Preprocess",
    "ScoreMap",
    "card_metadata",
    "load_dense_model",
    "read_picture",
    "score_map",
]

PICTURE_MODES = {1: "L", 3: "RGB"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a picture becomes the model's input: Pillow ``mode`` ("L" or "RGB"), then (pixel / 255 - mean) / std."""

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def tensor(self, picture: Any) -> torch.Tensor:
        """``picture`` (a PIL image already in ``mode``) as a 1×C×H×W float32 tensor."""
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        pixels = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


@dataclass(frozen=True)
class Placement:
    """Which pixels output position (i, j) reads: rows ``[i·stride[0], i·stride[0] + window[0])``, columns likewise.

    ``sliding`` is True when the stride was measured on the model and the map's
    size follows the sliding-window formula at the picture's size; False when the
    positions are only spread evenly over the picture (then ``window == stride``).
    """

    stride: tuple[float, float]
    window: tuple[float, float]
    sliding: bool

    def window_at(self, i: int, j: int) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the pixels position (i, j) reads; bottom and right are exclusive."""
        top, left = i * self.stride[0], j * self.stride[1]
        return top, left, top + self.window[0], left + self.window[1]

    def centre(self, i: int, j: int) -> tuple[float, float]:
        """(y, x) of the middle of position (i, j)'s window, in coordinates where pixel k's centre is at k."""
        top, left, bottom, right = self.window_at(i, j)
        return (top + bottom - 1) / 2, (left + right - 1) / 2


@dataclass(frozen=True)
class Peak:
    """Where one class scores highest: its map position, the window centre there (y, x) and its probability."""

    class_index: int
    name: str
    position: tuple[int, int]
    centre: tuple[float, float]
    probability: float


@dataclass
class ScoreMap:
    """A picture's class-score map: K×h×w scores and probabilities, the class names and where each position lies.

    ``picture`` is the picture as the model saw it before normalization (H×W or
    H×W×3 uint8). ``log_probabilities`` rank positions where probabilities round to 1.
    """

    scores: np.ndarray
    probabilities: np.ndarray
    log_probabilities: np.ndarray
    classes: list[str]
    placement: Placement
    picture: np.ndarray
    background_class: str | None = None
    probability_source: str = "softmax of the scores"

    def class_index(self, name: str) -> int:
        """The index of class ``name``; unknown names raise :class:`BadInputError` listing the classes."""
        if name in self.classes:
            return self.classes.index(name)
        shown = ", ".join(self.classes[:20]) + (", …" if len(self.classes) > 20 else "")
        raise BadInputError(f"--class {name!r} is not one of the model's classes: {shown}")

    def peak(self, class_index: int) -> Peak:
        """The position where class ``class_index`` is most probable (the first, top-left, on a tie)."""
        flat = int(np.argmax(self.log_probabilities[class_index]))
        i, j = divmod(flat, self.log_probabilities.shape[2])
        return Peak(
            class_index=class_index,
            name=self.classes[class_index],
            position=(i, j),
            centre=self.placement.centre(i, j),
            probability=float(self.probabilities[class_index, i, j]),
        )

    def top(self, count: int) -> list[Peak]:
        """The ``count`` classes most probable anywhere on the map, best first; the background class is left out."""
        ranked = [self.peak(k) for k in range(len(self.classes)) if self.classes[k] != self.background_class]
        ranked.sort(key=lambda p: -float(self.log_probabilities[p.class_index][p.position]))
        return ranked[:count]


@dataclass
class DenseModel:
    """A converted classifier that maps a picture of any size to a score map, and how to read its output.

    ``run`` takes a 1×C×H×W float32 tensor and returns 1×K×h×w scores. ``stride`` is
    the measured step between positions in pixels, per axis (None where the map
    does not step like a sliding window). ``check`` is the native-size comparison of
    an in-memory conversion with the original, None for an ONNX file. ``activations``
    gives the peak activation bytes of ``run`` at an input shape
    (:func:`fcconv.memory.activation_bytes`), so that a picture too large to run is
    refused before it is run.
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    description: str
    input_shape: tuple[int, ...]
    classes: list[str]
    preprocess: Preprocess
    stride: tuple[int, int] | None
    background_class: str | None = None
    check: VerificationReport | None = None
    activations: Callable[[tuple[int, ...]], tuple[int, tuple[int, ...]] | None] | None = None
    fixed_size: bool = False
    """The model takes its native size only (an ONNX file without fcconv metadata whose input fixes it)."""


def _preprocess(spec: Any, channels: int, where: str, default_mean_std: tuple[tuple, tuple] | None) -> Preprocess:
    """The card's ``preprocess`` entry checked, or the default for ``channels``: pixels / 255, no normalization."""
    if channels not in PICTURE_MODES:
        raise BadInputError(
            f"{where}: the model takes {channels} input channels; heatmaps read 1 (grayscale) or 3 (RGB)"
        )
    mean, std = default_mean_std or ((0.0,) * channels, (1.0,) * channels)
    if spec is None:
        return Preprocess(PICTURE_MODES[channels], tuple(mean), tuple(std))
    if not isinstance(spec, dict):
        raise BadInputError(f'{where}: preprocess is not a JSON object like {{"mode": "RGB", "mean": [...]}}')
    mode = spec.get("mode", PICTURE_MODES[channels])
    if mode != PICTURE_MODES[channels]:
        raise BadInputError(f"{where}: preprocess mode {mode!r} does not fit a model of {channels} input channels")
    values = {}
    for key, default in (("mean", mean), ("std", std)):
        value = spec.get(key, default)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != channels
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        ):
            raise BadInputError(f"{where}: preprocess {key} must be {channels} numbers, one per channel")
        values[key] = tuple(float(v) for v in value)
    if any(s <= 0 for s in values["std"]):
        raise BadInputError(f"{where}: preprocess std must be positive")
    return Preprocess(mode, values["mean"], values["std"])


def _class_names(names: Any, count: int, where: str) -> list[str]:
    if names is None:
        return [str(k) for k in range(count)]
    if not isinstance(names, list) or len(names) != count:
        given = len(names) if isinstance(names, list) else "no list of"
        raise BadInputError(f"{where}: the model card names {given} classes but the model scores {count}")
    return [str(n) for n in names]


def _torchvision_defaults(arch: str, count: int) -> tuple[list[str] | None, tuple[tuple, tuple] | None]:
    """ImageNet's class names (when the model scores its 1000) and normalization, for a torchvision architecture."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        return None, None
    categories = torchvision.models.get_model_weights(arch).DEFAULT.meta.get("categories")
    names = list(categories) if categories and len(categories) == count else None
    return names, (IMAGENET_MEAN, IMAGENET_STD)


def _measure_stride(
    run: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """The step in pixels between neighbouring output positions, per axis; None where the map is no sliding window.

    The model is run on blank inputs: at its native size the map must have one
    position, and the smallest growth that gives a second one along an axis is
    that axis's stride S; the map's size must then follow ``(size - W) // S + 1``
    at W + S - 1, W + 2S - 1 and W + 2S.
    """
    channels, native = input_shape[0], tuple(input_shape[1:])

    def positions(axis: int, size: int) -> int:
        shape = list(native)
        shape[axis] = size
        return int(run(torch.zeros((1, channels, *shape))).shape[2 + axis])

    if len(native) != 2 or tuple(run(torch.zeros((1, *input_shape))).shape[2:]) != (1, 1):
        return None
    strides = []
    for axis in (0, 1):
        window = native[axis]
        if positions(axis, 2 * window) < 2:
            return None
        low, high = 1, window  # positions(window + high) >= 2, positions(window + low - 1) == 1
        while low < high:
            middle = (low + high) // 2
            if positions(axis, window + middle) >= 2:
                high = middle
            else:
                low = middle + 1
        stride = low
        for size in (window + stride - 1, window + 2 * stride - 1, window + 2 * stride):
            if positions(axis, size) != (size - window) // stride + 1:
                return None
        strides.append(stride)
    return strides[0], strides[1]


def _onnx_runner(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str], Callable[..., Any]]:
    """``run`` on the ONNX file, its metadata, and its activations' estimate (see :class:`DenseModel`)."""
    from fcconv.memory import activation_bytes
    from fcconv.runtime import OnnxRunner

    model = OnnxRunner(path)
    metadata = model.metadata
    channels_last = metadata.get("fcconv.layout") == "nhwc"
    if channels_last:  # read channels-first, like every other model here
        model = OnnxRunner(path, nhwc_input=True, nhwc_outputs=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        return first_output(model(x.to(model.dtype))).float()

    itemsize = model.dtype.itemsize
    return run, metadata, functools.partial(activation_bytes, path, itemsize=itemsize, channels_last=channels_last)


def first_output(value: Any) -> torch.Tensor:
    """The class scores of a model with several outputs: its first (the heads after it are drawn no map)."""
    from fcconv.outputs import named_outputs

    return named_outputs(value)[0][1]


def _card_beside(path: Path) -> dict[str, Any]:
    """The model card of the checkpoint an export was made from: ``NAME.json`` beside ``NAME.fcn.onnx``."""
    from fcconv.load import read_model_card

    return read_model_card(path.with_name(path.name.split(".")[0] + ".onnx"))


def _load_onnx(path: Path, input_shape: tuple[int, ...] | None) -> DenseModel:
    run, meta, activations = _onnx_runner(path)
    if meta.get("fcconv.pool", "none") != "none":
        raise BadInputError(
            f"{path} was exported with --pool {meta['fcconv.pool']}: its output is one score per class, not a map; "
            "convert the checkpoint again without --pool"
        )
    if meta.get("fcconv.window") == "global":
        raise BadInputError(
            f"{path} keeps its global pooling, so its map has one position at any size; "
            "convert the checkpoint again with --dense"
        )
    description, fixed = f"{path.name} (ONNX, onnxruntime)", False
    if input_shape is None:  # as fcconv check finds it: the metadata, else the fixed sizes the input declares
        from fcconv.check import DECLARED, onnx_native_shape

        input_shape, source = onnx_native_shape(path, "fcconv heatmap")
        fixed = source == DECLARED  # every spatial size fixed: the model runs at that size only
        if fixed:
            description += f", native input {'×'.join(map(str, input_shape))} as its input declares"
    card = _card_beside(path)
    where = str(path)
    classes: Any = card.get("classes")
    preprocess_spec = card.get("preprocess")
    background = card.get("background_class")
    try:
        recorded = recorded_card(meta)
    except ValueError:
        raise BadInputError(f"{path}: its fcconv.classes or fcconv.preprocess metadata is not valid JSON") from None
    classes = recorded.get("classes", classes)
    preprocess_spec = recorded.get("preprocess", preprocess_spec)
    background = recorded.get("background_class", background)
    return _finish(
        run, description, input_shape, classes, preprocess_spec, background, where,
        activations=activations, fixed_size=fixed,
    )  # fmt: skip


def _finish(
    run: Callable[[torch.Tensor], torch.Tensor],
    description: str,
    input_shape: tuple[int, ...],
    classes: Any,
    preprocess_spec: Any,
    background: Any,
    where: str,
    arch: str | None = None,
    check: VerificationReport | None = None,
    activations: Callable[[tuple[int, ...]], Any] | None = None,
    fixed_size: bool = False,
) -> DenseModel:
    """Measure the model's output (class count, stride) and resolve its class names and preprocessing."""
    if len(input_shape) != 3:
        raise BadInputError(f"{where}: heatmaps read pictures; the model's input {input_shape} is not C,H,W")
    try:
        native = run(torch.zeros((1, *input_shape)))
    except FcconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot run at its own size is unusable here
        text = " ".join(str(exc).split())[:200]
        raise BadInputError(f"{where}: the model does not run at its native size {input_shape} ({text})") from None
    if native.dim() != 4:
        raise BadInputError(f"{where}: the model's output is {tuple(native.shape)}, not a N×K×h×w score map")
    count = int(native.shape[1])
    default_names, mean_std = _torchvision_defaults(arch, count) if arch and ":" not in arch else (None, None)
    names = _class_names(classes if classes is not None else default_names, count, where)
    preprocess = _preprocess(preprocess_spec, input_shape[0], where, mean_std)
    if background is not None and background not in names:
        raise BadInputError(f"{where}: background_class {background!r} is not one of the model's classes")
    stride = None if fixed_size else _measure_stride(run, input_shape)
    return DenseModel(
        run, description, input_shape, names, preprocess, stride, background, check, activations, fixed_size
    )


def load_dense_model(
    path: str | Path,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    *,
    trust: bool = False,
    check: bool = True,
    stride: tuple[int, ...] | None = None,
) -> DenseModel:
    """Load ``path`` as a model that returns a score map for a picture of any size.

    An ``.onnx`` file (exported by ``fcconv convert``) runs in onnxruntime; its class
    names and preprocessing come from its metadata or from the model card of its
    checkpoint beside it (``NAME.json`` for ``NAME.fcn.onnx``). A checkpoint is
    loaded like ``fcconv convert`` loads it (model card, ``arch``) and converted in
    memory with ``dense=True``; with ``check`` the conversion is compared with the
    original once, at the native size (one batch of two random inputs), which costs
    two forward passes there. A model card's ``classes``, ``preprocess`` and
    ``background_class`` say how to read it; torchvision architectures default to
    ImageNet's normalization (and class names when they score 1000 classes). ``stride``
    converts the checkpoint à trous (:mod:`fcconv.atrous`): one window every ``stride``
    pixels; an ONNX export has the stride it was converted with.
    Raises :class:`BadInputError` or :class:`~fcconv.errors.NotConvertibleError`.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        if stride is not None:
            raise BadInputError(
                f"--stride does not apply to {path.name}: an export keeps the stride it was converted with "
                "(fcconv convert --stride)"
            )
        return _load_onnx(path, input_shape)
    from fcconv.load import load_model
    from fcconv.memory import activation_bytes
    from fcconv.rewrite import rewrite
    from fcconv.verify import verify

    loaded = load_model(path, arch, input_shape, trust=trust)
    loaded.module.float()
    conversion = rewrite(loaded.module, loaded.input_shape, dense=True, stride=stride)
    module = conversion.module.eval()
    activations = functools.partial(activation_bytes, module, itemsize=torch.float32.itemsize)
    report = None
    if check:
        native = spatial_size(loaded.input_shape)
        report = verify(loaded.module, module, loaded.input_shape, sizes=[native], conversion=conversion)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        return first_output(module(x))

    card = loaded.card
    return _finish(
        run,
        f"{path.name} ({loaded.arch}), converted in memory",
        tuple(loaded.input_shape),
        card.get("classes"),
        card.get("preprocess"),
        card.get("background_class"),
        str(path),
        arch=loaded.arch,
        check=report,
        activations=activations,
    )


def read_picture(path: str | Path, mode: str | None = None) -> Any:
    """The picture at ``path`` as a PIL image (in ``mode`` when given); unreadable files raise :class:`BadInputError`."""
    from PIL import Image, UnidentifiedImageError

    from fcconv.load import check_readable

    path = Path(path)
    check_readable(path, "picture")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.convert(mode) if mode else picture.copy()
    except UnidentifiedImageError:
        raise BadInputError(f"{path} is not a picture Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"{path} is too large to read safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupted files, unreadable permissions
        text = " ".join(str(exc).split())[:200]
        raise BadInputError(f"{path} cannot be read as a picture ({text})") from None


def _probabilities(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Probabilities and log-probabilities over the classes (axis 0), and what they were computed from.

    A model whose output already sums to 1 over the classes with no negative value
    ends in a softmax and is read as it is; one whose outputs are log-probabilities
    (their exponentials sum to 1) is exponentiated; any other output is softmaxed.
    """
    scores64 = scores.astype(np.float64)
    sums = scores64.sum(0)
    if scores64.min() >= 0 and np.allclose(sums, 1, atol=1e-4):
        with np.errstate(divide="ignore"):
            return scores64.astype(np.float32), np.log(scores64), "the model's own probabilities"
    log = scores64 - scores64.max(0, keepdims=True)
    log = log - np.log(np.exp(log).sum(0, keepdims=True))
    if scores64.max() <= 0 and np.allclose(np.exp(scores64).sum(0), 1, atol=1e-4):
        return np.exp(scores64).astype(np.float32), scores64, "the exponentials of the model's log-probabilities"
    return np.exp(log).astype(np.float32), log, "softmax of the scores"


def score_map(
    model: DenseModel, picture: Any, *, tile: tuple[int, ...] | None = None, budget: int | None = None
) -> ScoreMap:
    """Run ``model`` on ``picture`` (a path or a PIL image, converted to the model's mode) and return its :class:`ScoreMap`.

    The picture must be at least the model's native size on both axes. A picture whose run would hold more than
    ``budget`` bytes of activations (``fcconv map``'s default tile budget, :func:`fcconv.mapping.tile_budget`) is
    scored as ``fcconv map`` scores an input, in exact tiles (:mod:`fcconv.tiling`) of at most ``tile`` pixels
    per axis (by default as large as the budget allows), so that its run need not fit in memory at once.
    """
    if not hasattr(picture, "convert"):
        picture = read_picture(picture, model.preprocess.mode)
    elif picture.mode != model.preprocess.mode:
        picture = picture.convert(model.preprocess.mode)
    height, width = picture.height, picture.width
    native = model.input_shape[1:]
    if height < native[0] or width < native[1]:
        raise BadInputError(
            f"the picture is {width}×{height} pixels, smaller than the model's native {native[1]}×{native[0]} input"
        )
    if model.fixed_size and (height, width) != tuple(native):
        raise BadInputError(
            f"the picture is {width}×{height} pixels; the model's input fixes its size to {native[1]}×{native[0]} "
            "and it records no other (no fcconv metadata): give a picture of that size"
        )
    whole = _activation_bytes(model, (height, width))
    scores = _scores_by_tiles(model, picture, tile, budget, whole)
    if scores is None:
        _refuse_picture_beyond_memory(model, width, height, whole)
        scores = model.run(model.preprocess.tensor(picture))
        scores = scores.detach().float().cpu().numpy()[0]
    probabilities, log_probabilities, source = _probabilities(scores)
    placement = _placement(model, (height, width), scores.shape[1:])
    return ScoreMap(
        scores=scores,
        probabilities=probabilities,
        log_probabilities=log_probabilities.astype(np.float32),
        classes=model.classes,
        placement=placement,
        picture=np.asarray(picture),
        background_class=model.background_class,
        probability_source=source,
    )


def _activation_bytes(model: DenseModel, size: tuple[int, ...]) -> int | None:
    """The peak activation bytes of one run of ``model`` on a picture of ``size`` (H, W); None where unknown."""
    found = model.activations((1, model.input_shape[0], *size)) if model.activations is not None else None
    return found[0] if found else None


def _scores_by_tiles(
    model: DenseModel, picture: Any, tile: tuple[int, ...] | None, budget: int | None, whole: int | None
) -> np.ndarray | None:
    """The K×h×w scores of ``picture`` computed tile by tile, or None where one pass serves: without ``tile``, a
    picture whose run (``whole`` bytes of activations) fits ``budget``, or a model whose activations cannot be
    estimated."""
    from fcconv.mapping import default_tiles, tile_budget
    from fcconv.tiling import measure_extent, output_size, plan_tiles, tile_per_axis

    size = (picture.height, picture.width)
    channels, native = model.input_shape[0], tuple(model.input_shape[1:])
    if tile is None:
        budget = budget or tile_budget(1)
        if whole is None or whole <= budget:
            return None
    if model.stride is None:
        if tile is None:
            return None  # no sliding map to cut: one pass, if it fits in memory
        raise BadInputError(f"--tile: {model.description}'s map does not step like a sliding window, so it cannot be "
                            "cut into tiles; leave --tile out")  # fmt: skip

    def run(x: np.ndarray) -> np.ndarray:
        return model.run(torch.from_numpy(x)).detach().float().cpu().numpy()

    extents = measure_extent(run, native, channels, model.stride, native)
    if tile is None:
        tile = default_tiles(size, extents, functools.partial(_activation_bytes, model), budget)
    scores = None
    for part in plan_tiles(size, extents, tile_per_axis(tile, 2, "a picture")):
        (top, bottom), (left, right) = part.input
        own = run(model.preprocess.tensor(picture.crop((left, top, right, bottom))).numpy())[0][
            (slice(None), *part.own_slices)
        ]
        if scores is None:
            scores = np.empty((own.shape[0], *(output_size(n, e) for n, e in zip(size, extents))), np.float32)
        scores[(slice(None), *part.output_slices)] = own
    return scores


def _refuse_picture_beyond_memory(model: DenseModel, width: int, height: int, activations: int | None) -> None:
    """Refuse a picture whose run cannot fit in memory, before it is run: the picture as float32 pixels, twice
    (normalized, then transposed channels-first), and the model's ``activations`` at its size."""
    from fcconv.memory import refuse_beyond_memory

    if model.activations is None:
        return
    shape = (1, model.input_shape[0], height, width)
    needed = 2 * math.prod(shape) * torch.float32.itemsize + (activations or 0)
    refuse_beyond_memory([((width, height), needed)], "drawing the heatmap", "scale the picture down")


def _placement(model: DenseModel, size: tuple[int, int], positions: tuple[int, ...]) -> Placement:
    """The sliding-window placement where the measured stride explains the map's size, else an even spread."""
    native = model.input_shape[1:]
    if model.stride is not None and all(
        count == (extent - window) // stride + 1
        for count, extent, window, stride in zip(positions, size, native, model.stride)
    ):
        return Placement(
            stride=(float(model.stride[0]), float(model.stride[1])),
            window=(float(native[0]), float(native[1])),
            sliding=True,
        )
    cells = (size[0] / positions[0], size[1] / positions[1])
    return Placement(stride=cells, window=cells, sliding=False)
