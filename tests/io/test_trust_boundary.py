"""The trust boundary: no file runs code, exhausts memory or blocks fcconv, unless the user says it may.

Each test is an attack that once worked, run as an attacker would: a file crafted to run a
payload (``os.system("touch MARKER")``), to inflate past memory or to hang the reader. The
contract is the same every time: exit 2, one line on stderr naming the file and why, the
payload never run, nothing written and the input unchanged. ``--trust`` lets a trusted
file's code run; nothing lets an untrusted one's.

A pin on torch's own behaviour: the members of a ``.pt2`` that fcconv test-loads are the ones
``torch.export.load`` unpickles, checked by recording what the installed torch unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_cli import Hostile  # a pickle that runs ``touch MARKER`` when it is loaded

from fcconv.errors import BadInputError

FCCONV = [sys.executable, "-m", "fcconv"]
SAMPLE = REPO / "sample_models"
DIGITS = SAMPLE / "digits_lenet.pt"


def run(*args, cwd=None, timeout=300):
    return subprocess.run([*FCCONV, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_refused(result, *expected):
    """Exit 2, one line on stderr, no traceback, naming each of ``expected``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --- 1. a .pt2 never runs code without --trust --------------------------------------------------------


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The digits sample as an ExportedProgram of the original, and as fcconv's own .pt2 export of it."""
    from fcconv.samples import DigitsLeNet

    folder = tmp_path_factory.mktemp("programs")
    model = DigitsLeNet().eval()
    model.load_state_dict(torch.load(DIGITS, weights_only=True))
    original = folder / "original.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 28, 28),)), original)
    result = run("convert", DIGITS, "-o", folder / "export.pt2", "-q")
    assert result.returncode == 0, result.stderr
    return {"original": original, "export": folder / "export.pt2"}


def _members(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    return next(iter(members)).split("/", 1)[0], members


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def craft(program: Path, target: Path, case: str, payload: object) -> Path:
    """A copy of ``program`` in which the member ``case`` names holds ``payload`` where torch.export.load reads it."""
    root, members = _members(program)
    weights_config = f"{root}/data/weights/model_weights_config.json"
    constants_config = f"{root}/data/constants/model_constants_config.json"
    if case == "sample inputs, pickle protocol 0":  # starts with neither pickle's nor zip's magic bytes
        members[f"{root}/data/sample_inputs/model.pt"] = pickle.dumps(payload, protocol=0)
    elif case == "weight marked use_pickle":
        config = json.loads(members[weights_config])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        members[weights_config] = json.dumps(config).encode()
        members[f"{root}/data/weights/{entry['path_name']}"] = torch_saved(payload)
    elif case in ("constant marked use_pickle", "opaque object constant"):
        config = json.loads(members[constants_config])
        name = "tensor_payload" if case.startswith("constant") else "opaque_obj_payload"
        config.setdefault("config", {})["payload"] = {
            "path_name": name,
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        members[constants_config] = json.dumps(config).encode()
        data = torch_saved(payload) if case.startswith("constant") else pickle.dumps(payload)
        members[f"{root}/data/constants/{name}"] = data
    elif case == "legacy weights file":
        members[f"{root}/data/weights/model.pt"] = torch_saved(payload)
    elif case == "old-format example inputs":  # read by torch's fallback when the current format has no program
        from torch._export.serde.schema import SCHEMA_VERSION
        from torch._export.serde.serialize import serialize

        members = {k: v for k, v in members.items() if "/models/" not in k and "/extra/" not in k}
        members["version"] = ".".join(map(str, SCHEMA_VERSION)).encode()
        members["serialized_exported_program.json"] = serialize(torch.export.load(program)).exported_program
        for name in ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt"):
            members[name] = torch_saved(payload)
    else:
        raise AssertionError(case)
    return _write(target, members)


PAYLOAD_CASES = [
    "sample inputs, pickle protocol 0",
    "weight marked use_pickle",
    "constant marked use_pickle",
    "opaque object constant",
    "legacy weights file",
    "old-format example inputs",
]


def _torch_export_load_runs(path: Path, marker: Path) -> bool:
    """Whether torch.export.load alone runs the payload of ``path`` (so the case is a real attack)."""
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - a crafted archive may fail after the payload has run
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


@pytest.mark.parametrize("case", PAYLOAD_CASES)
def test_a_pt2_payload_never_runs_through_any_command(case, programs, tmp_path):
    marker = tmp_path / "pwned"
    original = craft(programs["original"], tmp_path / "original.pt2", case, Hostile(marker))
    export = craft(programs["export"], tmp_path / "export.pt2", case, Hostile(marker))
    assert _torch_export_load_runs(original, marker), "the crafted archive is not an attack on this torch"
    before = snapshot(tmp_path)
    for args in (
        ["inspect", original],
        ["convert", original, "-o", tmp_path / "out.onnx"],
        ["verify", export, "--reference", DIGITS],
        ["check", export],
    ):
        result = run(*args)
        assert_refused(result, str(args[1]))
        assert "--trust" in result.stderr or "not a readable" in result.stderr or "not a loadable" in result.stderr
        assert not marker.exists(), (args, result.stderr)
        assert snapshot(tmp_path) == before


def _record_unpickled(path: Path, monkeypatch) -> list[bytes]:
    """Every byte string the installed torch.export.load unpickles when it reads ``path``.

    Only the outermost calls count: unpickling one member may unpickle data nested in it.
    """
    seen: list[bytes] = []
    depth = [0]

    def recording(function):
        def wrapper(source, *args, **kwargs):
            if depth[0] == 0:
                seen.append(source.getvalue() if isinstance(source, io.BytesIO) else bytes(source))
            depth[0] += 1
            try:
                return function(source, *args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", recording(torch.load))
        patch.setattr(pickle, "loads", recording(pickle.loads))
        patch.setattr(torch._C, "_pickle_load_obj", recording(torch._C._pickle_load_obj))
        try:
            torch.export.load(path)
        except Exception:  # noqa: BLE001 - a crafted archive may fail after its members were read
            pass
    return seen


@pytest.mark.parametrize("case", ["as saved", *PAYLOAD_CASES])
def test_the_scan_covers_every_member_torch_export_load_unpickles(case, programs, tmp_path, monkeypatch):
    """Fails when a new torch starts unpickling a member of a .pt2 that fcconv does not test-load first."""
    from fcconv.archive import members_torch_export_unpickles

    benign = torch.arange(3.0)
    path = programs["export"] if case == "as saved" else craft(programs["export"], tmp_path / "p.pt2", case, benign)
    unpickled = _record_unpickled(path, monkeypatch)
    assert unpickled, "torch.export.load unpickled nothing: the recording no longer sees how it reads"
    try:
        covered = members_torch_export_unpickles(path)
    except BadInputError:
        return  # the scan refuses the whole archive (opaque objects are never plain tensors)
    _, members = _members(path)
    by_name = {name.split("/", 1)[-1]: data for name, data in members.items()} | members
    covered_bytes = [by_name[name] for name, _ in covered if name in by_name]
    for data in unpickled:
        assert data in covered_bytes, f"torch unpickled {len(data)} bytes the scan does not check"


def test_a_pt2_whose_pickled_weight_is_a_plain_parameter_is_read_without_trust(programs, tmp_path):
    """The scan refuses what is not plain data, not every pickle: torch pickles some weights itself."""
    from fcconv.archive import members_torch_export_unpickles

    weight = torch.nn.Parameter(torch.load(DIGITS, weights_only=True)["conv1.weight"])
    path = craft(programs["original"], tmp_path / "pickled.pt2", "weight marked use_pickle", weight)
    assert [what for _, what in members_torch_export_unpickles(path)] == ["sample inputs", "weight conv1.weight"]
    result = run("inspect", path)
    assert result.returncode == 0, result.stderr


# --- 2. a model card names code only when trusted -----------------------------------------------------


PAYLOAD_MODULE = """
import pathlib
pathlib.Path({marker!r}).touch()

def build():
    from fcconv.samples import DigitsLeNet
    return DigitsLeNet()
"""


def _card_folder(folder: Path, arch: str, marker: Path | None = None, module: str = "payload") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIGITS, folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"arch": arch, "input_shape": [1, 28, 28]}))
    if marker is not None:
        (folder / f"{module}.py").write_text(PAYLOAD_MODULE.format(marker=str(marker)))
    return folder


def test_a_card_naming_code_beside_the_checkpoint_is_refused_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    folder = _card_folder(tmp_path / "download", "payload:build", marker)
    before = snapshot(folder)
    for command in ("inspect", "convert"):
        assert_refused(run(command, folder / "model.pt"), "model.json", str(folder / "payload.py"), "--trust")
        assert not marker.exists()
    assert snapshot(folder) == before
    trusted = run("convert", folder / "model.pt", "--trust", "-q")
    assert trusted.returncode == 0 and marker.exists(), trusted.stderr


def test_a_card_naming_code_in_the_working_directory_is_refused_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    folder = _card_folder(tmp_path / "download", "helpers:build")
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "helpers.py").write_text(PAYLOAD_MODULE.format(marker=str(marker)))
    assert_refused(run("inspect", folder / "model.pt", cwd=cwd), str(cwd / "helpers.py"))
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["fcconv.samples:DigitsLeNet", "torchvision.models:resnet18"])
def test_a_card_may_name_installed_architectures(arch, tmp_path):
    folder = _card_folder(tmp_path, arch)
    if arch.startswith("torchvision"):
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), folder / "model.pt")
        (folder / "model.json").write_text(json.dumps({"arch": arch, "input_shape": [3, 224, 224]}))
    result = run("inspect", folder / "model.pt")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("arch", ["builtins:input", "os:fork", "sys:exit", "torchvision.ops:nms"])
def test_a_card_naming_any_other_installed_callable_is_refused_without_trust(arch, tmp_path):
    """Installed code is not harmless when a card chooses what to call: input() blocks, fork() doubles the run."""
    folder = _card_folder(tmp_path, arch)
    assert_refused(run("convert", folder / "model.pt"), arch, "not a torchvision or timm architecture", "--trust")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]


@pytest.mark.parametrize("where", ["--arch", "trusted card"])
@pytest.mark.parametrize("callable_", ["sys:exit", "builtins:quit", "os:abort"])
def test_a_callable_that_ends_the_process_never_exits_0_without_output(where, callable_, tmp_path):
    folder = _card_folder(tmp_path, callable_ if where == "trusted card" else "fcconv.samples:DigitsLeNet")
    extra = ["--arch", callable_] if where == "--arch" else ["--trust"]
    result = run("convert", folder / "model.pt", *extra)
    assert result.returncode != 0, result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]
    if callable_ != "os:abort":  # abort kills the process with SIGABRT: no line, but never exit 0
        assert_refused(result, callable_, "end the process")


def test_a_forward_that_calls_sys_exit_is_stopped_instead_of_exiting_0(tmp_path):
    (tmp_path / "quitter.py").write_text(
        "import sys\nfrom fcconv.samples import DigitsLeNet\n\n"
        "class Quitter(DigitsLeNet):\n    def forward(self, x):\n        sys.exit(0)\n"
    )
    shutil.copy(DIGITS, tmp_path / "model.pt")
    result = run("convert", "model.pt", "--arch", "quitter:Quitter", "--input-shape", "1,28,28", cwd=tmp_path)
    assert_refused(result, "end the process", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "quitter.py"]


# --- 3. zip bombs ---------------------------------------------------------------------------------------

BOMB_SIZE = 2 << 30  # inflates to 2 GiB from about 2 MB


def _zeros_deflated(size: int) -> tuple[bytes, int]:
    """Raw deflate data of ``size`` zero bytes, and their CRC-32, without inflating them here."""
    chunk_size = 1 << 24
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = compressor.compress(bytes(chunk_size)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(chunk_size)
    for _ in range(size // chunk_size):
        crc = zlib.crc32(zeros, crc)
    return chunk * (size // chunk_size) + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


@pytest.fixture(scope="module")
def zeros_deflated():
    return _zeros_deflated(BOMB_SIZE)


MEASURED = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, result.returncode)
sys.stderr.write(result.stderr)
"""


def run_measured(*args) -> tuple[subprocess.CompletedProcess, int]:
    """Run fcconv in a process of its own and return its result and its peak resident memory in bytes."""
    probe = subprocess.run(
        [sys.executable, "-c", MEASURED, *FCCONV, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    peak_kb, returncode = map(int, probe.stdout.split())
    return subprocess.CompletedProcess(args, returncode, "", probe.stderr), peak_kb << 10


def with_bomb(source: Path, target: Path, member: str, deflated: tuple[bytes, int], size: int = BOMB_SIZE) -> Path:
    """A copy of the zip ``source`` whose ``member`` (replaced, or added) inflates to ``size`` zero bytes."""
    import struct

    data, crc = deflated
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist() if info.filename != member}
    members[member] = data  # written stored, then its headers say deflated
    _write(target, members)
    raw = bytearray(target.read_bytes())
    local = zipfile.ZipFile(target).getinfo(member).header_offset
    central = raw.rindex(member.encode()) - 46  # its central directory entry: the name follows 46 bytes of header
    assert raw[central : central + 4] == b"PK\x01\x02"
    struct.pack_into("<H", raw, local + 8, zipfile.ZIP_DEFLATED)
    struct.pack_into("<III", raw, local + 14, crc, len(data), size)
    struct.pack_into("<H", raw, central + 10, zipfile.ZIP_DEFLATED)
    struct.pack_into("<III", raw, central + 16, crc, len(data), size)
    target.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize(
    "case",
    ["checkpoint sniffed for archive_format", "checkpoint whose data.pkl inflates", "pt2 member", "pt2 metadata"],
)
def test_a_zip_bomb_is_refused_within_an_idle_run_s_memory(case, programs, zeros_deflated, tmp_path):
    if case.startswith("checkpoint"):
        member = "digits_lenet/archive_format" if "archive_format" in case else "digits_lenet/data.pkl"
        bomb = with_bomb(DIGITS, tmp_path / "bomb.pt", member, zeros_deflated)
        shutil.copy(SAMPLE / "digits_lenet.json", tmp_path / "bomb.json")
        args = ["inspect", bomb]
    else:
        root, _ = _members(programs["export"])
        member = f"{root}/extra/fcconv_metadata.json" if "metadata" in case else f"{root}/data/sample_inputs/model.pt"
        bomb = with_bomb(programs["export"], tmp_path / "bomb.pt2", member, zeros_deflated)
        args = ["check", bomb] if "metadata" in case else ["inspect", bomb]
    assert bomb.stat().st_size < 4 << 20
    before = snapshot(tmp_path)
    result, peak = run_measured(*args)
    _, idle = run_measured("inspect", DIGITS)
    assert_refused(result, str(bomb))
    assert peak < idle + (150 << 20), (peak >> 20, idle >> 20)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["checkpoint", "pt2"])
def test_trust_never_lifts_the_size_bounds(kind, programs, zeros_deflated, tmp_path):
    if kind == "checkpoint":
        bomb = with_bomb(DIGITS, tmp_path / "bomb.pt", "digits_lenet/data.pkl", zeros_deflated)
    else:
        root, _ = _members(programs["original"])
        member = f"{root}/data/sample_inputs/model.pt"
        bomb = with_bomb(programs["original"], tmp_path / "bomb.pt2", member, zeros_deflated)
    assert_refused(run("inspect", bomb, "--trust", "--arch", "fcconv.samples:DigitsLeNet"), str(bomb), "zip bomb")


def test_a_model_card_too_large_to_be_one_is_refused_unread(tmp_path):
    shutil.copy(DIGITS, tmp_path / "model.pt")
    with open(tmp_path / "model.json", "wb") as card:
        card.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    result, peak = run_measured("inspect", tmp_path / "model.pt")
    _, idle = run_measured("inspect", DIGITS)
    assert_refused(result, "model.json", "is not a model card")
    assert peak < idle + (150 << 20), (peak >> 20, idle >> 20)


# --- 6. special files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{pipe}.pt"],
        ["convert", "{pipe}.onnx"],
        ["verify", "{pipe}.onnx", "--reference", DIGITS],
        ["check", "{pipe}.onnx"],
        ["heatmap", DIGITS, "{pipe}.png"],
    ],
    ids=["inspect", "convert", "verify", "check", "heatmap-image"],
)
def test_a_named_pipe_is_refused_at_once(args, tmp_path):
    given = [str(a).replace("{pipe}", str(tmp_path / "pipe")) for a in args]
    pipe = Path(next(a for a in given if str(tmp_path) in a))
    os.mkfifo(pipe)
    result = run(*given, timeout=120)  # a read of the pipe would block until then
    assert_refused(result, str(pipe), "named pipe")
