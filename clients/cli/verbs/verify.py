"""``verify PEER``: the safety number both sides compare out of band."""

from __future__ import annotations

from ..common import call
from ..output import clean, group_digits, print_json, say, short_key


def verify(
    peer: str,
    /,
    *,
    json: bool = False,
    workspace: str | None = None,
    no_start: bool = False,
) -> int:
    """Show the safety number for PEER; compare it with theirs by voice or in person.

    Parameters
    ----------
    peer
        Display name, key or unique key prefix.
    json
        Print one JSON document.
    workspace
        Workspace, short -w (default: the one set with `workspace use`).
    no_start
        Do not start the daemon if it is not running.
    """
    result = call("verify", {"peer": peer}, workspace=workspace, no_start=no_start)
    if json:
        print_json(result)
        return 0
    say(f"Safety number with {clean(str(result.get('peer_name') or peer))}:")
    say(f"  {group_digits(str(result['safety_number']))}")
    say(f"your key  {short_key(result.get('self_pubkey'), 64)}")
    say(f"their key {short_key(result.get('peer_pubkey'), 64)}")
    say("If they read out the same number, nobody is in the middle.")
    return 0
