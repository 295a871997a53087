"""``outbox list | requeue ID``: what the daemon still has to send, and a way out of ``dead``.

A message the broker refused for good (``dead``) or one that is stuck stays
in the outbox; ``requeue`` aborts it (kept for audit) and sends its payload
again under a fresh client message id.
"""

from __future__ import annotations

from typing import Literal

from ..common import call
from ..output import ago, now_ms, print_json, say, table

State = Literal["pending", "inflight", "done", "dead", "aborted"]


def list_(
    *,
    state: State | None = None,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """List outbox rows, newest first.

    Parameters
    ----------
    state
        Only rows in this state (dead ones are the ones to requeue).
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call(
        "outbox.list", {"state": state} if state else {}, workspace=workspace, no_start=no_start
    )
    if json:
        print_json(result)
        return 0
    rows = result.get("rows", [])
    if not rows:
        say("The outbox is empty." if not state else f"No {state} messages.")
        return 0
    now = now_ms()
    say(
        table(
            ["ID", "STATE", "TO", "TRIES", "CREATED", "LAST ERROR"],
            [
                [
                    str(r.get("client_message_id", "")),
                    str(r.get("state", "")),
                    str(r.get("target", "")),
                    str(r.get("attempts", 0)),
                    ago(r.get("created_at"), now),
                    str(r.get("last_error") or ""),
                ]
                for r in rows
            ],
        )
    )
    return 0


def requeue(
    id: str,
    /,
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Abort outbox row ID (kept for audit) and send its message again under a new id.

    Parameters
    ----------
    id
        Client message id of a pending, inflight or dead row.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call(
        "outbox.requeue", {"client_message_id": id}, workspace=workspace, no_start=no_start
    )
    if json:
        print_json(result)
        return 0
    say(f"{result['old_client_message_id']} aborted; sent again as {result['client_message_id']}")
    return 0
