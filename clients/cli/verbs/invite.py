"""``invite create``."""

from __future__ import annotations

import re
import time
from typing import Literal

from ..common import call
from ..errors import UsageError
from ..output import print_json, say

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)\s*([smhdw])")


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``1w``, ``1h30m`` -> seconds."""
    t = text.strip().lower()
    if t.isdigit():
        seconds = int(t)
    else:
        pos, seconds = 0, 0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise UsageError(
                f"Cannot read the duration {text!r}: use a number with s, m, h, d or w "
                "(e.g. 30m, 24h, 7d)."
            )
    if seconds <= 0:
        raise UsageError(f"The duration {text!r} must be positive.")
    return seconds


def create(
    *,
    role: Literal["member", "admin"] = "member",
    uses: int = 1,
    expires: str = "24h",
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Print an invite link (one use, valid 24 h by default).

    The link carries the workspace key in its secret part: send it only to
    the person you invite, over a channel you trust.

    Parameters
    ----------
    role
        member or admin.
    uses
        How many people may join with it.
    expires
        Lifetime, e.g. 30m, 24h, 7d.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    if uses < 1:
        raise UsageError("--uses must be at least 1.")
    params = {"role": role, "uses": uses, "expires_s": parse_duration(expires)}
    result = call("invite.create", params, workspace=workspace, no_start=no_start)
    if json:
        print_json(result)
        return 0
    say(result["link"])
    exp = result.get("expires_at")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(exp / 1000)) if exp else "?"
    n = result.get("uses", uses)
    say(f"({result.get('role', role)}, {n} use{'s' if n != 1 else ''}, expires {when})")
    return 0
