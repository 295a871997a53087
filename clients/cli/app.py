"""The ``claudemesh`` command: a fast path for hot verbs, cyclopts for the rest.

Importing cyclopts costs about as much as a whole ``message send`` should
(see docs/benchmarks.md, "CLI"), so :func:`main` first tries a tiny parser
that only accepts the plain forms of the hot verbs (``message send``,
``send``, ``peer list``, ``peers``, ``message inbox``/``inbox`` without
``--follow``, ``message status``) and calls the very same verb functions.
Anything else (``--help``, an unknown option, a bad value) goes to the
cyclopts app, which registers every verb lazily by import path, so a verb
only imports its own module. :func:`main` is also the one place where a
:class:`~.errors.CliError` becomes a sentence on stderr and an exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import EXIT_FAILED, EXIT_USAGE, CliError

if TYPE_CHECKING:
    from cyclopts import App

_V = "claudemesh.clients.cli.verbs"

# verb path -> (module:function, options taking a value, flags, positional count)
_SEND_VALUES = {"--priority", "--id", "--reply-to", "--wait", "--timeout", "--workspace"}
_COMMON_FLAGS = {"--json", "--no-start"}
_HOT: dict[tuple[str, ...], tuple[str, set[str], set[str], int]] = {
    ("message", "send"): ("message:send", _SEND_VALUES, _COMMON_FLAGS, 2),
    ("send",): ("message:send", _SEND_VALUES, _COMMON_FLAGS, 2),
    ("peer", "list"): ("peer:list_", {"--workspace"}, _COMMON_FLAGS, 0),
    ("peers",): ("peer:list_", {"--workspace"}, _COMMON_FLAGS, 0),
    ("message", "inbox"): (
        "message:inbox",
        {"--workspace", "--limit"},
        _COMMON_FLAGS | {"--unread"},
        0,
    ),
    ("inbox",): ("message:inbox", {"--workspace", "--limit"}, _COMMON_FLAGS | {"--unread"}, 0),
    ("message", "status"): ("message:status", {"--workspace"}, _COMMON_FLAGS, 1),
}
_CHOICES = {
    "--priority": {"now", "next", "low"},
    "--wait": {"accepted", "sent", "delivered", "surfaced"},
}
_NUMBERS: dict[str, Callable[[str], Any]] = {"--timeout": float, "--limit": int}


def normalize(argv: Sequence[str]) -> list[str]:
    """Expand ``-w NAME`` to ``--workspace NAME`` (before any ``--``).

    A bare ``-`` (read TEXT or INVITE from stdin; always the last positional)
    is moved behind ``--``: cyclopts would take it for an unknown option.
    """
    out: list[str] = []
    rest = False
    stdin_arg = False
    for tok in argv:
        if rest:
            out.append(tok)
        elif tok == "--":
            rest = True
            out.append(tok)
        elif tok == "-" and not stdin_arg:
            stdin_arg = True
        elif tok == "-w":
            out.append("--workspace")
        elif tok.startswith("-w") and not tok.startswith("--") and len(tok) > 2:
            out.extend(["--workspace", tok[2:].lstrip("=")])
        else:
            out.append(tok)
    if stdin_arg:
        if rest:  # `... -- more -`: keep it where it was relative to the others
            out.append("-")
        else:
            out.extend(["--", "-"])
    return out


def fast_parse(argv: Sequence[str]) -> tuple[str, list[str], dict[str, Any]] | None:
    """Parse a plain hot-verb command line, or return None to let cyclopts do it."""
    for n in (2, 1):
        spec = _HOT.get(tuple(argv[:n]))
        if spec is not None:
            break
    else:
        return None
    target, values, flags, npos = spec
    positional: list[str] = []
    kwargs: dict[str, Any] = {}
    tokens = list(argv[n:])
    i = 0
    only_positional = False
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if only_positional or tok == "-" or not tok.startswith("-"):
            positional.append(tok)
            continue
        if tok == "--":
            only_positional = True
            continue
        name, eq, value = tok.partition("=")
        if name in flags and not eq:
            kwargs[name[2:].replace("-", "_")] = True
            continue
        if name not in values:
            return None
        if not eq:
            if i >= len(tokens):
                return None
            value = tokens[i]
            i += 1
        if name in _CHOICES and value not in _CHOICES[name]:
            return None
        if name in _NUMBERS:
            try:
                kwargs[name[2:]] = _NUMBERS[name](value)
            except ValueError:
                return None
            continue
        kwargs[name[2:].replace("-", "_")] = value
    if len(positional) != npos:
        return None
    return target, positional, kwargs


_GROUPS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    (
        "workspace",
        "Create, join and choose workspaces.",
        [
            ("create", "workspace:create", "Create a workspace on a broker; you become its owner."),
            ("join", "workspace:join", "Join a workspace with an invite link."),
            ("list", "workspace:list_", "Workspaces you belong to; * marks the default."),
            ("use", "workspace:use", "Make a workspace the default."),
            ("leave", "workspace:leave", "Leave a workspace and forget it on this machine."),
        ],
    ),
    (
        "invite",
        "Invite people into a workspace.",
        [("create", "invite:create", "Print an invite link (one use, 24 h by default).")],
    ),
    (
        "peer",
        "Who is in the workspace.",
        [("list", "peer:list_", "Who is in the workspace, online or not.")],
    ),
    (
        "message",
        "Send and read messages.",
        [
            ("send", "message:send", "Send a message to a peer, @group or * for everyone."),
            ("inbox", "message:inbox", "Show received messages; --follow streams new ones."),
            ("status", "message:status", "Delivery state of a sent message, per recipient."),
        ],
    ),
    (
        "outbox",
        "Messages the daemon still has to send, or could not.",
        [
            ("list", "outbox:list_", "Outbox rows: pending, inflight, done, dead, aborted."),
            ("requeue", "outbox:requeue", "Send a dead or stuck message again under a new id."),
        ],
    ),
    (
        "status",
        "Your status as peers see it.",
        [("set", "presence:status_set", "Set your status: idle, working or dnd.")],
    ),
    (
        "summary",
        "Your one-line summary as peers see it.",
        [("set", "presence:summary_set", "Set the summary peers see in `peer list`.")],
    ),
    (
        "daemon",
        "Run and manage the per-user daemon.",
        [
            ("run", "daemon:run", "Run the daemon in the foreground (what units call)."),
            ("start", "daemon:start", "Start the daemon in the background."),
            ("stop", "daemon:stop", "Stop the daemon and wait until it has exited."),
            ("status", "daemon:status", "Is the daemon running; its workspaces and queues."),
            ("logs", "daemon:logs", "Print the end of the daemon log."),
            ("install", "daemon:install", "Install the daemon as a systemd/launchd service."),
            ("uninstall", "daemon:uninstall", "Remove the service that `daemon install` set up."),
        ],
    ),
]
_TOP: list[tuple[str, str, str]] = [
    ("verify", "verify:verify", "Safety number for a peer, to compare out of band."),
    ("send", "message:send", "Alias of `message send`."),
    ("peers", "peer:list_", "Alias of `peer list`."),
    ("inbox", "message:inbox", "Alias of `message inbox`."),
    ("completion", "completion:completion", "Print a bash, zsh or fish completion script."),
]
#: Verbs other areas provide; registered only when their module exists.
_OPTIONAL: list[tuple[str, str, str]] = [
    (
        "doctor",
        "claudemesh.clients.cli.doctor:doctor",
        "Check the installation and explain problems.",
    ),
    ("mcp", "claudemesh.clients.mcp.adapter:main", "The MCP adapter (Claude Code starts it)."),
    ("install", "claudemesh.clients.mcp.install:install", "Register claudemesh with Claude Code."),
    (
        "uninstall",
        "claudemesh.clients.mcp.install:uninstall",
        "Unregister claudemesh from Claude Code.",
    ),
    ("demo", "claudemesh.clients.cli.demo:demo", "A self-contained tour on this machine."),
]


def _lazy(app: App, target: str, name: str, **kw: Any) -> None:
    """Register ``module:function`` under ``name`` if its module exists.

    Verbs that other areas provide (mcp, install, demo, doctor) appear only
    once their module is there, so help and completion never break on them.
    """
    from importlib.util import find_spec

    module = target.partition(":")[0]
    try:
        present = find_spec(module) is not None
    except ImportError:
        present = False
    if present:
        app.command(target, name=name, **kw)


def build_app() -> App:
    """The full cyclopts app; every command is registered by import path."""
    from cyclopts import App, Parameter

    from claudemesh import __version__

    app = App(
        name="claudemesh",
        help="Secure messaging between AI coding sessions and the people who run them.\n\n"
        "Every verb accepts --json (one JSON document on stdout) and, where a workspace "
        "applies, --workspace/-w NAME.",
        version=__version__,
        default_parameter=Parameter(negative=()),
    )

    def group(name: str, help: str, verbs: list[tuple[str, str, str]]) -> None:
        sub = App(name=name, help=help)
        for verb, target, verb_help in verbs:
            # Lazy commands cannot show their docstring until imported: say it here.
            sub.command(f"{_V}.{target}", name=verb, help=verb_help)
        app.command(sub)

    for name, help, verbs in _GROUPS:
        group(name, help, verbs)
    for name, target, help in _TOP:
        app.command(f"{_V}.{target}", name=name, help=help)
    for name, target, help in _OPTIONAL:
        _lazy(app, target, name, help=help)
    return app


def _dispatch(argv: list[str]) -> int:
    fast = fast_parse(argv)
    if fast is not None:
        target, positional, kwargs = fast
        module, _, func = target.partition(":")
        mod = __import__(f"{_V}.{module}", fromlist=[func])
        result: Any = getattr(mod, func)(*positional, **kwargs)
        return result if isinstance(result, int) else 0
    from cyclopts import CycloptsError

    app = build_app()
    try:
        result = app(argv, exit_on_error=False, result_action="return_value")
    except CycloptsError as exc:
        # cyclopts has printed the error on stderr; --json still gets its one document.
        if "--json" in argv:
            from .output import print_json

            print_json({"ok": False, "error": {"code": "usage", "message": str(exc).strip()}})
        return EXIT_USAGE
    if isinstance(result, bool):
        return 0 if result else EXIT_FAILED
    return result if isinstance(result, int) else 0


def run(argv: Sequence[str]) -> int:
    """Run one command line and return its exit code; expected failures never raise."""
    tokens = normalize(argv)
    try:
        return _dispatch(tokens)
    except CliError as exc:
        if "--json" in tokens:
            from .output import print_json

            doc: dict[str, Any] = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            if exc.details:
                doc["error"]["details"] = exc.details
            print_json(doc)
        print(f"claudemesh: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `claudemesh peer list | head`: the reader left; that is not an error.
        return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))
