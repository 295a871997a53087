"""Invite links and sealed join payloads, as pure functions.

A link is ``claudemesh://join/<mesh id>/<invite id>?broker=<ws url>#<secret>``.
The 32-byte invite secret (base64url, no padding) sits in the fragment,
which no URL-aware tool ever sends to a server; the daemon sends neither
the secret nor anything derived from it except the claim *public* key.

The sealed payload is ``base64(nonce || secretbox)`` under
``crypto.invite_payload_key(secret, invite_id)`` and holds the workspace
root key, so only link holders can open it.  It also repeats the signed
invite terms and the admin's key, so the joiner checks the admin's
signature against values the broker could not have chosen.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlsplit

import nacl.exceptions
import nacl.secret
import nacl.utils

from claudemesh.shared.protocol import crypto

SCHEME: Final = "claudemesh"
_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class InviteLinkError(ValueError):
    """The link is malformed; the message names the part that is wrong."""


@dataclass(frozen=True)
class InviteLink:
    broker_url: str
    mesh_id: str
    invite_id: str
    secret: bytes
    #: When the inviting admin's member key is derived from an id other than
    #: the mesh id (the broker assigned its own id at creation): that id and
    #: the admin's public key, so the same person on another machine (same
    #: root secret) recognises itself and joins as the same member.
    key_id: str | None = None
    key_pubkey: str | None = None

    def __str__(self) -> str:
        frag = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()
        extra = ""
        if self.key_id and self.key_pubkey:
            extra = f"&kid={quote(self.key_id, safe='')}&kpk={self.key_pubkey}"
        return (
            f"{SCHEME}://join/{self.mesh_id}/{self.invite_id}"
            f"?broker={quote(self.broker_url, safe='')}{extra}#{frag}"
        )


def parse_link(text: str) -> InviteLink:
    """Parse and validate a link; raises :class:`InviteLinkError` naming the bad part."""
    text = text.strip()
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InviteLinkError(f"the invite link is not a URL: {exc}") from None
    if parts.scheme != SCHEME:
        raise InviteLinkError(
            f"the invite link must start with {SCHEME}://join/ (scheme was {parts.scheme!r})"
        )
    if parts.netloc != "join":
        raise InviteLinkError("the invite link must start with claudemesh://join/")
    segs = [s for s in parts.path.split("/") if s]
    if len(segs) != 2:
        raise InviteLinkError(
            f"the invite link path must be /<workspace id>/<invite id>; it has {len(segs)} part(s)"
        )
    mesh_id, invite_id = segs
    if not _ID_RE.match(mesh_id):
        raise InviteLinkError(f"the workspace id in the invite link is malformed: {mesh_id!r}")
    if not _ID_RE.match(invite_id):
        raise InviteLinkError(f"the invite id in the invite link is malformed: {invite_id!r}")
    query = parse_qs(parts.query)
    brokers = query.get("broker", [])
    if len(brokers) != 1:
        raise InviteLinkError("the invite link has no broker URL (?broker=ws://...)")
    broker = brokers[0]
    b = urlsplit(broker)
    if b.scheme not in ("ws", "wss") or not b.netloc:
        raise InviteLinkError(f"the broker URL in the invite link is not a ws:// URL: {broker!r}")
    frag = parts.fragment
    if not frag:
        raise InviteLinkError("the invite link has no secret (the part after #); copy it whole")
    try:
        secret = base64.urlsafe_b64decode(frag + "=" * (-len(frag) % 4))
    except (binascii.Error, ValueError):
        raise InviteLinkError("the secret in the invite link (after #) is not base64url") from None
    if len(secret) != 32:
        raise InviteLinkError(
            f"the secret in the invite link (after #) is {len(secret)} bytes, expected 32; "
            "was the link cut short?"
        )
    kid = query.get("kid", [None])[0]
    kpk = query.get("kpk", [None])[0]
    if kid is not None and (not _ID_RE.match(kid) or kpk is None or not _is_hex64(kpk)):
        raise InviteLinkError("the key id part of the invite link (kid=, kpk=) is malformed")
    return InviteLink(
        broker_url=broker,
        mesh_id=mesh_id,
        invite_id=invite_id,
        secret=secret,
        key_id=kid,
        key_pubkey=kpk if kid is not None else None,
    )


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def claim_keypair(secret: bytes, invite_id: str) -> crypto.KeyPair:
    return crypto.KeyPair(crypto.invite_claim_seed(secret, invite_id))


def seal_payload(secret: bytes, invite_id: str, payload: dict[str, Any]) -> str:
    key = crypto.invite_payload_key(secret, invite_id)
    nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
    box = nacl.secret.SecretBox(key).encrypt(json.dumps(payload).encode(), nonce)
    return base64.b64encode(bytes(box)).decode()


def open_payload(secret: bytes, invite_id: str, sealed: str) -> dict[str, Any]:
    """Open a sealed payload; raises ``ValueError`` with a sentence on failure."""
    key = crypto.invite_payload_key(secret, invite_id)
    try:
        raw = base64.b64decode(sealed.encode(), validate=True)
        data = nacl.secret.SecretBox(key).decrypt(raw)
        payload: dict[str, Any] = json.loads(data)
    except (binascii.Error, ValueError, UnicodeEncodeError, nacl.exceptions.CryptoError):
        raise ValueError(
            "the invite payload does not open with this link's secret "
            "(wrong link, or the broker returned something else)"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError("the invite payload is not an object")
    return payload
