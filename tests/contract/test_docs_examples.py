"""Every command and snippet in README.md and docs/*.md runs as written, from a copy of the repository root.

The fenced blocks are read from the markdown. ```bash and ```sh blocks run whole in ``bash -e``; ```console
blocks run their ``$`` lines one at a time; ```python blocks each run in a fresh interpreter (``python -c``, so
the working directory is importable, as in an interactive session). ```text, ```json, ```xml and ```yaml blocks
are output or files and do not run, so a transcript (a ``$`` line) may not sit in a ```text block.

A block does not run only where the markdown says so, on the line before it, with the reason:
``<!-- example: not run — it installs the package -->``. ``<!-- example: exits N -->`` before a console block
says that its last command fails with exit code N, as the page says; every other command must exit 0.

Each document runs in a fresh temporary folder that holds copies of sample_models/, examples/, docs/ and tests/
(what the examples read from the repository root), its blocks in the page's order: a later block may read
what an earlier one wrote, as a reader following the page has it, but no page relies on another. The work tree
is never written to, and the folder is removed afterwards. ``python``, ``python3`` and ``fcconv`` are this
interpreter and this checkout's fcconv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COPIED = ("sample_models", "examples", "docs", "tests")
RUNNABLE = {"bash", "sh", "console", "python"}
NOT_RUN = {"text", "json", "xml", "yaml"}  # output shown, or a file's contents
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
NOT_RUN_MARK = re.compile(r"^not run\s*[—–:-]+\s*(.*)$")
EXITS_MARK = re.compile(r"^exits (\d+)$")
TIMEOUT = 900  # seconds for one command: a hang fails the test instead of stopping the suite


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, counted from 1
    language: str
    body: str
    mark: str | None  # what the <!-- example: ... --> line before the block says

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def skipped(self) -> bool:
        return self.mark is not None and self.mark.startswith("not run")


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one markdown file, each with its mark, and the marks that precede no block."""
    lines = path.read_text().splitlines()
    name = str(path.relative_to(REPO))
    blocks, stray, index, last_mark = [], [], 0, None
    while index < len(lines):
        line = lines[index].strip()
        mark = MARK.match(line)
        fence = FENCE.match(lines[index])
        if mark:
            if last_mark is not None:
                stray.append(f"{name}:{last_mark[0] + 1}")
            last_mark = (index, mark.group(1))
        elif fence:
            start, body = index, []
            index += 1
            while index < len(lines) and lines[index].rstrip() != "```":
                body.append(lines[index])
                index += 1
            blocks.append(Block(name, start + 1, fence.group(1), "\n".join(body), last_mark and last_mark[1]))
            last_mark = None
        elif line and last_mark is not None:
            stray.append(f"{name}:{last_mark[0] + 1}")
            last_mark = None
        index += 1
    if last_mark is not None:
        stray.append(f"{name}:{last_mark[0] + 1}")
    return blocks, stray


def console_commands(body: str) -> list[str]:
    """The ``$`` lines of a console block (a line ending in a backslash goes on), without the prompt."""
    commands, current = [], None
    for line in body.splitlines():
        if current is not None:
            current += "\n" + line
        elif line.startswith("$ "):
            current = line[2:]
        if current is not None and not current.endswith("\\"):
            commands.append(current)
            current = None
    return commands


ALL_BLOCKS = {path.name: read_blocks(path) for path in DOCUMENTS}
TO_RUN = [
    name for name, (blocks, _) in ALL_BLOCKS.items() if any(b.language in RUNNABLE and not b.skipped for b in blocks)
]


def test_each_mark_names_a_block_and_a_reason_and_no_transcript_hides_from_the_run():
    problems = []
    for blocks, stray in ALL_BLOCKS.values():
        problems += [f"{where}: an example mark with no fenced block after it" for where in stray]
        for block in blocks:
            if block.language not in RUNNABLE | NOT_RUN:
                problems.append(
                    f"{block.where}: a fence of language {block.language!r}; name one of {sorted(RUNNABLE | NOT_RUN)}"
                )
            if block.language in NOT_RUN and any(line.startswith("$ ") for line in block.body.splitlines()):
                problems.append(f"{block.where}: a ```{block.language} block holds a command; make it ```console")
            if block.language == "console" and not console_commands(block.body):
                problems.append(f"{block.where}: a ```console block with no $ command")
            if block.mark is None:
                continue
            if block.language not in RUNNABLE:
                problems.append(f"{block.where}: an example mark on a ```{block.language} block, which never runs")
            elif block.skipped:
                reason = NOT_RUN_MARK.match(block.mark)
                if reason is None or len(reason.group(1).split()) < 2:
                    problems.append(f"{block.where}: 'not run' needs its reason: <!-- example: not run — REASON -->")
            elif not (EXITS_MARK.match(block.mark) and block.language == "console"):
                problems.append(f"{block.where}: unknown example mark {block.mark!r}")
    assert not problems, "\n".join(problems)


def test_the_pages_have_examples_that_run():
    # The README's worked example and at least one page per kind of block run: a parser that found nothing
    # would otherwise pass every document.
    ran = [b for blocks, _ in ALL_BLOCKS.values() for b in blocks if b.language in RUNNABLE and not b.skipped]
    assert {b.language for b in ran} >= {"bash", "console", "python"}
    assert "README.md" in TO_RUN


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """A folder of ``python``, ``python3`` and ``fcconv`` that run this interpreter and this checkout."""
    folder = tmp_path_factory.mktemp("bin")
    for name, line in [
        ("python", f'exec "{sys.executable}" "$@"'),
        ("python3", f'exec "{sys.executable}" "$@"'),
        ("fcconv", f'exec "{sys.executable}" -m fcconv "$@"'),
    ]:
        (folder / name).write_text(f"#!/bin/sh\n{line}\n")
        (folder / name).chmod(0o755)
    return folder


def run(args: list[str], block: Block, command: str, folder: Path, env: dict[str, str], exit_code: int = 0) -> None:
    """Run one command or block in ``folder``; fail naming the page's line and the output when its exit code differs."""
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    tail = (result.stdout[-3000:] + "\n" + result.stderr[-3000:]).strip()
    assert result.returncode == exit_code, (
        f"{block.where}: exit {result.returncode}, the page says {exit_code}:\n{command}\n{tail}"
    )


@pytest.mark.parametrize("document", TO_RUN)
def test_the_examples_of_each_page_run_as_written(document, commands):
    blocks, _ = ALL_BLOCKS[document]
    env = {
        **os.environ,
        "PATH": f"{commands}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    ran = []
    with tempfile.TemporaryDirectory(prefix="fcconv-docs-") as temporary:
        folder = Path(temporary)
        for name in COPIED:
            shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "retrained"))
        for block in blocks:
            if block.language not in RUNNABLE or block.skipped:
                continue
            if block.language == "python":
                run([sys.executable, "-c", block.body], block, block.body, folder, env)
            elif block.language in ("bash", "sh"):
                run(["bash", "-e", "-o", "pipefail", "-c", block.body], block, block.body, folder, env)
            else:
                last = EXITS_MARK.match(block.mark or "")
                steps = console_commands(block.body)
                for number, command in enumerate(steps, 1):
                    exit_code = int(last.group(1)) if last and number == len(steps) else 0
                    run(["bash", "-o", "pipefail", "-c", command], block, command, folder, env, exit_code)
            ran.append(block.where)
    assert ran == [b.where for b in blocks if b.language in RUNNABLE and not b.skipped]
