"""A run stopped by SIGTERM or SIGHUP leaves nothing behind, and what a killed run left staged the next run removes."""

import fcntl
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from fcconv.export import external_data_path
from fcconv.staging import Terminated, staged_onnx, staged_path, staged_paths, terminations_raised

SAMPLE = REPO / "sample_models" / "digits_lenet.pt"


# Verified at a large size too, so that the run stays staged for seconds (not the split second of the sample's
# native size alone) and the signal lands while it is, however slowly this machine runs the test.
SLOW_SIZES = ["--sizes", "28x28,2500x2500"]


def hangup_as_a_terminal_has_it():
    """SIGHUP at its default action in the run, as a shell's foreground job has it, also where the suite itself
    was started with SIGHUP ignored (under nohup): the run would inherit that, and keep it ignored by design."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_convert(out):
    command = [sys.executable, "-m", "fcconv", "convert", str(SAMPLE), "-o", str(out), "-q", *SLOW_SIZES]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=hangup_as_a_terminal_has_it
    )


def wait_for_staging(folder, process, timeout=120.0):
    """What the run stages beside its output, once it appears: the run is then in the middle of writing it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = [p for p in folder.iterdir() if p.name.startswith(".")]
        if staged:
            return staged
        assert process.poll() is None, f"the run ended before it staged anything: {process.communicate()}"
        time.sleep(0.005)
    process.kill()
    pytest.fail("the run staged nothing in time")


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [(signal.SIGTERM, 143, "digits.onnx"), (signal.SIGHUP, 129, "digits.pt2")],
    ids=["SIGTERM", "SIGHUP"],
)
def test_a_conversion_stopped_by_sigterm_or_sighup_exits_128_plus_the_signal_and_leaves_nothing(
    tmp_path, signum, code, name
):
    process = start_convert(tmp_path / name)
    wait_for_staging(tmp_path, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.strip() == f"fcconv: stopped by {signal.Signals(signum).name}"
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_run_left_staged_is_removed_by_the_next_run_into_the_folder(tmp_path):
    killed = start_convert(tmp_path / "first.onnx")
    left = wait_for_staging(tmp_path, killed)
    killed.kill()  # SIGKILL cannot be handled: its staging stays
    killed.communicate(timeout=60)
    assert all(p.exists() for p in left)
    result = subprocess.run(
        [sys.executable, "-m", "fcconv", "convert", SAMPLE, "-o", tmp_path / "second.onnx", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second.onnx"]


def test_only_the_staging_of_processes_that_are_gone_and_hold_no_lock_on_it_is_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # its process id now names no process
    abandoned_folder = tmp_path / f".a.onnx.fcconv-{gone.pid}-k2j4h5g1.staging"
    abandoned_folder.mkdir()
    (abandoned_folder / "a.onnx").write_bytes(b"complete but never verified")
    abandoned_file = tmp_path / f".b.png.fcconv-{gone.pid}-abcdefgh.staging"
    abandoned_file.write_bytes(b"half a picture")
    live = tmp_path / f".c.onnx.fcconv-{os.getpid()}-qwertyui.staging"  # this process's own
    live.mkdir()
    # the process named is gone, but the lock is held: a process in another PID namespace sharing the folder
    locked = tmp_path / f".d.onnx.fcconv-{gone.pid}-zxcvbnm0.staging"
    locked.write_bytes(b"")
    others = [tmp_path / ".e.onnx.abcdefgh.tmp", tmp_path / "f.staging", tmp_path / f".g.fcconv-{gone.pid}-x.stage"]
    for other in others:
        other.write_bytes(b"not fcconv's staging")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_bytes(b"")
    link = tmp_path / f".h.onnx.fcconv-{gone.pid}-symlink0.staging"
    link.symlink_to(outside)

    with open(locked, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with staged_path(tmp_path / "out.txt") as staged:
            staged.write_text("written")

    assert not abandoned_folder.exists() and not abandoned_file.exists()
    assert live.is_dir() and locked.is_file() and all(other.is_file() for other in others)
    assert link.is_symlink() and (outside / "kept").is_file()
    assert (tmp_path / "out.txt").read_text() == "written"


class Stopped(Exception):
    """What the SIGTERM handler of these tests raises."""


@pytest.fixture
def sigterm_after_each_rename_into(monkeypatch):
    """SIGTERM raises :class:`Stopped`, and each file renamed into the folder given is followed by a SIGTERM."""

    def stop(signum, frame):
        raise Stopped

    def arm(folder):
        rename = os.replace

        def rename_then_signal(source, target):
            rename(source, target)
            if os.path.dirname(target) == str(folder):
                signal.raise_signal(signal.SIGTERM)  # handled between two renames, unless held back

        monkeypatch.setattr(os, "replace", rename_then_signal)

    previous = signal.signal(signal.SIGTERM, stop)
    yield arm
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_while_an_export_and_its_data_are_moved_into_place_waits_until_both_are(
    tmp_path, sigterm_after_each_rename_into
):
    with pytest.raises(Stopped), staged_onnx(tmp_path / "model.onnx") as staged:
        staged.write_bytes(b"graph")
        external_data_path(staged).write_bytes(b"weights")
        sigterm_after_each_rename_into(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_signal_while_heatmap_moves_its_png_and_npy_into_place_waits_until_both_are(
    tmp_path, sigterm_after_each_rename_into
):
    from typer.testing import CliRunner

    from fcconv.cli import app

    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8), mode="L").save(picture)
    out = tmp_path / "out"
    out.mkdir()
    sigterm_after_each_rename_into(out)
    args = ["heatmap", SAMPLE, picture, "-o", out / "heat.png", "--save-map", out / "map.npy", "-q"]
    CliRunner().invoke(app, [str(a) for a in args])
    assert sorted(p.name for p in out.iterdir()) == ["heat.png", "map.npy"]


@pytest.mark.parametrize("made_by", ["mkdtemp", "mkstemp"], ids=["staged folder", "staged file"])
def test_a_signal_that_arrives_just_as_the_staging_is_made_still_leaves_nothing(tmp_path, monkeypatch, made_by):
    # the staging exists from the moment the folder or file is made; a signal right then, before anything has
    # recorded it for removal, is the narrowest window a run has (a loaded machine hit it in the test above)
    import tempfile

    make = getattr(tempfile, made_by)

    def made_then_signalled(*args, **kwargs):
        made = make(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return made

    monkeypatch.setattr(tempfile, made_by, made_then_signalled)
    staging = staged_onnx(tmp_path / "a.onnx") if made_by == "mkdtemp" else staged_paths(tmp_path / "a.png")
    with pytest.raises(Terminated), terminations_raised(), staging:
        pytest.fail("the block ran although the signal came before it")
    assert list(tmp_path.iterdir()) == []


class SignalledWhenCollected:
    """An object whose finaliser receives the signal, as torch's storage finaliser did in a stopped conversion."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # its handler's Terminated is dropped: Python ignores a finaliser's errors


def test_a_signal_whose_exception_a_finaliser_dropped_still_stops_the_run_before_anything_is_moved_into_place(
    tmp_path, capsys
):
    with pytest.raises(Terminated), terminations_raised(), staged_path(tmp_path / "out.txt") as staged:
        SignalledWhenCollected()  # collected at once: the signal arrives inside __del__
        staged.write_text("written after the signal")  # the run goes on, but must not commit
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""  # the dropped copy is not printed: the stop is reported once, by the CLI
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_block_that_ends_after_a_dropped_signal_raises_it_at_its_end(tmp_path):
    finished = False
    with pytest.raises(Terminated) as raised, terminations_raised():
        SignalledWhenCollected()
        finished = True
    assert finished and raised.value.signum == signal.SIGTERM
