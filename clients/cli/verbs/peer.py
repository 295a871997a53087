"""``peer list`` (alias ``peers``)."""

from __future__ import annotations

from typing import Any

from ..common import call
from ..output import OFFLINE, ONLINE, ago, now_ms, print_json, say, short_key, table


def _row(p: dict[str, Any], now: int) -> list[str]:
    name = p.get("display_name") or ""
    if p.get("is_self"):
        name += " (you)"
    if p.get("is_session"):
        name += " [session]"
    seen = "now" if p.get("online") else ago(p.get("last_seen_at"), now)
    return [
        ONLINE if p.get("online") else OFFLINE,
        name,
        short_key(p.get("pubkey")),
        str(p.get("status") or "-"),
        seen,
        str(p.get("summary") or ""),
    ]


def list_(
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Who is in the workspace, online (●) or not (○).

    Parameters
    ----------
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("peer.list", {}, workspace=workspace, no_start=no_start)
    if json:
        print_json(result)
        return 0
    peers = result.get("peers", [])
    if not peers:
        say("No peers yet. Invite someone with `claudemesh invite create`.")
        return 0
    # Online first, then by name, so the people you can reach now lead.
    peers.sort(key=lambda p: (not p.get("online"), str(p.get("display_name") or "").lower()))
    now = now_ms()
    say(table(["", "NAME", "KEY", "STATUS", "SEEN", "SUMMARY"], [_row(p, now) for p in peers]))
    return 0
