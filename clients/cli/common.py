"""What every verb shares: one request to the daemon, errors people can act on.

Verb modules are plain functions (no cyclopts import) so the fast path in
:mod:`.app` can call them without loading the parser; cyclopts reads the
same signatures and docstrings for ``--help`` and completion.
"""

from __future__ import annotations

from typing import Any

from claudemesh.shared.protocol import ipc

from .client import connect
from .errors import CliError, RequestFailed
from .output import short_key


def call(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    workspace: str | None = None,
    no_start: bool = False,
    timeout: float | None = 30.0,
) -> Any:
    """Open the control socket (starting the daemon if allowed), make one request."""
    params = dict(params or {})
    if workspace is not None:
        params["workspace"] = workspace
    with connect(autostart=not no_start) as conn:
        try:
            return conn.call(method, params, timeout=timeout)
        except RequestFailed as exc:
            raise explain(exc) from None


def sentence(text: str) -> str:
    """The daemon's messages are phrases; print them as sentences."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?:" else text + "."


def explain(exc: RequestFailed) -> CliError:
    """Turn an error reply into a sentence that says what to do next."""
    details = exc.details or {}
    candidates = details.get("candidates") or []
    message = sentence(exc.message)
    if exc.code == ipc.NOT_FOUND and candidates:
        names = ", ".join(
            str(c.get("display_name", c)) if isinstance(c, dict) else str(c) for c in candidates
        )
        return RequestFailed(exc.code, f"{message} Did you mean: {names}?", details=details)
    if exc.code == ipc.NOT_FOUND and "candidates" in details:
        return RequestFailed(
            exc.code, f"{message} Check `claudemesh peer list` for names.", details=details
        )
    if exc.code == ipc.TIMEOUT and details.get("state"):
        return RequestFailed(
            exc.code,
            f"{message} Last state: {details['state']}; "
            f"see `claudemesh message status {details.get('client_message_id', 'ID')}`.",
            details=details,
        )
    if exc.code == ipc.AMBIGUOUS and candidates:
        lines = [message, "It matches:"]
        for c in candidates:
            if isinstance(c, dict):
                lines.append(f"  {short_key(c.get('pubkey'), 16)}  {c.get('display_name', '')}")
            else:
                lines.append(f"  {c}")
        lines.append("Use a longer key prefix or the full key.")
        return RequestFailed(exc.code, "\n".join(lines), details=details)
    if exc.code == ipc.NO_WORKSPACE:
        choices = details.get("workspaces")
        if not choices:
            return RequestFailed(
                exc.code,
                "You have no workspace yet. Create one with "
                "`claudemesh workspace create NAME --broker URL` or join one with "
                "`claudemesh workspace join INVITE`.",
                details=details,
            )
        return RequestFailed(
            exc.code,
            f"{message} Your workspaces: {', '.join(map(str, choices))}. Pick one with "
            "--workspace NAME, or set a default with `claudemesh workspace use NAME`.",
            details=details,
        )
    return RequestFailed(exc.code, message, details=exc.details)
