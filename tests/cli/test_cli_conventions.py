"""The command line follows its ecosystem's conventions: -h, completion, readable help, fast --version, and
errors that name what the user typed and what the model takes."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import typer
from conftest import REPO, TESTS, seeded
from custom_models import LeNet
from typer.testing import CliRunner

from fcconv.cli import app, run

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"  # a LeNet whose model card says 1,28,28
COMMANDS = [[], ["convert"], ["verify"], ["check"], ["inspect"], ["heatmap"]]
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def fcconv(*args, cwd=None):
    """The command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fcconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def help_text(*command):
    """The help of ``command``, its panels' borders dropped and its lines joined, so that wrapping does not matter."""
    result = CliRunner().invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fcconv")
def test_minus_h_is_help_for_the_app_and_every_command(command):
    result = CliRunner().invoke(app, [*command, "-h"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert " ".join(help_text(*command).split()) == " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fcconv")
def test_help_shows_metavars_no_type_placeholders_and_no_literal_backticks(command):
    text = help_text(*command)
    for placeholder in ("<bool>", "<str>", "<float>", "<int>", "<list[str]>"):
        assert placeholder not in text, placeholder  # a flag takes no value; an option says what to type
    assert "``" not in text


def test_a_docstring_is_one_paragraph_per_paragraph_not_its_source_lines():
    result = CliRunner().invoke(app, ["convert", "--help"], env=WIDE)
    # the source wraps this sentence at "mismatch"; the help re-flows it to the terminal's width
    assert "on a mismatch nothing is written" in result.output


def test_options_whose_default_is_decided_at_run_time_show_it():
    text = help_text("convert")
    for default in ("3,224,224", "1e-4 in float32", "native, 1.25-1.5×, 2×", "NAME.fcn.onnx beside MODEL", "cpu"):
        assert re.search(rf"\[default: [^\]]*{re.escape(default)}", text), default
    assert re.search(r"\[default: [^\]]*3\)?\]", help_text("heatmap"))  # --top


def test_convert_groups_its_options_in_panels():
    result = CliRunner().invoke(app, ["convert", "--help"], env=WIDE)
    panels = {}
    for chunk in result.output.split("╭─ ")[1:]:
        title, _, body = chunk.partition(" ─")
        panels[title] = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", body))
    assert {"--output", "-o", "--head-format", "--external-data"} <= panels["Output"]
    assert {"--arch", "--input-shape", "--dtype", "--trust"} <= panels["Loading and trust"]
    assert {"--dense", "--pool", "--pointwise", "--logits", "--until"} <= panels["Head"]
    assert {"--sizes", "--rtol", "--atol", "--device"} <= panels["Verification"]


def test_shell_completion_is_offered_and_completes_commands_and_options():
    text = help_text()
    assert "--install-completion" in text and "--show-completion" in text
    for words, expected in (("fcconv con", "convert"), ("fcconv convert --inp", "--input-shape")):
        env = {**os.environ, "_FCCONV_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": "1"}
        env["COMP_CWORD"] = str(len(words.split()) - 1)
        completed = subprocess.run([sys.executable, "-m", "fcconv"], capture_output=True, text=True, env=env)
        assert completed.returncode == 0 and completed.stdout.split() == [expected], completed


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], ["convert", "--help"]])
def test_version_and_help_import_neither_torch_nor_onnxruntime(args):
    script = (
        "import json, sys\n"
        f"sys.argv = ['fcconv', *{args!r}]\n"
        "from fcconv.cli import run\n"
        "try:\n    run()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(json.dumps([code, [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    code, heavy = json.loads(done.stderr.strip().splitlines()[-1])
    assert code in (0, None) and heavy == [], done.stderr
    assert "fcconv" in done.stdout


def test_a_command_line_error_is_one_line_also_where_typer_has_no_typer_exception(monkeypatch, capsys):
    """typer added TyperException late: a usage error under an older typer must not end in AttributeError."""
    monkeypatch.delattr(typer, "TyperException", raising=False)
    monkeypatch.setattr(sys, "argv", ["fcconv", "convert", "--no-such-option"])
    with pytest.raises(SystemExit) as ended:
        run()
    assert ended.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--no-such-option" in lines[0]


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    """A 1-channel LeNet's state_dict with no model card: what it takes is told by its layers alone."""
    path = tmp_path_factory.mktemp("lenet") / "lenet.pt"
    torch.save(seeded(LeNet).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def onnx_classifier(tmp_path_factory):
    """A classifier exported to ONNX for N×3×16×16."""
    from test_onnx_input import SmallNet, export

    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export(seeded(SmallNet), path, False)
    return path


@pytest.fixture(scope="module")
def lenet_program(tmp_path_factory):
    """The LeNet as an ExportedProgram of a 1×1×28×28 input."""
    path = tmp_path_factory.mktemp("program") / "lenet.pt2"
    torch.export.save(torch.export.export(seeded(LeNet), (torch.zeros(1, 1, 28, 28),)), path)
    return path


LENET = ["--arch", "custom_models:LeNet"]
WRONG_SHAPES = {  # case: (model, extra arguments, --input-shape, what the one line says)
    "channels, from the first layer": ("lenet", LENET, "3,32,32", "first layer, conv1 (Conv2d), takes 1 channel, so it takes 1×H×W"),
    "no channel axis, from the first layer": (
        "lenet", LENET, "28,28", "first layer, conv1 (Conv2d), takes 1 channel and 2 spatial axes, so it takes 1×H×W"),
    "size, from the layer that refuses it": ("lenet", LENET, "1,20,20", "fc1 (Linear) takes 800 features and gets 200"),
    "channels, from the model card": ("sample", [], "3,32,32", "it takes 1×28×28 (the input_shape of digits_lenet.json)"),
    "no channel axis, from the model card": ("sample", [], "28,28", "it takes 1×28×28 (the input_shape of digits_lenet.json)"),
    "size, from the model card": ("sample", [], "1,20,20", "it takes 1×28×28 (the input_shape of digits_lenet.json)"),
    "channels, from the program's input": ("program", [], "3,28,28", "it takes 1×28×28 (the input it was exported with)"),
    "channels, from the ONNX input": ("onnx", [], "1,16,16", "which is N×3×16×16"),
}  # fmt: skip


@pytest.mark.parametrize("case", WRONG_SHAPES)
def test_a_wrong_input_shape_names_the_shape_the_model_takes_and_the_one_given(
    case, lenet_checkpoint, lenet_program, onnx_classifier, tmp_path, monkeypatch
):
    kind, args, shape, expected = WRONG_SHAPES[case]
    model = {"lenet": lenet_checkpoint, "sample": SAMPLE, "program": lenet_program, "onnx": onnx_classifier}[kind]
    before = digest(model)
    monkeypatch.chdir(TESTS)  # where --arch custom_models:LeNet is imported from
    result = CliRunner().invoke(
        app, ["convert", str(model), *args, "--input-shape", shape, "-o", str(tmp_path / "o.onnx")]
    )
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--input-shape {shape}" in lines[0] and expected in lines[0], lines
    assert not any(internal in lines[0] for internal in ("weight of size", "reduction dim", "expected input"))
    assert list(tmp_path.iterdir()) == [] and digest(model) == before


def test_a_wrong_input_shape_puts_one_line_on_stderr_and_no_traceback(tmp_path):
    """Torch's fake tensors log a traceback where an operator refuses the shape (here fc1's matmul)."""
    result = fcconv("convert", SAMPLE, "--input-shape", "1,20,20", "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fcconv: error: the model cannot take an input of shape 1×20×20 (--input-shape 1,20,20): it takes 1×28×28 "
        "(the input_shape of digits_lenet.json)"
    ]


def test_inspect_verify_and_heatmap_name_the_shape_the_model_takes_too(monkeypatch, tmp_path):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("L", (40, 36), 128).save("picture.png")
    runner = CliRunner()
    assert runner.invoke(app, ["convert", str(SAMPLE), "-o", "lenet.onnx", "-q", "--sizes", "28x28"]).exit_code == 0
    commands = {
        "inspect": ["inspect", str(SAMPLE), "--input-shape", "3,28,28"],
        "verify": ["verify", "lenet.onnx", "--reference", str(SAMPLE), "--input-shape", "1,20,20"],
        "heatmap": ["heatmap", str(SAMPLE), "picture.png", "--input-shape", "28,28"],
    }
    for command, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (command, result.stderr)
        shape = args[args.index("--input-shape") + 1]
        assert result.stderr.strip().splitlines() == [
            f"fcconv: error: the model cannot take an input of shape {shape.replace(',', '×')} (--input-shape {shape}): "
            "it takes 1×28×28 (the input_shape of digits_lenet.json)"
        ], command
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lenet.onnx", "picture.png"]


@pytest.mark.parametrize("name", ["out.txt", "out", "out.onnx.bak"])
def test_an_output_whose_suffix_names_no_format_is_refused_before_any_work(name, tmp_path):
    model = tmp_path / "digits.pt"
    model.write_bytes(SAMPLE.read_bytes())
    (tmp_path / "digits.json").write_bytes(SAMPLE.with_suffix(".json").read_bytes())
    before = {path.name: digest(path) for path in tmp_path.iterdir()}
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(tmp_path / name)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"-o {tmp_path / name}" in lines[0] and ".onnx, .pt2, .safetensors" in lines[0]
    assert result.stdout == ""  # refused before the model was read
    assert {path.name: digest(path) for path in tmp_path.iterdir()} == before
