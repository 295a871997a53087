"""Error types of the protocol package and their stable codes.

Two families, as in h11: :class:`RemoteProtocolError` means the peer sent
something wrong (the codes go on the wire and never change), and
:class:`LocalProtocolError` means this process misused the API.  Every error
carries a stable snake_case ``code`` and a sentence a person can act on.
"""

from __future__ import annotations

from typing import Final

# Stable wire codes.  Add new ones; never rename.
MALFORMED: Final = "malformed"
UNKNOWN_TYPE: Final = "unknown_type"
INVALID_FIELD: Final = "invalid_field"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
FRAME_TOO_LARGE: Final = "frame_too_large"
NO_HELLO: Final = "no_hello"
TIMESTAMP_SKEW: Final = "timestamp_skew"
BAD_SIGNATURE: Final = "bad_signature"
UNAUTHORIZED: Final = "unauthorized"
REVOKED: Final = "revoked"
RATE_LIMITED: Final = "rate_limited"
IDEMPOTENCY_CONFLICT: Final = "idempotency_conflict"
INVITE_NOT_FOUND: Final = "invite_not_found"
INVITE_EXPIRED: Final = "invite_expired"
INVITE_REVOKED: Final = "invite_revoked"
INVITE_EXHAUSTED: Final = "invite_exhausted"
FORBIDDEN: Final = "forbidden"
UNKNOWN_TARGET: Final = "unknown_target"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
INTERNAL: Final = "internal"


class ProtocolError(Exception):
    """Root of every error raised by :mod:`claudemesh.shared.protocol`."""

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class LocalProtocolError(ProtocolError):
    """This process tried to do something the protocol forbids."""


class CryptoError(ProtocolError):
    """A signature, box or key failed to verify, open or parse."""
