"""The CLI's one exception family and its exit codes (cli.md).

Every expected failure becomes a :class:`CliError` carrying a stable code,
a sentence a person can act on and the process exit code; ``app.main`` is
the single boundary that prints it, so no verb ever shows a traceback for
something the user can fix.
"""

from __future__ import annotations

from typing import Any, Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3


class CliError(Exception):
    """An expected failure: printed as one sentence, never as a traceback."""

    exit_code: int = EXIT_FAILED

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    """The command line itself is wrong (exit 2)."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, code: str = "usage") -> None:
        super().__init__(code, message)


class DaemonUnreachable(CliError):
    """No daemon to talk to and none could be started (exit 3)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, *, code: str = "daemon_unreachable") -> None:
        super().__init__(code, message)


class RequestFailed(CliError):
    """The daemon answered a request with an error body."""
