"""The library does what the command does: ``fcconv.pipeline``'s transactions, their results and progress events."""

import json
import subprocess
import sys

import onnx
import pytest
from conftest import REPO
from typer.testing import CliRunner

from fcconv.check import CheckReport
from fcconv.cli import app
from fcconv.errors import BadInputError
from fcconv.pipeline import (
    Checked,
    Compared,
    HeadRewritten,
    StageAdvanced,
    StageFinished,
    StageStarted,
    check_files,
    convert_file,
    inspect_file,
    verify_file,
)
from fcconv.verify import VerificationReport

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"
SIZES = [(28, 28), (40, 36)]


def stages(events):
    """The stages in the order they started, each checked to finish before the next one starts."""
    order, running = [], None
    for event in events:
        if isinstance(event, StageStarted):
            assert running is None, f"{event.stage} started inside {running}"
            order.append(running := event.stage)
        elif isinstance(event, StageFinished):
            assert event.stage == running
            running = None
        elif isinstance(event, StageAdvanced):
            assert event.stage == running
    assert running is None
    return order


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The sample converted by the library, with the events it reported."""
    folder = tmp_path_factory.mktemp("pipeline")
    events = []
    result = convert_file(SAMPLE, folder / "lenet.onnx", sizes=SIZES, progress=events.append)
    return result, events


def test_convert_file_writes_the_onnx_fcconv_convert_writes(converted, tmp_path):
    result, _ = converted
    assert result.written and result.passed and result.data_file is None
    assert isinstance(result.report, VerificationReport) and result.report.passed
    sizes = ",".join(f"{h}x{w}" for h, w in SIZES)
    by_command = CliRunner().invoke(app, ["convert", str(SAMPLE), "-o", str(tmp_path / "lenet.onnx"), "--sizes", sizes])
    assert by_command.exit_code == 0, by_command.output
    library, command = onnx.load(str(result.target)), onnx.load(str(tmp_path / "lenet.onnx"))
    assert library.SerializeToString() == command.SerializeToString()


def test_convert_file_reports_the_stages_in_order(converted):
    result, events = converted
    expected = ["load", "rewrite", "hash", "export", "references", "release", "compare", "commit"]
    assert stages(events) == expected
    kinds = [type(e).__name__ for e in events if not isinstance(e, (StageStarted, StageAdvanced, StageFinished))]
    assert kinds == ["HeadRewritten", "Compared"]
    rewritten = next(e for e in events if isinstance(e, HeadRewritten))
    assert [layer.name for layer in rewritten.conversion.layers] == ["fc1", "fc2"]
    assert next(e for e in events if isinstance(e, Compared)).report is result.report
    for stage in ("references", "compare"):
        advanced = [e for e in events if isinstance(e, StageAdvanced) and e.stage == stage]
        assert [e.size for e in advanced[:-1]] == SIZES  # each size reported as its run starts
        assert (advanced[-1].done, advanced[-1].size) == (len(SIZES), None)  # then the stage's end


@pytest.mark.parametrize("suffix", [".pt2", ".safetensors"])
def test_convert_file_writes_pytorch_files_verified(tmp_path, suffix):
    events = []
    result = convert_file(SAMPLE, tmp_path / f"lenet{suffix}", sizes=SIZES[:1], progress=events.append)
    assert result.written and result.target.is_file()
    first = ["load", "rewrite", "hash"] + (["export"] if suffix == ".pt2" else [])
    assert stages(events) == [*first, "references", "write", "release", "compare", "commit"]


def test_a_file_that_does_not_match_is_a_result_not_an_error_and_nothing_is_written(tmp_path):
    """The command's exit 1: zero tolerance cannot be met in float32, so the export does not match."""
    result = convert_file(SAMPLE, tmp_path / "lenet.onnx", sizes=SIZES[:1], rtol=0.0, atol=0.0)
    assert not result.written and not result.passed and not result.report.passed
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise_the_errors_the_command_reports_with_exit_2(tmp_path):
    with pytest.raises(BadInputError, match="--pool 'mean' is not avg or max"):
        convert_file(SAMPLE, tmp_path / "lenet.onnx", pool="mean")
    with pytest.raises(BadInputError, match="--sizes"):
        convert_file(SAMPLE, tmp_path / "lenet.onnx", sizes="28xa")
    assert list(tmp_path.iterdir()) == []


def test_verify_file_compares_the_export_with_its_original(converted, tmp_path):
    result, _ = converted
    events = []
    verified = verify_file(result.target, SAMPLE, sizes=SIZES, json_report=tmp_path / "r.json", progress=events.append)
    assert verified.passed and verified.mismatch is None and verified.report.passed
    assert stages(events) == ["load", "references", "release", "compare"]
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


def test_check_files_returns_one_report_per_file(converted):
    result, _ = converted
    events = []
    reports = check_files([result.target, result.target], sizes=SIZES, progress=events.append)
    assert [type(r) for r in reports] == [CheckReport, CheckReport] and all(r.passed for r in reports)
    assert stages(events) == ["check", "check"]
    assert [e.report for e in events if isinstance(e, Checked)] == reports


def test_inspect_file_returns_the_head_a_conversion_would_rewrite():
    result = inspect_file(SAMPLE, until="fc1")
    assert not result.onnx and [layer.name for layer in result.conversion.layers] == ["fc1"]


def test_the_command_line_and_the_pipeline_import_no_torch():
    code = "import sys, fcconv.cli, fcconv.pipeline; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    shown = subprocess.run([sys.executable, "-m", "fcconv", "--help"], capture_output=True, text=True, check=True)
    assert "convert" in shown.stdout
