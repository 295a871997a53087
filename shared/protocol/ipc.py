"""Frames of the local socket between the daemon and its clients.

Bodies are msgpack maps tagged by ``type`` (see :mod:`.framing` for the
length prefix).  The conversation is:

1. client -> daemon :class:`Hello`; daemon -> client :class:`Welcome`
   (or :class:`Error` and close, e.g. ``api_mismatch``).
2. Any number of :class:`Request` frames, each answered by exactly one
   :class:`Reply` with the same ``id``.  Replies may arrive out of order.
3. A ``subscribe`` request makes the daemon stream :class:`Event` frames
   carrying a ``cursor``; a client that reconnects with its last cursor gets
   everything after it.

Requests are generic (``method`` + ``params``) so new verbs need no new frame
type; the method catalogue lives in ``docs/protocol.md``.  :func:`decode_ipc`
never raises anything but :class:`RemoteProtocolError`.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from . import errors
from .errors import RemoteProtocolError
from .framing import MAX_IPC_FRAME, frame_bytes

#: Bumped when a request or reply changes incompatibly.
IPC_API_VERSION: Final = 1

ClientKind = Literal["cli", "mcp", "test", "other"]

# Stable IPC-only error codes (wire codes from .errors are reused as well).
API_MISMATCH: Final = "api_mismatch"
UNKNOWN_METHOD: Final = "unknown_method"
INVALID_PARAMS: Final = "invalid_params"
NOT_FOUND: Final = "not_found"
AMBIGUOUS: Final = "ambiguous"
TIMEOUT: Final = "timeout"
NO_WORKSPACE: Final = "no_workspace"
BROKER_UNREACHABLE: Final = "broker_unreachable"
CONFLICT: Final = "conflict"


class _Ipc(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    """Base of all local-socket frames."""


class Hello(_Ipc, tag="hello", kw_only=True):
    """First frame from a client."""

    api_version: int = IPC_API_VERSION
    client: str = "other"
    client_version: str = ""
    pid: int = 0
    cwd: str = ""
    session_id: str | None = None


class Welcome(_Ipc, tag="welcome", kw_only=True):
    daemon_version: str
    api_version: int = IPC_API_VERSION
    features: list[str] = msgspec.field(default_factory=list)
    #: Set on a per-workspace socket: the workspace it serves.
    workspace: str | None = None


class Error(_Ipc, tag="error", kw_only=True):
    """A failure that is not the answer to one request (bad frame, bad hello)."""

    code: str
    message: str
    id: int | None = None


class ErrorBody(msgspec.Struct, omit_defaults=True, kw_only=True):
    code: str
    message: str
    #: Machine-readable extras: candidates for an ambiguous name, stored state...
    details: dict[str, Any] | None = None


class Request(_Ipc, tag="req", kw_only=True):
    id: int
    method: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Reply(_Ipc, tag="rep", kw_only=True):
    id: int
    result: Any = None
    error: ErrorBody | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Event(_Ipc, tag="event", kw_only=True):
    """One item of a subscription stream."""

    #: The ``id`` of the ``subscribe`` request this stream answers.
    sub: int
    cursor: int
    kind: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


IpcFrame = Hello | Welcome | Error | Request | Reply | Event

IPC_TYPES: Final[frozenset[str]] = frozenset({"hello", "welcome", "error", "req", "rep", "event"})

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(IpcFrame)


class _TypeOnly(msgspec.Struct):
    type: str


_type_decoder: Final = msgspec.msgpack.Decoder(_TypeOnly)


def encode_ipc(frame: IpcFrame, *, max_frame: int = MAX_IPC_FRAME) -> bytes:
    """Encode ``frame`` with its length prefix, ready to write to the socket."""
    return frame_bytes(_encoder.encode(frame), max_frame=max_frame)


def decode_ipc(body: bytes) -> IpcFrame:
    """Decode one frame body (without its length prefix).

    Raises :class:`RemoteProtocolError` (``malformed``, ``unknown_type``,
    ``invalid_field``) and nothing else.
    """
    try:
        frame: IpcFrame = _decoder.decode(body)
        return frame
    except msgspec.ValidationError as exc:
        try:
            head = _type_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise RemoteProtocolError(
                errors.MALFORMED, "frame must be a map with a string `type`"
            ) from None
        if head.type not in IPC_TYPES:
            raise RemoteProtocolError(
                errors.UNKNOWN_TYPE, f"unknown frame type {head.type!r}"
            ) from None
        raise RemoteProtocolError(errors.INVALID_FIELD, f"{head.type}: {exc}") from None
    except (msgspec.DecodeError, RecursionError, MemoryError):
        raise RemoteProtocolError(errors.MALFORMED, "frame is not valid msgpack") from None


def error_reply(request_id: int, code: str, message: str, **details: Any) -> Reply:
    """Build the reply for a failed request."""
    return Reply(
        id=request_id, error=ErrorBody(code=code, message=message, details=details or None)
    )
