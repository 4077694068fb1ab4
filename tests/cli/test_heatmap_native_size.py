"""fcconv heatmap of an ONNX file without fcconv metadata finds its native size as fcconv check does: from the
fixed sizes its input declares; only where the graph fixes none does it ask for --input-shape, in one line."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_check_declared_sizes import conv_net
from typer.testing import CliRunner

from fcconv.cli import app


def heatmap(*args):
    result = CliRunner().invoke(app, ["heatmap", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def picture(path, width, height):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_an_export_without_metadata_takes_its_native_size_from_the_fixed_sizes_its_input_declares(tmp_path):
    model = conv_net(tmp_path / "fixed.onnx", ["n", 3, 16, 16])  # a 3×3 then a 1×1 convolution: a 14×14 map
    code, stdout, stderr = heatmap(model, picture(tmp_path / "p.png", 16, 16), "-o", tmp_path / "out.png")
    assert code == 0, stdout + stderr
    assert "fixed.onnx (ONNX, onnxruntime), native input 3×16×16 as its input declares" in stdout
    assert "map 14×14" in stdout and (tmp_path / "out.png").is_file()


def test_a_picture_of_another_size_than_a_fixed_input_is_refused_in_one_line_naming_both(tmp_path):
    model = conv_net(tmp_path / "fixed.onnx", [1, 3, 16, 16])
    code, stdout, stderr = heatmap(model, picture(tmp_path / "p.png", 48, 40), "-o", tmp_path / "out.png")
    assert code == 2, stdout + stderr
    assert stderr.splitlines() == [
        "fcconv: error: the picture is 48×40 pixels; the model's input fixes its size to 16×16 and it records no "
        "other (no fcconv metadata): give a picture of that size"
    ]
    assert not (tmp_path / "out.png").exists()


def test_an_export_whose_input_fixes_no_size_and_records_none_asks_for_input_shape_in_one_line(tmp_path):
    model = conv_net(tmp_path / "free.onnx", ["n", 3, "height", "width"])
    image = picture(tmp_path / "p.png", 48, 40)
    code, stdout, stderr = heatmap(model, image, "-o", tmp_path / "out.png")
    assert code == 2, stdout + stderr
    assert stderr.splitlines() == [
        f"fcconv: error: {model} does not record its native input size (no fcconv metadata, and input 'input' "
        "fixes no height and width); give --input-shape"
    ]
    assert not (tmp_path / "out.png").exists()
    assert heatmap(model, image, "-o", tmp_path / "out.png", "--input-shape", "3,16,16")[0] == 0
