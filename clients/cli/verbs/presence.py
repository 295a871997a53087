"""``status set`` and ``summary set``: what peers see next to your name."""

from __future__ import annotations

from typing import Literal

from ..common import call
from ..output import print_json, say


def status_set(
    status: Literal["idle", "working", "dnd"],
    /,
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Set your status: idle, working or dnd (do not disturb).

    Parameters
    ----------
    status
        idle, working or dnd.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("status.set", {"status": status}, workspace=workspace, no_start=no_start)
    if json:
        print_json(result)
    else:
        say(f"Status: {status}")
    return 0


def summary_set(
    text: str,
    /,
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Set the one-line summary peers see in `peer list`.

    Parameters
    ----------
    text
        What you are working on.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("summary.set", {"summary": text}, workspace=workspace, no_start=no_start)
    if json:
        print_json(result)
    else:
        say("Summary set.")
    return 0
