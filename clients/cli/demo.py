"""``claudemesh demo``: a self-contained tour of the real pieces on this machine.

It starts a real broker subprocess (loopback, a port the OS picks, temporary SQLite
file) and two real daemons (Alice and Bob, each in a temporary
``CLAUDEMESH_HOME``), then drives them only through the daemon's local API
(docs/ipc.md), exactly as the CLI does: create a workspace, invite Bob through
a real invite link, direct messages both ways with each delivery state shown
as the daemon reports it, safety numbers, and a message to Bob while he is
offline. Nothing is simulated; a state is printed only once ``message.wait``
says it has been reached.

Rules of the module: every child runs in its own session with its output in
a log file (so ``--keep`` can leave it running after we exit); every wait has
a deadline; everything started is stopped and the temporary tree removed on
every exit path (success, failure, Ctrl-C, SIGTERM) unless ``--keep``.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from .client import Connection, control_socket_path
from .errors import CliError, RequestFailed

#: Bound on a process appearing (broker port open, daemon socket greeting).
START_DEADLINE_S: Final = 20.0
#: Bound on one delivery state being reached (the daemon enforces it too).
STATE_DEADLINE_S: Final = 20.0
#: Bound on a process exiting after it was asked to.
STOP_DEADLINE_S: Final = 10.0
_POLL_S: Final = 0.02

WORKSPACE: Final = "demo"
STATES: Final = ("accepted", "sent", "delivered", "surfaced")
_MEANING: Final = {
    "accepted": "on the sender's disk",
    "sent": "on the broker's disk",
    "delivered": "on the recipient's disk",
    "surfaced": "read by the recipient",
}


class DemoFailed(CliError):
    """A step of the demo did not happen; the message says which and where to look."""

    def __init__(self, message: str) -> None:
        super().__init__("demo_failed", message)


class _Interrupted(BaseException):
    """SIGTERM turned into an exception so that clean-up runs."""


# ------------------------------------------------------------------ processes


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def broker_command(db: Path, port_file: Path) -> list[str]:
    """``claudemesh-broker serve`` with this interpreter, on a port the OS picks."""
    return _python_module(
        "claudemesh.broker",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        os.fspath(port_file),
        "--db",
        os.fspath(db),
    )


def daemon_command() -> list[str]:
    return _python_module("claudemesh.daemon")


def cli_command() -> str:
    """How to call the CLI by hand: the script next to this interpreter if any."""
    script = Path(sys.executable).parent / "claudemesh"
    return shlex.quote(os.fspath(script)) if script.exists() else "claudemesh"


@dataclass
class Child:
    """One process the demo started, with its log file."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                # Own session: Ctrl-C reaches only the demo, which then stops
                # the children in order; and --keep can leave them running.
                start_new_session=True,
                close_fds=True,
                env=self.env,
                # Homes and the broker database hold keys and metadata.
                umask=0o077,
            )
        finally:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the deadline; always reaps."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(STOP_DEADLINE_S)
        else:
            self.proc.wait()


@dataclass
class User:
    """A demo user: a daemon and its home."""

    name: str
    home: Path
    child: Child
    pubkey: str = ""

    def connect(self) -> Connection:
        return Connection.open(control_socket_path(self.home), client="cli")

    def call(self, method: str, params: dict[str, Any] | None = None, *, wait: float = 0) -> Any:
        with self.connect() as conn:
            return conn.call(method, params or {}, timeout=wait + 15.0)


def _deadline_loop(deadline_s: float) -> Iterator[float]:
    """Yield until the deadline; the caller breaks out when its condition holds."""
    end = time.monotonic() + deadline_s
    while True:
        now = time.monotonic()
        if now >= end:
            return
        yield end - now
        time.sleep(_POLL_S)


def wait_port(child: Child, port_file: Path) -> int:
    """The port the broker bound, once it has written it (it listens by then)."""
    for _ in _deadline_loop(START_DEADLINE_S):
        with contextlib.suppress(OSError, ValueError):
            return int(port_file.read_text().strip())
        if not child.alive():
            raise DemoFailed(
                f"The broker exited at start-up. Its log ({child.log}):\n{child.log_tail()}"
            )
    raise DemoFailed(f"The broker did not start listening within {START_DEADLINE_S:g} s.")


def wait_daemon(user: User) -> None:
    for _ in _deadline_loop(START_DEADLINE_S):
        if not user.child.alive():
            raise DemoFailed(
                f"{user.name}'s daemon exited at start-up. Its log ({user.child.log}):\n"
                f"{user.child.log_tail()}"
            )
        try:
            with user.connect():
                return
        except (FileNotFoundError, ConnectionRefusedError):
            continue
        except OSError:
            continue
    raise DemoFailed(f"{user.name}'s daemon did not open its socket within {START_DEADLINE_S:g} s.")


def wait_connected(user: User) -> None:
    """Poll ``daemon.status`` until the demo workspace's broker link is up."""
    last = "unknown"
    for _ in _deadline_loop(START_DEADLINE_S):
        status = user.call("daemon.status")
        for ws in status.get("workspaces", []):
            if ws.get("name") == WORKSPACE:
                last = str(ws.get("link"))
                if last == "connected":
                    return
                if last == "refused":
                    raise DemoFailed(
                        f"The broker refused {user.name}'s daemon: {ws.get('last_error')}"
                    )
    raise DemoFailed(
        f"{user.name}'s daemon did not connect to the broker within {START_DEADLINE_S:g} s "
        f"(link state: {last}). See {user.child.log}."
    )


# ------------------------------------------------------------------ narration


class Narrator:
    """Prints the tour; silent in ``--json`` mode (the document goes out at the end)."""

    def __init__(self, out: TextIO, *, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self.say(f"• {text}")


@dataclass
class Report:
    """What ``--json`` prints: every fact the narration shows."""

    workdir: str = ""
    broker: dict[str, Any] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    safety_numbers: dict[str, str] = field(default_factory=dict)
    kept: bool = False
    ok: bool = False


def send_and_follow(
    n: Narrator,
    report: Report,
    sender: User,
    recipient: User,
    text: str,
    *,
    before_surfaced: Callable[[], None] | None = None,
    stop_after: str = "surfaced",
) -> str:
    """Send ``text`` and print each delivery state as the daemon reports it.

    Returns the client message id. ``stop_after`` lets the offline part stop
    at ``sent`` and resume later with :func:`follow`.
    """
    n.say(f'{sender.name} → {recipient.name}: "{text}"')
    t0 = time.monotonic()
    result = sender.call("message.send", {"to": recipient.pubkey, "body": text})
    cmid = str(result["client_message_id"])
    entry: dict[str, Any] = {
        "from": sender.name,
        "to": recipient.name,
        "body": text,
        "client_message_id": cmid,
        "states": [],
    }
    report.messages.append(entry)
    _print_state(n, entry, str(result.get("state", "accepted")), t0)
    follow(n, entry, sender, recipient, t0, before_surfaced=before_surfaced, stop_after=stop_after)
    return cmid


def follow(
    n: Narrator,
    entry: dict[str, Any],
    sender: User,
    recipient: User,
    t0: float,
    *,
    before_surfaced: Callable[[], None] | None = None,
    stop_after: str = "surfaced",
) -> None:
    """Wait for each next state in order and print it once the daemon reports it."""
    cmid = entry["client_message_id"]
    for target in STATES[1:]:
        if target in entry["states"]:
            continue
        if target == "surfaced":
            if before_surfaced is not None:
                before_surfaced()
            else:
                read_inbox(n, recipient, cmid)
        status = wait_state(sender, cmid, target)
        reached = str(status.get("state"))
        if reached in ("failed", "expired") or reached not in STATES:
            raise DemoFailed(f"Message {cmid} ended as {reached!r}: {status}")
        # The daemon may already be past the state we asked for; print every
        # state up to the one reached, each of which has therefore happened.
        for s in STATES[: STATES.index(reached) + 1]:
            if s not in entry["states"]:
                _print_state(n, entry, s, t0)
        if target == stop_after:
            return


def _print_state(n: Narrator, entry: dict[str, Any], state: str, t0: float) -> None:
    ms = (time.monotonic() - t0) * 1000
    entry["states"].append(state)
    entry.setdefault("elapsed_ms", {})[state] = round(ms, 1)
    n.say(f"    {state:<10} {_MEANING[state]:<26} +{ms:.0f} ms")


def wait_state(sender: User, cmid: str, state: str) -> dict[str, Any]:
    try:
        status: dict[str, Any] = sender.call(
            "message.wait",
            {"client_message_id": cmid, "state": state, "timeout_s": STATE_DEADLINE_S},
            wait=STATE_DEADLINE_S,
        )
    except RequestFailed as exc:
        if exc.code == "timeout":
            raise DemoFailed(
                f"Message {cmid} did not reach {state!r} within {STATE_DEADLINE_S:g} s "
                f"(last status: {exc.details})."
            ) from None
        raise
    return status


def read_inbox(n: Narrator, user: User, cmid: str) -> None:
    """The recipient reads its inbox (which records ``surfaced``)."""
    found: dict[str, Any] | None = None
    for _ in _deadline_loop(STATE_DEADLINE_S):
        inbox = user.call("message.inbox", {"unread": True, "mark_seen": True})
        for m in inbox.get("messages", []):
            if m.get("client_message_id") == cmid:
                found = m
        if found is not None:
            break
    if found is None:
        raise DemoFailed(f"{user.name}'s inbox never showed message {cmid}.")
    n.say(f"    {user.name} reads the inbox: [{found.get('from_name')}] {found.get('body')}")


# ------------------------------------------------------------------ the tour


def _setup(n: Narrator, report: Report, workdir: Path, children: list[Child]) -> tuple[User, User]:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDEMESH_HOME"}
    # The broker: a loopback port the OS picks, and a fresh SQLite file.
    bdir = workdir / "broker"
    bdir.mkdir(mode=0o700)
    db = bdir / "broker.db"
    broker = Child("broker", broker_command(db, bdir / "port"), bdir / "broker.log", env)
    broker.start()
    children.append(broker)
    port = wait_port(broker, bdir / "port")
    url = f"ws://127.0.0.1:{port}/ws"
    report.broker = {"url": url, "pid": broker.pid, "db": os.fspath(db)}
    n.step(f"Broker listening on {url} (pid {broker.pid}, SQLite store in {workdir}/broker)")

    users: list[User] = []
    for name in ("Alice", "Bob"):
        home = workdir / name.lower()
        home.mkdir(mode=0o700)
        child = Child(
            f"{name}'s daemon",
            daemon_command(),
            workdir / f"{name.lower()}-daemon.log",
            dict(env, CLAUDEMESH_HOME=os.fspath(home)),
        )
        user = User(name, home, child)
        child.start()
        children.append(child)
        wait_daemon(user)
        n.step(f"{name}'s daemon started (pid {child.pid}, CLAUDEMESH_HOME={home})")
        users.append(user)
    alice, bob = users

    created = alice.call(
        "workspace.create", {"name": WORKSPACE, "broker_url": url, "display_name": "alice"}
    )["workspace"]
    alice.pubkey = str(created["member_pubkey"])
    n.step(f'Alice created workspace "{WORKSPACE}" (mesh {created["mesh_id"]})')
    wait_connected(alice)
    invite = alice.call("invite.create", {"role": "member", "uses": 1, "expires_s": 3600})
    link = str(invite["link"])
    n.step(f"Alice made a one-use invite link: {_shorten(link)}")
    joined = bob.call("workspace.join", {"link": link, "display_name": "bob", "name": WORKSPACE})[
        "workspace"
    ]
    bob.pubkey = str(joined["member_pubkey"])
    n.step("Bob joined through the link")
    wait_connected(bob)
    n.step("Both daemons are connected to the broker")
    for u in (alice, bob):
        report.users[u.name.lower()] = {
            "home": os.fspath(u.home),
            "pid": u.child.pid,
            "pubkey": u.pubkey,
        }
    return alice, bob


def _shorten(link: str) -> str:
    """The link for the narration: ids abbreviated, and the secret (after '#') hidden."""
    head, sep, _ = link.partition("#")
    path, _, _query = head.partition("?")
    prefix = "claudemesh://join/"
    if path.startswith(prefix):
        ids = path[len(prefix) :].split("/")
        path = prefix + "/".join(f"{i[:8]}…" if len(i) > 12 else i for i in ids)
    return f"{path}?broker=…#<secret>" if sep else path


def _tour(n: Narrator, report: Report, workdir: Path, children: list[Child]) -> list[User]:
    alice, bob = _setup(n, report, workdir, children)

    n.say()
    n.say("Direct messages, end-to-end encrypted; each state is printed when it happens:")
    send_and_follow(n, report, alice, bob, "Hi Bob, Alice here. Can you review my branch?")
    send_and_follow(n, report, bob, alice, "Sure, send me the link.")

    n.say()
    a_view = alice.call("verify", {"peer": bob.pubkey})
    b_view = bob.call("verify", {"peer": alice.pubkey})
    report.safety_numbers = {
        "alice_sees_bob": str(a_view["safety_number"]),
        "bob_sees_alice": str(b_view["safety_number"]),
    }
    n.say("Safety numbers (compare them out of band to rule out a man in the middle):")
    n.say(f"    Alice's view of Bob:  {a_view['safety_number']}")
    n.say(f"    Bob's view of Alice:  {b_view['safety_number']}")
    if a_view["safety_number"] != b_view["safety_number"]:
        raise DemoFailed("The two safety numbers differ.")
    n.say("    ✓ they agree")

    n.say()
    with contextlib.suppress(CliError, OSError):
        bob.call("daemon.stop")
    try:
        assert bob.child.proc is not None
        bob.child.proc.wait(STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        bob.child.stop()
    n.step(f"Bob's daemon stopped (pid {bob.child.pid} exited): Bob is offline")
    text = "The link is in the PR description. Talk tomorrow!"
    t0 = time.monotonic()
    cmid = send_and_follow(n, report, alice, bob, text, stop_after="sent")
    status = alice.call("message.status", {"client_message_id": cmid})
    n.say(f"    Bob is offline, so the message waits on the broker (state: {status['state']})")

    # Same home, new process: Bob comes back and the broker pushes what waited.
    restarted = Child(bob.child.name, bob.child.argv, bob.child.log, bob.child.env)
    restarted.start()
    children.append(restarted)
    bob.child = restarted
    wait_daemon(bob)
    n.step(f"Bob's daemon restarted (pid {restarted.pid})")
    report.users["bob"]["pid_after_restart"] = restarted.pid
    follow(n, report.messages[-1], alice, bob, t0)
    return [alice, bob]


def _stop_all(children: list[Child], users: list[User]) -> None:
    """Ask daemons to drain, then make sure every child is gone."""
    for u in users:
        if u.child.alive():
            with contextlib.suppress(CliError, OSError):
                u.call("daemon.stop")
    for child in reversed(children):
        with contextlib.suppress(OSError):
            child.stop()


def _keep_instructions(n: Narrator, report: Report, workdir: Path) -> None:
    cli = cli_command()
    a = shlex.quote(report.users["alice"]["home"])
    b = shlex.quote(report.users["bob"]["home"])
    broker_pid = report.broker["pid"]
    n.say()
    n.say("Everything is still running. Talk to it by hand:")
    n.say(f"    CLAUDEMESH_HOME={a} {cli} peer list")
    n.say(f'    CLAUDEMESH_HOME={a} {cli} message send bob "hello again"')
    n.say(f"    CLAUDEMESH_HOME={b} {cli} message inbox")
    n.say(f"    CLAUDEMESH_HOME={b} {cli} verify alice")
    n.say("Stop it all when done:")
    n.say(
        f"    CLAUDEMESH_HOME={a} {cli} daemon stop; CLAUDEMESH_HOME={b} {cli} daemon stop; "
        f"kill {broker_pid}; rm -rf {shlex.quote(os.fspath(workdir))}"
    )


def run_demo(*, keep: bool = False, json: bool = False, out: TextIO | None = None) -> Report:
    """Run the whole tour; raise :class:`DemoFailed` with the reason if a step fails."""
    out = out if out is not None else sys.stdout
    n = Narrator(out, quiet=json)
    workdir = Path(tempfile.mkdtemp(prefix="claudemesh-demo-"))
    os.chmod(workdir, 0o700)
    report = Report(workdir=os.fspath(workdir), kept=keep)
    children: list[Child] = []
    users: list[User] = []
    n.say(f"claudemesh demo: a broker and two users on this machine, in {workdir}")
    n.say()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGTERM, on_term)
    finished = False
    try:
        users = _tour(n, report, workdir, children)
        finished = True
        report.ok = True
    except CliError:
        # The temporary tree is about to go: show what the processes said first.
        for child in children:
            tail = child.log_tail()
            if tail:
                print(f"--- last lines of the {child.name} log ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if not (keep and finished):
            # A second Ctrl-C or SIGTERM while cleaning up would leave
            # orphans: finish the clean-up first (it is bounded by deadlines).
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                _stop_all(children, users)
                shutil.rmtree(workdir, ignore_errors=True)
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old)
            if finished:
                n.say()
                n.say("Cleaned up: both daemons and the broker are stopped, temporary files gone.")
        else:
            signal.signal(signal.SIGTERM, old)
    if keep:
        _keep_instructions(n, report, workdir)
    n.say("Demo finished.")
    return report


def demo(*, keep: bool = False, json: bool = False) -> int:
    """A self-contained tour: a broker and two users (Alice, Bob) on this machine.

    Starts a broker on a free loopback port and two daemons in temporary
    homes, creates a workspace, invites Bob with a real invite link, sends
    direct messages both ways showing each delivery state, compares safety
    numbers, and delivers a message sent while Bob was offline. Everything
    is stopped and removed at the end, also on Ctrl-C.

    Parameters
    ----------
    keep
        Leave the broker and daemons running and print the commands to use them.
    json
        Print one JSON document with what happened instead of the narration.
    """
    try:
        report = run_demo(keep=keep, json=json)
    except KeyboardInterrupt:
        print("\nInterrupted: everything the demo started has been stopped.", file=sys.stderr)
        return 130
    except _Interrupted:
        print("Terminated: everything the demo started has been stopped.", file=sys.stderr)
        return 143
    if json:
        print(jsonlib.dumps(report.__dict__, indent=2))
    return 0
