"""``message send | inbox | status`` (and the ``send`` / ``inbox`` aliases)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Literal

from ..client import connect
from ..common import call, explain
from ..errors import CliError, RequestFailed, UsageError
from ..output import ago, clean, now_ms, print_json, say, short_key, table

State = Literal["accepted", "sent", "delivered", "surfaced"]


def _uuid7() -> str:
    """A UUIDv7 (RFC 9562) for one send.

    Written out here rather than taken from ``protocol.ids`` because that
    module's ``uuid`` and ``threading`` imports cost the send path ~4 ms, and
    one id per process needs no monotonic counter.
    """
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76  # version
        | (rand >> 68) << 64  # rand_a: 12 bits
        | 0b10 << 62  # variant
        | (rand & ((1 << 62) - 1))  # rand_b: 62 bits
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def send(
    to: str,
    text: str,
    /,
    *,
    priority: Literal["now", "next", "low"] = "next",
    id: str | None = None,
    reply_to: str | None = None,
    wait: State | None = None,
    timeout: float = 30.0,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Send TEXT to TO: a display name, key or unique key prefix, @group, or * for everyone.

    Prints the client message id and the state reached (``accepted`` once the
    daemon has it on disk). ``--wait delivered`` blocks until that state or
    the timeout. TEXT ``-`` reads the body from stdin.

    Parameters
    ----------
    to
        Recipient: display name, 64-hex key, unique key prefix, @group or *.
    text
        The message body; ``-`` reads it from stdin.
    priority
        now, next or low.
    id
        Client message id (default: a new UUIDv7). Re-sending with the same id is a no-op.
    reply_to
        Id of the message this answers.
    wait
        Block until this delivery state (accepted, sent, delivered, surfaced).
    timeout
        Seconds to wait with --wait.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    # `echo hi | claudemesh send bob -`: the pipe's final newline is not part of the message.
    body = sys.stdin.read().removesuffix("\n") if text == "-" else text
    if not body:
        raise UsageError("The message is empty.")
    if timeout <= 0:
        raise UsageError("--timeout must be positive.")
    # The id is made here, not by the daemon: if the answer is lost (daemon
    # killed after its commit, a timeout), the user can retry with it and the
    # daemon's idempotency makes the retry harmless.
    cmid = id if id is not None else _uuid7()
    params: dict[str, Any] = {
        "to": to,
        "body": body,
        "priority": priority,
        "client_message_id": cmid,
    }
    if reply_to is not None:
        params["reply_to"] = reply_to
    if workspace is not None:
        params["workspace"] = workspace
    with connect(autostart=not no_start) as conn:
        try:
            try:
                result = conn.call("message.send", params)
            except RequestFailed:
                raise
            except CliError as exc:
                exc.message = (
                    f"{exc.message} The message may have been accepted: retry with "
                    f"--id {cmid} (same text, same recipient) so it cannot be sent twice."
                )
                raise
            status = None
            if wait is not None and wait != "accepted":
                status = conn.call(
                    "message.wait",
                    {
                        "client_message_id": result["client_message_id"],
                        "state": wait,
                        "timeout_s": timeout,
                        **({"workspace": workspace} if workspace else {}),
                    },
                    timeout=timeout + 10,
                )
        except RequestFailed as exc:
            raise explain(exc) from None
    if json:
        print_json({**result, "status": status} if status is not None else result)
        return 0
    names = ", ".join(
        r.get("display_name") or short_key(r.get("pubkey")) for r in result.get("recipients", [])
    )
    dup = " (duplicate: already sent with this id)" if result.get("duplicate") else ""
    to_text = f" to {clean(names)}" if names else ""
    say(f"{result['client_message_id']} {result['state']}{to_text}{dup}")
    if status is not None:
        say(f"{status['client_message_id']} {status['state']}")
        if status.get("state") in ("failed", "expired"):
            return 1
    return 0


def _oldest_first(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon answers newest first (the latest N); people read top to bottom."""
    return sorted(messages, key=lambda m: (m.get("cursor") or 0, m.get("received_at") or 0))


def _message_line(m: dict[str, Any], now: int) -> str:
    marker = " " if m.get("seen") else "*"
    who = clean(m.get("from_name") or short_key(m.get("from_pubkey")))
    when = ago(m.get("created_at"), now)
    topic = f" #{m['topic']}" if m.get("topic") else ""
    return f"{marker} {when:>8}  {who}{topic}: {clean(m.get('body', ''))}".rstrip()


def inbox(
    *,
    unread: bool = False,
    limit: int = 50,
    follow: bool = False,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Show received messages, newest last; ``*`` marks ones not seen before.

    ``--follow`` keeps printing new messages until interrupted (with
    ``--json``, one JSON document per line).

    Parameters
    ----------
    unread
        Only messages not seen before.
    limit
        At most this many messages.
    follow
        Keep streaming new messages until Ctrl-C.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    if limit <= 0:
        raise UsageError("--limit must be positive.")
    params: dict[str, Any] = {"unread": unread, "limit": limit}
    if workspace is not None:
        params["workspace"] = workspace
    if not follow:
        result = call("message.inbox", params, no_start=no_start)
        if json:
            print_json(result)
            return 0
        messages = _oldest_first(result.get("messages", []))
        if not messages:
            say("No messages." if not unread else "No unread messages.")
        now = now_ms()
        for m in messages:
            say(_message_line(m, now))
        return 0
    return _follow(params, json=json, no_start=no_start)


def _follow(params: dict[str, Any], *, json: bool, no_start: bool) -> int:
    # What is printed counts as read: seen, and surfaced for the sender.
    sub: dict[str, Any] = {"kinds": ["message"], "mark_seen": True}
    if "workspace" in params:
        sub["workspace"] = params["workspace"]
    try:
        with connect(autostart=not no_start) as conn:
            try:
                # Subscribe before reading the inbox so nothing falls between the two.
                sub_id = conn.start_subscription(sub)
                shown: set[Any] = set()
                if not json:
                    now = now_ms()
                    for m in _oldest_first(conn.call("message.inbox", params).get("messages", [])):
                        shown.add(m.get("broker_message_id"))
                        say(_message_line(m, now))
                for event in conn.events(sub_id):
                    if event.kind != "message":
                        continue
                    if event.data.get("broker_message_id") in shown - {None}:
                        continue
                    if json:
                        print_json(event.data)
                    else:
                        say(_message_line(event.data, now_ms()))
            except RequestFailed as exc:
                raise explain(exc) from None
    except KeyboardInterrupt:
        return 0
    return 0


def status(
    id: str,
    /,
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Delivery state of a sent message, per recipient.

    States in order: accepted (your disk), sent (broker's disk), delivered
    (recipient's daemon), surfaced (seen by a session or the user); or
    failed / expired with a reason.

    Parameters
    ----------
    id
        The client message id that `message send` printed.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call(
        "message.status", {"client_message_id": id}, workspace=workspace, no_start=no_start
    )
    if json:
        print_json(result)
        return 0
    now = now_ms()
    say(f"{result['client_message_id']}: {result['state']}")
    if result.get("last_error"):
        say(f"last error: {clean(str(result['last_error']))}")
    rows = [
        [
            clean(r.get("display_name") or "") or short_key(r.get("pubkey")),
            short_key(r.get("pubkey")),
            str(r.get("state", "")),
            ago(r.get("at"), now),
            clean(str(r.get("reason") or "")),
        ]
        for r in result.get("recipients", [])
    ]
    if rows:
        say(table(["RECIPIENT", "KEY", "STATE", "SINCE", "REASON"], rows))
    return 0
