"""The installed ``claudemesh`` executable against a real broker and real daemons.

Two users in temporary homes: alice's daemon is started by the CLI itself
(autostart), bob's too; they create and join a workspace through an
invite link, list peers, message both ways, read inboxes, watch delivery
states, and compare safety numbers. Every daemon is stopped at the end,
and killed if it does not stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmtest.broker import BrokerProc, run_broker

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).with_name("claudemesh")
DEADLINE_S = 30.0


class User:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, CLAUDEMESH_HOME=os.fspath(home))
        self.env.pop("NO_COLOR", None)

    def run(self, *args: str, check: int | None = 0, stdin: str | None = None) -> Any:
        done = subprocess.run(
            [os.fspath(EXE), *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check is not None:
            assert done.returncode == check, (args, done.returncode, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        done = self.run(*args, "--json")
        return json.loads(done.stdout)

    def pid(self) -> int | None:
        done = self.run("daemon", "status", "--json", check=None)
        if done.returncode != 0:
            return None
        return int(json.loads(done.stdout)["pid"])


def wait_until(what: str, fn: Any) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@contextlib.contextmanager
def users(*names: str) -> Iterator[list[User]]:
    # Short paths: the daemon's unix sockets must fit in sun_path.
    root = Path(tempfile.mkdtemp(prefix="cme2e"))
    people = [User(root / n) for n in names]
    try:
        yield people
    finally:
        for u in people:
            pid = None
            with contextlib.suppress(Exception):
                pid = u.pid()
                u.run("daemon", "stop", check=None)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProc]:
    with run_broker(tmp_path) as b:
        yield b


def test_two_users_end_to_end(broker: BrokerProc) -> None:
    with users("alice", "bob", "carol") as (alice, bob, carol):
        assert alice.run("peers", "--no-start", check=3).stderr.startswith("claudemesh: ")

        # The first verb starts the daemon in the background (autostart).
        created = alice.json(
            "workspace", "create", "team", "--broker", broker.url, "--display-name", "alice"
        )["workspace"]
        assert created["name"] == "team"
        assert (alice.home / "logs").is_dir()
        assert alice.pid() is not None

        out = alice.run("invite", "create").stdout
        link = out.splitlines()[0]
        assert "1 use" in out

        joined = bob.json("workspace", "join", link, "--name", "bob")["workspace"]
        assert joined["mesh_id"] == created["mesh_id"]
        again = bob.run("workspace", "join", link, "--name", "bob2", check=1)
        assert "Already a member" in again.stderr
        used = carol.run("workspace", "join", link, "--name", "carol", check=1)
        assert used.stderr == "claudemesh: This invite has been used up; ask for a new one.\n"
        cut = carol.run("workspace", "join", link.split("#")[0], check=1)
        assert "has no secret" in cut.stderr
        lonely = carol.run("peers", check=1)
        assert "You have no workspace yet" in lonely.stderr
        assert "claudemesh workspace join INVITE" in lonely.stderr
        wrong = alice.run("peers", "-w", "teem", check=1)
        assert "No workspace named 'teem'. Your workspaces: team." in wrong.stderr

        def sees(me: User, other: str) -> bool:
            peers = me.json("peer", "list")["peers"]
            return any(p["display_name"] == other and p["online"] for p in peers)

        wait_until("alice sees bob online", lambda: sees(alice, "bob"))
        wait_until("bob sees alice online", lambda: sees(bob, "alice"))
        table = alice.run("peer", "list").stdout
        assert "bob" in table
        assert "alice (you)" in table

        sent = alice.json("send", "bob", "hello bob", "--wait", "delivered", "--timeout", "20")
        cmid = sent["client_message_id"]
        assert sent["state"] == "accepted"
        assert sent["status"]["state"] in ("delivered", "surfaced")

        back = bob.run("message", "send", "alice", "-", stdin="hi alice\n").stdout
        back_id, back_state = back.split()[:2]
        assert back_state == "accepted"

        inbox = bob.json("inbox")["messages"]
        assert [m["body"] for m in inbox] == ["hello bob"]
        assert inbox[0]["from_name"] == "alice"

        def reached(user: User, mid: str, states: tuple[str, ...]) -> Any:
            status = user.json("message", "status", mid)
            return status if status["state"] in states else None

        wait_until(
            "bob's message delivered", lambda: reached(bob, back_id, ("delivered", "surfaced"))
        )
        assert alice.run("message", "inbox").stdout == "* just now  bob: hi alice\n"
        # Bob read alice's message, so it progresses past delivered to surfaced.
        status = wait_until("surfaced", lambda: reached(alice, cmid, ("surfaced",)))
        assert status["recipients"][0]["display_name"] == "bob"
        human = alice.run("message", "status", cmid).stdout
        assert human.splitlines()[0] == f"{cmid}: surfaced"

        # Idempotent retry with the same id is harmless; a different body conflicts.
        alice.json("send", "bob", "once", "--id", "fixed-id-1")
        dup = alice.json("send", "bob", "once", "--id", "fixed-id-1")
        assert dup["duplicate"] is True
        clash = alice.run("send", "bob", "twice", "--id", "fixed-id-1", check=1)
        assert "already used" in clash.stderr

        # Unknown names suggest close matches.
        miss = alice.run("send", "bobb", "hi", check=1)
        assert "Did you mean: bob" in miss.stderr

        a = alice.json("verify", "bob")
        b = bob.json("verify", "alice")
        assert a["safety_number"] == b["safety_number"]
        assert a["self_pubkey"] == b["peer_pubkey"]
        assert a["safety_number"].replace(" ", "")[:5] in alice.run("verify", "bob").stdout

        # `inbox --follow` streams what arrives until interrupted.
        bob.run("inbox")  # read everything so far
        follow = subprocess.Popen(
            [os.fspath(EXE), "inbox", "--follow", "--unread"],
            env=bob.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=lambda: [lines.put(x) for x in follow.stdout or ()], daemon=True
        )
        reader.start()
        try:
            alice.run("send", "bob", "streamed 1")
            streamed = alice.json("send", "bob", "streamed 2")["client_message_id"]
            got = [lines.get(timeout=DEADLINE_S).rstrip() for _ in range(2)]
            assert [line.split("  ", 1)[1] for line in got] == [
                "alice: streamed 1",
                "alice: streamed 2",
            ]
            # Printed by a CLI read: seen, and surfaced for the sender.
            wait_until("streamed surfaced", lambda: reached(alice, streamed, ("surfaced",)))
            assert bob.json("inbox", "--unread")["messages"] == []
            follow.send_signal(signal.SIGINT)
            assert follow.wait(timeout=DEADLINE_S) == 0
            assert "Traceback" not in (follow.stderr.read() if follow.stderr else "")
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            for stream in (follow.stdout, follow.stderr):
                if stream is not None:
                    stream.close()

        assert alice.run("status", "set", "working").stdout == "Status: working\n"
        alice.run("summary", "set", "writing the CLI")

        def summary_seen() -> bool:
            peers = bob.json("peer", "list")["peers"]
            return any(p.get("summary") == "writing the CLI" for p in peers)

        wait_until("bob sees alice's summary", summary_seen)

        listed = alice.json("workspace", "list")
        assert listed["default"] == "team"
        assert alice.run("daemon", "status").stdout.startswith("Daemon running")
        pid = alice.pid()
        assert pid is not None
        assert alice.run("daemon", "stop").stdout == f"Daemon stopped (pid {pid}).\n"
        assert alice.run("daemon", "status", check=3).stdout.startswith("Daemon is not running")


def test_verb_path_imports_no_trio(broker: BrokerProc) -> None:
    """A hot verb and a cyclopts verb, each in a fresh interpreter, against a live daemon."""
    with users("carol") as (carol,):
        carol.json("workspace", "create", "solo", "--broker", broker.url)
        probe = (
            "import sys\n"
            "from claudemesh.clients.cli.app import run\n"
            "rc = run(sys.argv[1:])\n"
            "ours = ('trio', 'claudemesh', 'cyclopts')\n"
            "mods = sorted(m for m in sys.modules if m.startswith(ours))\n"
            "print('MODULES', ' '.join(mods), file=sys.stderr)\n"
            "sys.exit(rc)\n"
        )

        def modules(*argv: str) -> set[str]:
            done = subprocess.run(
                [sys.executable, "-c", probe, *argv],
                env=carol.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES"))
            return set(line.split()[1:])

        send = modules("send", "*", "anyone there?")
        assert not any(m == "trio" or m.startswith("trio.") for m in send)
        assert "cyclopts" not in send
        assert "claudemesh.clients.cli.verbs.peer" not in send
        assert "claudemesh.shared.protocol.crypto" not in send

        peers = modules("peer", "list")
        assert "trio" not in peers
        assert "claudemesh.clients.cli.verbs.message" not in peers

        listing = modules("workspace", "list")  # through cyclopts, lazily
        assert "trio" not in listing
        assert "cyclopts" in listing
        assert "claudemesh.clients.cli.verbs.workspace" in listing
        assert "claudemesh.clients.cli.verbs.message" not in listing
        assert "claudemesh.clients.cli.verbs.daemon" not in listing


def test_concurrent_verbs_start_one_daemon() -> None:
    """Four verbs racing on a home with no daemon: one daemon, and every verb uses it."""
    with users("dave") as (dave,):
        procs = [
            subprocess.Popen(
                [os.fspath(EXE), "daemon", "start", "--json"],
                env=dave.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        docs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            docs.append(json.loads(out))
        assert len({d["pid"] for d in docs}) == 1
        assert sum(d["started"] for d in docs) == 1
        assert dave.pid() == docs[0]["pid"]


def test_daemon_run_in_the_foreground() -> None:
    """What a service unit runs: `claudemesh daemon run` until asked to stop."""
    with users("erin") as (erin,):
        proc = subprocess.Popen(
            [os.fspath(EXE), "daemon", "run"],
            env=erin.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            pid = wait_until("the foreground daemon answers", erin.pid)
            assert pid == proc.pid
            assert erin.run("daemon", "stop").stdout == f"Daemon stopped (pid {pid}).\n"
            assert proc.wait(timeout=DEADLINE_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=DEADLINE_S)
