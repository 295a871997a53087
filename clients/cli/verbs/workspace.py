"""``workspace create | join | list | use | leave``."""

from __future__ import annotations

import sys
from typing import Any

from ..common import call
from ..errors import UsageError
from ..output import clean, print_json, say, short_key, table

DEFAULT_BROKER = "ws://127.0.0.1:7900/ws"


def _describe(ws: dict[str, Any]) -> str:
    return (
        f"{ws.get('name')} (mesh {ws.get('mesh_id')}, you are {ws.get('role')}, "
        f"key {short_key(ws.get('member_pubkey'), 16)}) on {ws.get('broker_url')}"
    )


def create(
    name: str,
    /,
    *,
    broker: str = DEFAULT_BROKER,
    display_name: str | None = None,
    json: bool = False,
    no_start: bool = False,
) -> int:
    """Create a workspace on a broker; you become its owner.

    Parameters
    ----------
    name
        Local name of the workspace.
    broker
        Broker WebSocket URL.
    display_name
        How others see you (default: your user name).
    json
        Print one JSON document.
    no_start
        Do not start the daemon if it is not running.
    """
    if not broker.startswith(("ws://", "wss://")):
        raise UsageError(f"--broker must be a ws:// or wss:// URL, not {broker!r}.")
    params: dict[str, Any] = {"name": name, "broker_url": broker}
    if display_name:
        params["display_name"] = display_name
    result = call("workspace.create", params, no_start=no_start)
    if json:
        print_json(result)
        return 0
    say(f"Created workspace {_describe(result['workspace'])}.")
    say("Invite someone with `claudemesh invite create`.")
    return 0


def join(
    invite: str,
    /,
    *,
    name: str | None = None,
    workspace_name: str | None = None,
    json: bool = False,
    no_start: bool = False,
) -> int:
    """Join a workspace with an invite link.

    Parameters
    ----------
    invite
        The invite link someone gave you; ``-`` reads it from stdin, which keeps
        its secret out of the process list that other local users can read.
    name
        Your display name in the workspace.
    workspace_name
        Local name for the workspace (default: the one in the invite).
    json
        Print one JSON document.
    no_start
        Do not start the daemon if it is not running.
    """
    if invite == "-":
        invite = sys.stdin.readline()
    params: dict[str, Any] = {"link": invite.strip()}
    if name:
        params["display_name"] = name
    if workspace_name:
        params["name"] = workspace_name
    result = call("workspace.join", params, no_start=no_start, timeout=60.0)
    if json:
        print_json(result)
        return 0
    say(f"Joined workspace {_describe(result['workspace'])}.")
    return 0


def list_(*, json: bool = False, no_start: bool = False) -> int:
    """Workspaces you belong to; * marks the default.

    Parameters
    ----------
    json
        Print one JSON document.
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("workspace.list", {}, no_start=no_start)
    if json:
        print_json(result)
        return 0
    spaces = result.get("workspaces", [])
    if not spaces:
        say("No workspaces. Create one with `claudemesh workspace create NAME --broker URL`")
        say("or join one with `claudemesh workspace join INVITE`.")
        return 0
    default = result.get("default")
    rows = [
        [
            "*" if ws.get("name") == default else "",
            str(ws.get("name")),
            clean(str(ws.get("display_name") or "")),
            str(ws.get("role") or ""),
            str(ws.get("link") or ""),
            str(ws.get("broker_url") or ""),
        ]
        for ws in spaces
    ]
    say(table(["", "NAME", "YOU", "ROLE", "LINK", "BROKER"], rows))
    return 0


def use(name: str, /, *, json: bool = False, no_start: bool = False) -> int:
    """Make NAME the default workspace for verbs without --workspace.

    Parameters
    ----------
    name
        Local workspace name.
    json
        Print one JSON document.
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("workspace.use", {"name": name}, no_start=no_start)
    if json:
        print_json(result)
    else:
        say(f"Default workspace: {result.get('default', name)}")
    return 0


def leave(name: str, /, *, force: bool = False, json: bool = False, no_start: bool = False) -> int:
    """Leave workspace NAME on this machine; its files are archived, not deleted.

    Parameters
    ----------
    name
        Local workspace name.
    force
        Leave even though some messages have not reached the broker yet.
    json
        Print one JSON document.
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("workspace.leave", {"name": name, "force": force}, no_start=no_start)
    if json:
        print_json(result)
    else:
        archived = result.get("archived") if isinstance(result, dict) else None
        say(
            f"Left workspace {name}."
            + (f" Its messages and keys are in {archived}" if archived else "")
        )
    return 0
