"""Broker wire frames: JSON objects over one WebSocket, one per text frame.

Rules of this module:

- Each frame is a ``msgspec.Struct`` tagged by its ``type``; the JSON names
  are exactly those of ``protocol.md`` (camelCase, except the snake_case
  ``client_message_id`` / ``request_fingerprint`` the v0.1 protocol uses).
- New behaviour is an optional field (with a default, omitted when unset) or
  a new frame type.  Unknown fields are ignored, so older and newer peers
  interoperate; fields are never retyped.
- :func:`decode_frame` turns *any* bytes into a frame or a
  :class:`~.errors.RemoteProtocolError` with a stable code; it never raises
  anything else.  :func:`encode_frame` is its inverse.
- Canonical strings that get signed live here too, next to the frames that
  carry their signatures, so the broker and the daemon build them one way.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec

from . import errors
from .errors import RemoteProtocolError

#: Default cap on the decoded ciphertext of one ``send`` (protocol.md).
MAX_CIPHERTEXT: Final = 64 * 1024
#: Room for the JSON envelope around a maximal ciphertext (base64 is 4/3).
FRAME_OVERHEAD: Final = 16 * 1024


def max_frame_bytes(max_ciphertext: int = MAX_CIPHERTEXT) -> int:
    """WebSocket message cap that still admits a maximal ``send``."""
    return (max_ciphertext * 4) // 3 + 8 + FRAME_OVERHEAD


Priority = Literal["now", "next", "low"]
PeerStatus = Literal["idle", "working", "dnd"]
Role = Literal["admin", "member"]
ReceiptState = Literal["delivered", "surfaced", "expired", "failed"]


class _Frame(msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, kw_only=True):
    """Base of all broker frames."""


class GroupRef(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: str
    role: str | None = None


# ---------------------------------------------------------------- handshake


class Hello(_Frame, tag="hello", kw_only=True):
    """peer -> broker: a signed claim to be ``pubkey``, member of ``mesh_id``."""

    mesh_id: str
    member_id: str
    pubkey: str
    session_id: str
    pid: int
    cwd: str
    timestamp: int
    signature: str
    session_pubkey: str | None = None
    display_name: str | None = None
    peer_type: str | None = None
    channel: str | None = None
    model: str | None = None
    groups: list[GroupRef] | None = None
    hostname: str | None = None
    protocol_version: int | None = None
    capabilities: list[str] | None = None
    #: Stable per machine, so one member on two machines gets a queue row each.
    device_id: str | None = None


class Limits(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    max_ciphertext: int = MAX_CIPHERTEXT
    max_frame: int = 0
    rate_per_second: float = 0.0
    rate_burst: int = 0


class HelloAck(_Frame, tag="hello_ack", kw_only=True):
    presence_id: str
    member_display_name: str
    member_id: str | None = None
    mesh_id: str | None = None
    role: str | None = None
    server_version: str | None = None
    server_time: int | None = None
    features: list[str] | None = None
    limits: Limits | None = None


# ----------------------------------------------------------------- messages


class Send(_Frame, tag="send", kw_only=True):
    """peer -> broker: one encrypted envelope for ``target_spec``."""

    id: str
    target_spec: str
    #: Required (no default) so it is always on the wire, as v0.1 peers expect.
    priority: Priority
    nonce: str
    ciphertext: str
    client_message_id: str | None = msgspec.field(default=None, name="client_message_id")
    request_fingerprint: str | None = msgspec.field(default=None, name="request_fingerprint")
    reply_to_id: str | None = None
    mentions: list[str] | None = None
    #: Topic id for ``#topic`` sends whose body is a topic secretbox.
    topic: str | None = None
    #: Key epoch of a topic secretbox.
    epoch: int | None = None
    #: When the sender speaks for one of its sessions: that session's key.
    from_session: str | None = None


class ErrorInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    code: str
    message: str = ""
    #: With ``rate_limited``: how long to wait before trying again.
    retry_after_ms: int | None = msgspec.field(default=None, name="retryAfterMs")


class Ack(_Frame, tag="ack", kw_only=True):
    """broker -> peer: the send is on the broker's disk (or refused)."""

    id: str
    message_id: str = ""
    #: Required so it is always on the wire (v0.1 peers read it).
    queued: bool
    client_message_id: str | None = msgspec.field(default=None, name="client_message_id")
    duplicate: bool = False
    recipients: int | None = None
    error: ErrorInfo | None = None


class Push(_Frame, tag="push", kw_only=True):
    """broker -> peer: a stored envelope (or a system notice)."""

    message_id: str
    mesh_id: str
    sender_pubkey: str
    priority: Priority
    # Empty in system notices; lenient on input but always encoded (v0.1).
    nonce: str = ""
    ciphertext: str = ""
    created_at: str = ""
    client_message_id: str | None = msgspec.field(default=None, name="client_message_id")
    sender_member_pubkey: str | None = None
    sender_name: str | None = None
    topic: str | None = None
    epoch: int | None = None
    reply_to_id: str | None = None
    subtype: str | None = None
    event: str | None = None
    event_data: dict[str, Any] | None = None
    #: The key this copy was addressed to (a member or one of its sessions).
    target_pubkey: str | None = None
    #: How the sender addressed it: a key, ``*``, ``@group`` or ``#topic``.
    target_spec: str | None = None


class ClientAck(_Frame, tag="client_ack", kw_only=True):
    """peer -> broker: stored durably; stop pushing this row."""

    broker_message_id: str | None = None
    client_message_id: str | None = None
    receipt_id: str | None = None


class Receipt(_Frame, tag="receipt", kw_only=True):
    """Delivery progress.

    recipient -> broker: ``{messageId, state: "surfaced"}`` or
    ``{messageId, state: "failed", reason}`` (a push it could not open);
    broker -> sender: every field, acked with ``client_ack {receiptId}``.
    """

    message_id: str
    state: ReceiptState
    receipt_id: str | None = None
    client_message_id: str | None = msgspec.field(default=None, name="client_message_id")
    recipient_pubkey: str | None = None
    at: int | None = None
    reason: str | None = None


# ----------------------------------------------------------------- presence


class ListPeers(_Frame, tag="list_peers", kw_only=True):
    id: str | None = None


class PeerInfo(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    # The v0.1 fields are lenient on input but always encoded (see encode_frame).
    pubkey: str
    display_name: str
    status: PeerStatus = "idle"
    summary: str = ""
    groups: list[GroupRef] = msgspec.field(default_factory=list)
    session_id: str = ""
    connected_at: str = ""
    cwd: str | None = None
    peer_type: str | None = None
    channel: str | None = None
    model: str | None = None
    member_pubkey: str | None = None
    # Extensions.
    member_id: str | None = None
    online: bool = False
    last_seen_at: str | None = None
    role: str | None = None
    hostname: str | None = None
    device_id: str | None = None
    #: True for a Claude session presence (its ``pubkey`` is a session key).
    is_session: bool = False


class PeersList(_Frame, tag="peers_list", kw_only=True):
    peers: list[PeerInfo]
    id: str | None = None


class SetStatus(_Frame, tag="set_status", kw_only=True):
    status: PeerStatus
    #: Session key when the status is a session's rather than the member's.
    session_pubkey: str | None = None


class SetSummary(_Frame, tag="set_summary", kw_only=True):
    summary: str
    session_pubkey: str | None = None


class JoinGroup(_Frame, tag="join_group", kw_only=True):
    name: str
    role: str | None = None


class LeaveGroup(_Frame, tag="leave_group", kw_only=True):
    name: str


class Error(_Frame, tag="error", kw_only=True):
    code: str
    message: str = ""
    id: str | None = None
    retry_after_ms: int | None = None


# ----------------------------------------------------- workspaces, invites


class MeshCreate(_Frame, tag="mesh_create", kw_only=True):
    """Allowed before hello: create a mesh; the signer becomes its admin.

    ``signature`` is by the creator's member key over
    :func:`mesh_create_canonical`.
    """

    id: str
    name: str
    pubkey: str
    timestamp: int
    signature: str
    display_name: str = ""
    create_token: str | None = None
    #: Extension: the id the creator proposes (its member key derives from
    #: the mesh id, so it must know it before signing).  A broker that
    #: ignores it assigns its own and the daemon keeps its key id apart.
    mesh_id: str | None = None


class MeshCreated(_Frame, tag="mesh_created", kw_only=True):
    id: str
    mesh_id: str
    member_id: str


class InvitePut(_Frame, tag="invite_put", kw_only=True):
    """admin -> broker: store an invite whose payload only the link can open."""

    id: str
    invite_id: str
    role: Role = "member"
    uses: int = 1
    expires_at: int
    claim_pubkey: str
    sealed: str
    signature: str


class InviteRevoke(_Frame, tag="invite_revoke", kw_only=True):
    id: str
    invite_id: str


class InviteClaim(_Frame, tag="invite_claim", kw_only=True):
    """Allowed before hello: signed by the claim key derived from the link."""

    id: str
    mesh_id: str
    invite_id: str
    member_pubkey: str
    display_name: str
    timestamp: int
    signature: str


class InviteClaimed(_Frame, tag="invite_claimed", kw_only=True):
    """broker -> joiner: enough to verify the admin's signature and open."""

    id: str
    mesh_id: str
    member_id: str
    invite_id: str
    role: Role
    uses: int
    expires_at: int
    claim_pubkey: str
    sealed: str
    admin_pubkey: str
    admin_signature: str


class Ok(_Frame, tag="ok", kw_only=True):
    """Generic success for extension requests that carry an ``id``."""

    id: str


# ---------------------------------------------------------- session presence


class SessionAttestation(msgspec.Struct, rename="camel", kw_only=True):
    parent_pk: str
    session_pk: str
    expires_at: int
    signature: str


class SessionHello(_Frame, tag="session_hello", kw_only=True):
    """Over the member's connection: present a session key as its own peer.

    ``signature`` is by the session key over
    :func:`session_hello_canonical`; the attestation by the member key over
    :func:`session_attest_canonical`.
    """

    session_pubkey: str
    session_id: str
    timestamp: int
    signature: str
    attestation: SessionAttestation
    id: str | None = None
    pid: int | None = None
    cwd: str | None = None
    display_name: str | None = None
    peer_type: str | None = None


class SessionBye(_Frame, tag="session_bye", kw_only=True):
    session_pubkey: str
    id: str | None = None


Frame = (
    Hello
    | HelloAck
    | Send
    | Ack
    | Push
    | ClientAck
    | Receipt
    | ListPeers
    | PeersList
    | SetStatus
    | SetSummary
    | JoinGroup
    | LeaveGroup
    | Error
    | MeshCreate
    | MeshCreated
    | InvitePut
    | InviteRevoke
    | InviteClaim
    | InviteClaimed
    | Ok
    | SessionHello
    | SessionBye
)

FRAME_TYPES: Final[frozenset[str]] = frozenset(t.__struct_config__.tag for t in Frame.__args__)

_decoder: Final = msgspec.json.Decoder(Frame)
_encoder: Final = msgspec.json.Encoder()


class _TypeOnly(msgspec.Struct):
    type: str


_type_decoder: Final = msgspec.json.Decoder(_TypeOnly)
_FIELD_RE: Final = re.compile(r"`\$\.([A-Za-z0-9_]+)")
_MISSING_RE: Final = re.compile(r"missing required field `([^`]+)`")


def encode_frame(frame: Frame) -> bytes:
    """Serialise a frame to the JSON bytes sent in one WebSocket message.

    Defaults are omitted to keep frames small, except v0.1 fields that v0.1
    clients read unconditionally: those are put back when they were empty.
    """
    if isinstance(frame, Push) and not (frame.nonce and frame.ciphertext and frame.created_at):
        obj = msgspec.to_builtins(frame)
        for key in ("nonce", "ciphertext", "createdAt"):
            obj.setdefault(key, "")
        return _encoder.encode(obj)
    if isinstance(frame, PeersList):
        obj = msgspec.to_builtins(frame)
        for peer in obj["peers"]:
            for key, value in _PEER_V01_DEFAULTS:
                peer.setdefault(key, value() if callable(value) else value)
        return _encoder.encode(obj)
    return _encoder.encode(frame)


_PEER_V01_DEFAULTS: Final[tuple[tuple[str, Any], ...]] = (
    ("status", "idle"),
    ("summary", ""),
    ("groups", list),
    ("sessionId", ""),
    ("connectedAt", ""),
)


def decode_frame(data: bytes | str, *, max_frame: int | None = None) -> Frame:
    """Parse one WebSocket message.

    Raises :class:`RemoteProtocolError` with code ``frame_too_large``,
    ``malformed``, ``unknown_type`` or ``invalid_field`` -- and nothing else.
    """
    if max_frame is not None and len(data) > max_frame:
        raise RemoteProtocolError(
            errors.FRAME_TOO_LARGE, f"frame of {len(data)} bytes exceeds {max_frame}"
        )
    try:
        frame: Frame = _decoder.decode(data)
        return frame
    except msgspec.DecodeError as exc:
        raise _classify(data, exc) from None
    except (RecursionError, MemoryError):  # pathological nesting
        raise RemoteProtocolError(errors.MALFORMED, "frame is not valid JSON") from None


def _classify(data: bytes | str, exc: msgspec.DecodeError) -> RemoteProtocolError:
    if not isinstance(exc, msgspec.ValidationError):
        return RemoteProtocolError(errors.MALFORMED, "frame is not valid JSON")
    try:
        head = _type_decoder.decode(data)
    except msgspec.ValidationError:
        return RemoteProtocolError(
            errors.MALFORMED, "frame must be a JSON object with a string `type`"
        )
    except (msgspec.DecodeError, RecursionError):
        return RemoteProtocolError(errors.MALFORMED, "frame is not valid JSON")
    if head.type not in FRAME_TYPES:
        return RemoteProtocolError(errors.UNKNOWN_TYPE, f"unknown frame type {head.type!r}")
    text = str(exc)
    m = _MISSING_RE.search(text) or _FIELD_RE.search(text)
    field = m.group(1) if m else "?"
    return RemoteProtocolError(errors.INVALID_FIELD, f"{head.type}: field `{field}`: {text}")


def b64_decoded_len(b64: str) -> int:
    """Length of the bytes a padded base64 string decodes to, without decoding."""
    n = len(b64)
    if n == 0:
        return 0
    pad = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return (n * 3) // 4 - pad


def check_send(frame: Send, *, max_ciphertext: int = MAX_CIPHERTEXT) -> None:
    """Enforce the ``send`` limits that need no state.

    Raises ``payload_too_large`` or ``invalid_field`` as :class:`RemoteProtocolError`.
    """
    size = b64_decoded_len(frame.ciphertext)
    if size > max_ciphertext:
        raise RemoteProtocolError(
            errors.PAYLOAD_TOO_LARGE,
            f"ciphertext of {size} bytes exceeds the limit of {max_ciphertext}",
        )
    if not frame.target_spec:
        raise RemoteProtocolError(errors.INVALID_FIELD, "send: field `targetSpec` is empty")


# ------------------------------------------------------- canonical strings

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def is_pubkey_hex(value: str) -> bool:
    """True for a 64-char lowercase hex ed25519 public key."""
    return len(value) == 64 and _HEX64.fullmatch(value) is not None


def hello_canonical(mesh_id: str, member_id: str, pubkey: str, timestamp: int) -> str:
    """The string a ``hello`` signature covers (v0.1 compatible)."""
    return f"{mesh_id}|{member_id}|{pubkey}|{timestamp}"


def session_hello_canonical(mesh_id: str, parent_pk: str, session_pk: str, timestamp: int) -> str:
    return f"claudemesh-session-hello|{mesh_id}|{parent_pk}|{session_pk}|{timestamp}"


def session_attest_canonical(parent_pk: str, session_pk: str, expires_at: int) -> str:
    return f"claudemesh-session-attest|{parent_pk}|{session_pk}|{expires_at}"


def mesh_create_canonical(name: str, pubkey: str, timestamp: int) -> str:
    return f"claudemesh-mesh-create|{name}|{pubkey}|{timestamp}"


def invite_canonical(
    mesh_id: str,
    invite_id: str,
    role: str,
    uses: int,
    expires_at: int,
    claim_pubkey: str,
    sealed_sha256_hex: str,
) -> str:
    """What the admin signs for ``invite_put`` and the joiner verifies."""
    return (
        f"claudemesh-invite|{mesh_id}|{invite_id}|{role}|{uses}|{expires_at}"
        f"|{claim_pubkey}|{sealed_sha256_hex}"
    )


def invite_claim_canonical(mesh_id: str, invite_id: str, member_pubkey: str, timestamp: int) -> str:
    return f"claudemesh-invite-claim|{mesh_id}|{invite_id}|{member_pubkey}|{timestamp}"
