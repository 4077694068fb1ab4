"""``inspect_file`` and ``heatmap_file``: what a conversion would do to a head, and where a model sees each class."""

from __future__ import annotations

from pathlib import Path

from fcconv.errors import BadInputError
from fcconv.pipeline.arguments import check_output, check_pool, parse_shape
from fcconv.pipeline.events import DenseModelReady, MapScored, Progress, Reporter
from fcconv.pipeline.input_shape import input_shape_explained
from fcconv.pipeline.onnx_input import is_onnx, refuse_for_onnx, rewrite_onnx_file
from fcconv.pipeline.results import HeatmapResult, InspectResult
from fcconv.pipeline.steps import load_checkpoint
from fcconv.sizes import parse_counts
from fcconv.tiling import tile_per_axis


def inspect_file(
    model: str | Path,
    *,
    arch: str | None = None,
    input_shape: str | None = None,
    dense: bool = False,
    pool: str | None = None,
    pointwise: bool = False,
    logits: bool = False,
    until: str | None = None,
    stride: str | int | None = None,
    dtype: str | None = None,
    trust: bool = False,
    progress: Progress | None = None,
) -> InspectResult:
    """The head of ``model`` as ``convert`` would rewrite it, without writing anything (``fcconv inspect``).

    Raises :class:`~fcconv.errors.BadInputError` (exit 2) or :class:`~fcconv.errors.NotConvertibleError` (exit 3).
    """
    model, report = Path(model), Reporter(progress)
    check_pool(pool)
    from fcconv.atrous import parse_stride

    stride = None if stride is None else parse_stride(stride)
    if is_onnx(model):
        refuse_for_onnx(arch=arch, pointwise=pointwise, dtype=dtype, trust=trust, stride=stride is not None)
        _, conversion = rewrite_onnx_file(model, input_shape, report, logits, until, dense, pool)
        return InspectResult(conversion, onnx=True, pool=pool)
    from fcconv.rewrite import analyze

    loaded = load_checkpoint(model, arch, input_shape, trust, dtype, report)
    with input_shape_explained(loaded, input_shape):
        conversion = analyze(
            loaded.module, loaded.input_shape, dense=dense, pool=pool, pointwise=pointwise, logits=logits, until=until,
            stride=stride,
        )  # fmt: skip
    return InspectResult(conversion, onnx=False, pool=pool)


def heatmap_file(
    model: str | Path,
    image: str | Path,
    output: str | Path | None = None,
    *,
    class_names: list[str] | None = None,
    top: int | None = None,
    save_map: str | Path | None = None,
    arch: str | None = None,
    input_shape: str | None = None,
    trust: bool = False,
    stride: str | int | None = None,
    tile: str | int | None = None,
    progress: Progress | None = None,
) -> HeatmapResult:
    """Draw where ``model`` sees each class in ``image`` and write the PNG (and, with ``save_map``, every class's
    probability map as K×h×w float32 .npy), as ``fcconv heatmap`` does.

    A checkpoint is converted in memory, densely (à trous at ``stride``, where given), and checked against the
    original at its native size; when
    that check fails nothing is written and the result's ``passed`` is False (the command's exit 1).
    A picture whose run would not fit ``fcconv map``'s tile budget is scored in exact tiles (of at most ``tile``
    pixels per axis, where given).
    Raises :class:`~fcconv.errors.BadInputError` (exit 2).
    """
    from fcconv.heatmap import load_dense_model, read_picture, score_map

    model, image, report = Path(model), Path(image), Reporter(progress)
    if class_names and top is not None:
        raise BadInputError("--class and --top choose the panels two ways; give one of them")
    if top is not None and top < 1:
        raise BadInputError(f"--top {top}: give at least 1")
    if not image.name:  # '' (which arrives as '.') or a folder such as '/'
        raise BadInputError(f"{image}: is a directory, not a picture")
    target = Path(output) if output is not None else image.with_name(f"{image.name.split('.')[0]}.heatmap.png")
    save_map = None if save_map is None else Path(save_map)
    check_output(target, ".png", "-o", (model, image))
    if save_map is not None:
        check_output(save_map, ".npy", "--save-map", (model, image))
    picture = read_picture(image)  # an unreadable picture is reported before the model is loaded
    shape = parse_shape(input_shape)
    if tile is not None:  # refused here, before the model is loaded
        tile = tile_per_axis(parse_counts(tile, "--tile", "1024, or 768,1024"), 2, "a picture")
    if stride is not None:
        from fcconv.atrous import parse_stride

        stride = parse_stride(stride)

    def loaded():  # the model as loaded before its dense conversion, to say what shape it takes
        from fcconv.load import load_model

        return load_model(model, arch, shape, trust=trust)

    with report.stage("load", f"Loading {model}…"), input_shape_explained(loaded, input_shape):
        dense = load_dense_model(model, arch, shape, trust=trust, stride=stride)
    report(DenseModelReady(dense.description, dense.check))
    if dense.check is not None and not dense.check.passed:
        return HeatmapResult(image, dense.check)
    with report.stage("score", f"Running on {image.name}…"):
        scores = score_map(dense, picture, tile=tile)
    if class_names:
        peaks = [scores.peak(scores.class_index(name)) for name in class_names]
    else:
        count = 3 if top is None else top
        ranked = [name for name in scores.classes if name != scores.background_class]
        if count > len(ranked):
            raise BadInputError(f"--top {count}: the model has {len(ranked)} classes to rank")
        peaks = scores.top(count)
    report(MapScored(image, scores, peaks))
    height, width = scores.picture.shape[:2]
    title = f"{image.name} ({width}×{height}) through {model.name}: class probabilities, {scores.probability_source}"
    written = _write_heatmap(scores, peaks, title, target, save_map, report)
    return HeatmapResult(image, dense.check, scores, peaks, written)


def _write_heatmap(scores, peaks, title: str, target: Path, save_map: Path | None, report: Reporter) -> list[Path]:
    """The figure as ``target`` and the map as ``save_map``: both or neither."""
    import numpy as np

    from fcconv.figure import heatmap_figure, write_png
    from fcconv.staging import staged_paths

    paths = [target, *([save_map] if save_map is not None else [])]
    with report.stage("write"), staged_paths(*paths) as staged:
        write_png(heatmap_figure(scores, peaks, title), staged[0])
        if save_map is not None:
            with open(staged[1], "wb") as f:
                np.save(f, np.ascontiguousarray(scores.probabilities, dtype=np.float32))
    return paths
