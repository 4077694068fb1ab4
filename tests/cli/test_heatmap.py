"""fcconv heatmap: score maps placed on the pixels they read, the PNG and .npy it writes, and its bad input."""

import hashlib
import importlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, seeded
from PIL import Image

from fcconv.errors import BadInputError
from fcconv.heatmap import load_dense_model, score_map

SAMPLES = REPO / "sample_models"
DIGITS, SHAPES = SAMPLES / "digits_lenet.pt", SAMPLES / "shapes_vgg.pt"
sys.path.insert(0, str(SAMPLES))

import demo_canvas  # noqa: E402


def run(*args, cwd=None):
    """The command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def invoke(*args):
    """The command in this process (faster: torch is imported once); exit_code, stdout and stderr as from a run."""
    from typer.testing import CliRunner

    from fcconv.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder):
    return {p.name: digest(p) if p.is_file() else None for p in folder.iterdir()}


def random_picture(height, width, mode, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


@pytest.fixture(scope="module")
def digits():
    return load_dense_model(DIGITS)


def test_each_position_scores_the_window_of_pixels_it_is_placed_on(digits):
    """The LeNet's trunk has no padding, so position (i, j) is exactly the original run on the window it is drawn on."""
    from fcconv.samples import DigitsLeNet

    original = DigitsLeNet().eval()
    original.load_state_dict(torch.load(DIGITS, weights_only=True))
    picture = random_picture(45, 61, "L")
    scores = score_map(digits, picture)
    assert scores.placement.sliding
    assert scores.placement.stride == (4.0, 4.0) and scores.placement.window == (28.0, 28.0)
    assert scores.scores.shape == (10, (45 - 28) // 4 + 1, (61 - 28) // 4 + 1)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)
    for i in range(scores.scores.shape[1]):
        for j in range(scores.scores.shape[2]):
            top, left, bottom, right = (int(v) for v in scores.placement.window_at(i, j))
            with torch.no_grad():
                expected = original(pixels[top:bottom, left:right][None, None])[0].numpy()
            np.testing.assert_allclose(scores.scores[:, i, j], expected, rtol=1e-5, atol=1e-5)
    assert scores.placement.centre(0, 0) == (13.5, 13.5)


def test_the_stride_is_measured_on_the_model_and_explains_the_maps_size():
    shapes = load_dense_model(SHAPES)
    assert shapes.stride == (8, 8)
    assert shapes.check is not None and shapes.check.passed
    scores = score_map(shapes, random_picture(57, 100, "RGB"))
    assert scores.scores.shape == (7, (57 - 32) // 8 + 1, (100 - 32) // 8 + 1)
    assert scores.placement.window_at(2, 3) == (16.0, 24.0, 48.0, 56.0)


def test_a_map_that_does_not_step_like_a_sliding_window_is_spread_evenly(tmp_path):
    """A global pooling dropped (dense): the map has positions at the native size already, so no window is read."""
    from custom_models import MeanPooled

    checkpoint = tmp_path / "pooled.pt"
    torch.save(seeded(MeanPooled).state_dict(), checkpoint)
    model = load_dense_model(checkpoint, "custom_models:MeanPooled", (3, 16, 16))
    assert model.stride is None
    scores = score_map(model, random_picture(40, 30, "RGB"))
    rows, columns = scores.scores.shape[1:]
    assert not scores.placement.sliding
    assert scores.placement.stride == (40 / rows, 30 / columns) == scores.placement.window


def test_probabilities_are_a_softmax_over_the_classes_unless_the_model_ends_in_one(tmp_path, digits):
    from custom_models import HeadWithBatchNorm

    scores = score_map(digits, random_picture(40, 40, "L"))
    assert scores.probability_source == "softmax of the scores"
    np.testing.assert_allclose(scores.probabilities.sum(0), 1, rtol=1e-5)
    assert np.argmax(scores.probabilities[:, 1, 2]) == np.argmax(scores.scores[:, 1, 2])

    checkpoint = tmp_path / "softmaxed.pt"
    torch.save(seeded(HeadWithBatchNorm).state_dict(), checkpoint)
    softmaxed = score_map(load_dense_model(checkpoint, "custom_models:HeadWithBatchNorm", (3, 16, 18)),
                          random_picture(30, 30, "RGB"))  # fmt: skip
    assert softmaxed.probability_source == "the model's own probabilities"
    np.testing.assert_array_equal(softmaxed.probabilities, softmaxed.scores)


def test_the_top_classes_leave_out_the_background_and_are_ranked_by_their_peaks():
    shapes = load_dense_model(SHAPES)
    picture, placed = demo_canvas.compose_shapes(3)
    scores = score_map(shapes, picture)
    top = scores.top(6)
    assert "background" not in [peak.name for peak in top] and len(top) == 6
    best = [float(scores.log_probabilities[p.class_index][p.position]) for p in top]
    assert best == sorted(best, reverse=True)
    assert best[0] == max(float(scores.log_probabilities[k].max()) for k in range(6))


def test_a_picture_smaller_than_the_native_size_is_bad_input(digits):
    with pytest.raises(BadInputError, match="smaller than the model's native 28×28"):
        score_map(digits, random_picture(20, 60, "L"))


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("canvases")
    for name, compose in demo_canvas.COMPOSERS.items():
        compose(0)[0].save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("name,model,classes,map_size", [
    ("digits", DIGITS, 10, (31, 44)),
    ("shapes", SHAPES, 7, (19, 27)),
])  # fmt: skip
def test_a_sample_model_draws_its_heatmap_by_path_alone(tmp_path, canvases, name, model, classes, map_size):
    canvas = tmp_path / "canvas.png"
    canvas.write_bytes((canvases / f"{name}.png").read_bytes())
    before = digest(canvas)
    result = run("heatmap", model, canvas, "-o", tmp_path / "out.png", "--save-map", tmp_path / "map.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"map {map_size[0]}×{map_size[1]}" in result.stdout and "checked at the native" in result.stdout
    with Image.open(tmp_path / "out.png") as png:
        assert png.format == "PNG" and png.width > 600
    probabilities = np.load(tmp_path / "map.npy")
    assert probabilities.shape == (classes, *map_size) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1, rtol=1e-5)
    assert digest(canvas) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canvas.png", "map.npy", "out.png"]


def test_the_export_draws_the_same_map_as_the_checkpoint_with_its_class_names(tmp_path, canvases):
    exported = tmp_path / "digits.onnx"
    assert invoke("convert", DIGITS, "-o", exported).exit_code == 0
    metadata = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert metadata["fcconv.classes"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'
    from_onnx = invoke("heatmap", exported, canvases / "digits.png", "-o", tmp_path / "a.png", "--save-map",
                       tmp_path / "a.npy", "--class", "3", "--class", "7")  # fmt: skip
    assert from_onnx.exit_code == 0, from_onnx.stderr
    assert "onnxruntime" in from_onnx.stdout and "checked" not in from_onnx.stdout
    model = load_dense_model(DIGITS)
    expected = score_map(model, canvases / "digits.png").probabilities
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, atol=1e-5)

    pooled = tmp_path / "pooled.onnx"
    assert invoke("convert", DIGITS, "-o", pooled, "--pool", "avg").exit_code == 0
    refused = invoke("heatmap", pooled, canvases / "digits.png", "-o", tmp_path / "b.png")
    assert refused.exit_code == 2 and "--pool avg" in refused.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_a_picture_too_large_for_one_run_is_scored_in_exact_tiles(tmp_path, source):
    """Past the tile budget (or with --tile), the map is made tile by tile as fcconv map makes it, and is the same."""
    import dataclasses

    path = SHAPES
    if source == "export":
        path = tmp_path / "shapes.onnx"
        assert invoke("convert", SHAPES, "-o", path).exit_code == 0
    model = load_dense_model(path)
    picture = random_picture(150, 190, "RGB", seed=3)
    one_pass = score_map(model, picture)
    seen = []

    def run(x):
        seen.append(tuple(x.shape[2:]))
        return model.run(x)

    counted = dataclasses.replace(model, run=run)
    for tiled in (score_map(counted, picture, tile=(64,)), score_map(counted, picture, budget=1_000_000)):
        np.testing.assert_allclose(tiled.scores, one_pass.scores, rtol=1e-5, atol=1e-5)
        assert tiled.placement == one_pass.placement
    # no run held the whole picture; measuring the extent ran probes of four native sizes along one axis
    assert (150, 190) not in seen and all(h <= 128 and w <= 128 for h, w in seen)

    picture.save(tmp_path / "picture.png")
    for name, extra in (("whole.npy", []), ("tiled.npy", ["--tile", "64"])):
        drawn = invoke("heatmap", path, tmp_path / "picture.png", "-o", tmp_path / "out.png", "--save-map",
                       tmp_path / name, *extra)  # fmt: skip
        assert drawn.exit_code == 0, drawn.stderr
    np.testing.assert_allclose(np.load(tmp_path / "tiled.npy"), np.load(tmp_path / "whole.npy"), rtol=1e-5, atol=1e-5)
    (tmp_path / "out.png").unlink()
    for tile, says in [("8", "smaller than what one map position reads"), ("64,64,64", "a picture has two axes")]:
        refused = invoke("heatmap", path, tmp_path / "picture.png", "-o", tmp_path / "out.png", "--tile", tile)
        assert refused.exit_code == 2 and says in refused.stderr, refused.stderr
        assert not (tmp_path / "out.png").exists()


def test_an_export_without_class_names_reads_the_model_card_beside_it(tmp_path, canvases):
    import json

    from fcconv import export_onnx, rewrite
    from fcconv.load import load_model

    loaded = load_model(DIGITS)
    export_onnx(rewrite(loaded.module, loaded.input_shape).module, tmp_path / "digits.fcn.onnx", loaded.input_shape)
    card = json.loads(DIGITS.with_suffix(".json").read_text())
    card["classes"] = [f"digit {k}" for k in range(10)]
    (tmp_path / "digits.json").write_text(json.dumps(card))
    scores = score_map(load_dense_model(tmp_path / "digits.fcn.onnx"), canvases / "digits.png")
    assert scores.classes == card["classes"]


def test_an_export_that_keeps_its_global_pooling_is_refused(tmp_path, canvases):
    from custom_models import MeanPooled

    from fcconv import export_onnx, rewrite

    pooled = tmp_path / "pooled.onnx"
    export_onnx(rewrite(seeded(MeanPooled), (3, 16, 16)).module, pooled, (3, 16, 16))
    with pytest.raises(BadInputError, match="keeps its global pooling.*--dense"):
        load_dense_model(pooled)


def bad_heatmap_inputs(tmp_path, canvases):
    noise = tmp_path / "noise.png"
    noise.write_bytes(os.urandom(2048))
    (tmp_path / "noise.onnx").write_bytes(noise.read_bytes())
    whole = (canvases / "digits.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "folder").mkdir()
    random_picture(20, 20, "L").save(tmp_path / "small.png")
    canvas = tmp_path / "canvas.png"
    canvas.write_bytes(whole)
    out = ["-o", tmp_path / "out.png"]
    return {
        "random bytes": ([DIGITS, noise, *out], "is not a picture Pillow can read"),
        "truncated picture": ([DIGITS, tmp_path / "truncated.png", *out], "cannot be read as a picture"),
        "missing picture": ([DIGITS, tmp_path / "nope.png", *out], "no such file"),
        "a folder": ([DIGITS, tmp_path / "folder", *out], "is a directory"),
        "picture too small": ([DIGITS, tmp_path / "small.png", *out], "smaller than the model's native"),
        "unknown class": ([DIGITS, canvas, *out, "--class", "dog"], "--class 'dog' is not one of the model's classes"),
        "class and top": ([DIGITS, canvas, *out, "--class", "3", "--top", "2"], "give one of them"),
        "top 0": ([DIGITS, canvas, *out, "--top", "0"], "--top 0"),
        "top past the classes": ([SHAPES, canvas, *out, "--top", "7"], "6 classes to rank"),
        "not a png": ([DIGITS, canvas, "-o", tmp_path / "out.jpg"], "name it NAME.png"),
        "map not npy": ([DIGITS, canvas, *out, "--save-map", tmp_path / "map.txt"], "name it NAME.npy"),
        "overwrites the picture": ([DIGITS, canvas, "-o", canvas], "would overwrite an input"),
        "missing folder": ([DIGITS, canvas, "-o", tmp_path / "no" / "out.png"], "does not exist"),
        "missing model": ([tmp_path / "nope.pt", canvas, *out], "no such file"),
        "onnx that is not": ([tmp_path / "noise.onnx", canvas, *out], "not an ONNX model"),
    }  # fmt: skip


def test_bad_input_gets_one_line_exit_2_and_no_output(tmp_path, canvases):
    for case, (args, expected) in bad_heatmap_inputs(tmp_path, canvases).items():
        before = folder_state(tmp_path)
        result = invoke("heatmap", *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (case, result.stderr)
        assert len(lines) == 1 and expected in lines[0], (case, result.stderr)
        assert "Traceback" not in result.stderr
        assert folder_state(tmp_path) == before, case


def test_a_model_that_cannot_be_made_dense_exits_3_and_writes_nothing(tmp_path):
    from custom_models import NormalizesTheWindow

    checkpoint = tmp_path / "norm.pt"
    torch.save(seeded(NormalizesTheWindow).state_dict(), checkpoint)
    random_picture(20, 20, "L").save(tmp_path / "picture.png")
    result = invoke("heatmap", checkpoint, tmp_path / "picture.png", "-o", tmp_path / "out.png", "--arch",
                    "custom_models:NormalizesTheWindow", "--input-shape", "1,8,8")  # fmt: skip
    assert result.exit_code == 3
    assert "norm (LayerNorm)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norm.pt", "picture.png"]


def test_a_conversion_that_does_not_match_exits_1_and_writes_nothing(tmp_path, canvases, monkeypatch):
    from fcconv.verify import SizeCheck, VerificationReport

    failed = SizeCheck((28, 28), "sliding window", (2, 10, 1, 1), (2, 10, 1, 1), 1.0, 1.0, 0.5, 0.5, 2.0, (0, 0, 0, 0),
                       0.0, False)  # fmt: skip
    monkeypatch.setattr(
        importlib.import_module("fcconv.verify"), "verify", lambda *a, **k: VerificationReport([failed])
    )
    result = invoke("heatmap", DIGITS, canvases / "digits.png", "-o", tmp_path / "out.png")
    assert result.exit_code == 1
    assert "does not match" in result.stderr and not any(tmp_path.iterdir())


def test_a_failure_while_writing_leaves_neither_file(tmp_path, canvases, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    result = invoke("heatmap", DIGITS, canvases / "digits.png", "-o", tmp_path / "out.png", "--save-map",
                    tmp_path / "map.npy")  # fmt: skip
    assert result.exit_code == 2 and "No space left" in result.stderr
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    result = run("heatmap", DIGITS, tmp_path / "nope.png", "-o", tmp_path / "out.png", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
