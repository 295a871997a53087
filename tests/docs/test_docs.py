"""The commands in README.md and docs/ are true.

Two layers:

- Every ```sh block preceded by ``<!-- runnable -->`` is executed as written
  by ``bash -euo pipefail`` in a fresh temporary directory, with the venv's
  scripts first on PATH and ``HOME`` / ``CLAUDEMESH_HOME`` pointing into that
  directory (so nothing touches the real user). The one substitution: the
  broker's documented port 7900 becomes a free port, so parallel runs do not
  collide. Whatever the block leaves running is stopped afterwards.
- Every ``claudemesh ...`` / ``claudemesh-broker ...`` command line in any sh
  block, runnable or not, names a real verb, and every ``--option`` it uses
  appears in that verb's ``--help``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 90.0
DOC_PORT = "7900"

_FENCE = re.compile(r"^\s*```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    runnable: bool

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a markdown file; ``runnable`` when the marker precedes them."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    marked = False
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if line.strip() == "<!-- runnable -->":
            marked = True
        elif m and m.group(1):
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i].strip())
                i += 1
            blocks.append(Block(path, start + 1, m.group(1), "\n".join(body) + "\n", marked))
            marked = False
        elif line.strip():
            marked = False
        i += 1
    return blocks


ALL_BLOCKS = [b for p in DOCS if p.exists() for b in extract_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if b.runnable]


def test_extractor_finds_marked_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n<!-- runnable -->\n```sh\necho one\n```\n\n```sh\necho two\n```\n"
        "<!-- runnable -->\nprose breaks the marker\n```sh\necho three\n```\n"
    )
    blocks = extract_blocks(doc)
    assert [(b.text.strip(), b.runnable) for b in blocks] == [
        ("echo one", True),
        ("echo two", False),
        ("echo three", False),
    ]
    assert any(b.runnable and b.lang != "sh" for b in RUNNABLE) is False
    # The docs promise runnable examples; losing them silently would be a regression.
    assert {b.path.name for b in RUNNABLE} >= {
        "quickstart.md",
        "self-hosting.md",
        "troubleshooting.md",
    }


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _claudemesh_pids_under(root: Path) -> Iterator[int]:
    """Daemons whose home is under ``root`` (they write their pid into daemon.lock)."""
    for lock in root.rglob("daemon.lock"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(lock.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"claudemesh" in cmdline:
                yield pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of someone else is gone for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def stop_leftovers(root: Path) -> list[int]:
    """SIGTERM then SIGKILL every daemon a block left under ``root``; return their pids."""
    pids = list(_claudemesh_pids_under(root))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def run_block(block: Block) -> subprocess.CompletedProcess[str]:
    work = Path(tempfile.mkdtemp(prefix="cmdoc-"))
    try:
        env = dict(os.environ)
        env.pop("CLAUDEMESH_HOME", None)
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            HOME=os.fspath(work / "home"),
            CLAUDEMESH_HOME=os.fspath(work / "home" / ".claudemesh"),
        )
        (work / "home").mkdir(mode=0o700)
        script = block.text.replace(DOC_PORT, _free_port())
        log = work / "output.txt"
        # Output to a file, not a pipe: a background job (`broker &`) keeps a
        # pipe open after the block ends, and we wait for the block only.
        with log.open("w") as out_file:
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{block.label} did not finish in {BLOCK_TIMEOUT_S} s:\n{log.read_text()}")
        finally:
            # Background jobs of the block (a broker started with `&`) share its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            stop_leftovers(work)
        out = log.read_text()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.label for b in RUNNABLE])
def test_runnable_block(block: Block) -> None:
    result = run_block(block)
    assert result.returncode == 0, f"{block.label} failed ({result.returncode}):\n{result.stdout}"


# ------------------------------------------------------------ verbs and options


def _command_lines() -> Iterator[tuple[Block, list[str]]]:
    for block in ALL_BLOCKS:
        if block.lang not in ("sh", "bash"):
            continue
        for raw in block.text.splitlines():
            line = raw.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                part = re.sub(r"^.*\$\(", "", part.strip())
                part = re.sub(r"^(?:until|while|if|then|do|!)\s+", "", part)
                part = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", part)
                part = re.sub(r"^\S*/(?=claudemesh)", "", part)
                if not re.match(r"^(claudemesh|claudemesh-broker)(\s|$)", part):
                    continue
                try:
                    words = shlex.split(part.rstrip("&").rstrip(")"))
                except ValueError:
                    words = part.split()
                yield block, words


def _verb_and_options(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    verb: list[str] = [words[0]]
    opts: list[str] = []
    for w in words[1:]:
        if w.startswith("--"):
            opts.append(w.split("=", 1)[0])
        elif not opts and re.fullmatch(r"[a-z][a-z-]*", w) and len(verb) < 3:
            verb.append(w)
    return tuple(verb), opts


def _documented_commands() -> dict[tuple[str, ...], set[str]]:
    found: dict[tuple[str, ...], set[str]] = {}
    for _block, words in _command_lines():
        verb, opts = _verb_and_options(words)
        found.setdefault(verb, set()).update(opts)
    return found


def _help(verb: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``--help`` of the longest prefix of ``verb`` that is a command."""
    for n in range(len(verb), 0, -1):
        argv = [os.fspath(BIN / verb[0]), *verb[1:n], "--help"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode == 0:
            return proc
    return proc


def test_documented_commands_exist() -> None:
    commands = _documented_commands()
    assert ("claudemesh", "demo") in commands
    assert ("claudemesh", "doctor") in commands
    problems = []
    for verb, opts in sorted(commands.items()):
        proc = _help(verb)
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            problems.append(f"{' '.join(verb)}: --help failed: {text.strip()[:200]}")
            continue
        problems += [f"{' '.join(verb)}: no option {o}" for o in opts if o not in text]
    assert not problems, "\n".join(problems)


def test_a_failing_block_fails_and_its_daemons_are_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = Block(
        Path("x.md"),
        1,
        "sh",
        'claudemesh daemon start\ncat "$CLAUDEMESH_HOME/daemon.lock" > pid.txt\nfalse\n',
        True,
    )
    work_pids: list[int] = []
    real_rmtree = shutil.rmtree

    def keep_pid(path: Path, ignore_errors: bool = False) -> None:
        with contextlib.suppress(OSError, ValueError):
            work_pids.append(int((Path(path) / "pid.txt").read_text().split()[0]))
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", keep_pid)
    result = run_block(block)
    monkeypatch.undo()
    assert result.returncode == 1
    assert len(work_pids) == 1
    assert not _alive(work_pids[0])


def test_scripts_demo_is_the_one_line_setup() -> None:
    script = ROOT / "scripts" / "demo"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", os.fspath(script)], check=True, timeout=10)
    text = script.read_text()
    assert "-m venv .venv" in text
    assert "pip install" in text
    assert text.rstrip().endswith('.venv/bin/claudemesh demo "$@"')
