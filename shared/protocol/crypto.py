"""Keys and crypto of architecture.md section 5, pure functions over bytes.

Every secret key here is derived, never stored per workspace: one 32-byte
root secret gives each workspace its member key and each Claude session its
session key by HKDF-SHA256.  Direct messages are libsodium ``crypto_box``
over the ed25519->x25519 conversions of those keys, so they are
byte-compatible with the claudemesh v0.1 protocol.  Failures raise
:class:`~.errors.CryptoError` with a stable code, never a library exception.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import errors
from .errors import CryptoError

ROOT_SECRET_BYTES: Final = 32
HKDF_SALT: Final = b"claudemesh/v2"
NONCE_BYTES: Final = 24
FINGERPRINT_VERSION: Final = "1"

# ------------------------------------------------------------------ basics


def new_root_secret() -> bytes:
    """32 fresh random bytes: the file format of ``identity/root.key``."""
    return os.urandom(ROOT_SECRET_BYTES)


def parse_root_secret(data: bytes) -> bytes:
    """Validate the contents of a root key file (exactly 32 raw bytes)."""
    if len(data) != ROOT_SECRET_BYTES:
        raise CryptoError(
            errors.INVALID_FIELD,
            f"root secret must be exactly {ROOT_SECRET_BYTES} bytes, found {len(data)}",
        )
    return bytes(data)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def member_seed(root_secret: bytes, mesh_id: str) -> bytes:
    """ed25519 seed of this user's member key in ``mesh_id``."""
    info = f"claudemesh/mesh/{mesh_id}/peer".encode()
    return hkdf_sha256(root_secret, salt=HKDF_SALT, info=info)


def session_seed(root_secret: bytes, mesh_id: str, session_id: str) -> bytes:
    """ed25519 seed of a Claude session's key; a resumed session gets the same one."""
    info = f"claudemesh/mesh/{mesh_id}/session/{session_id}".encode()
    return hkdf_sha256(root_secret, salt=HKDF_SALT, info=info)


def topic_key(workspace_root_key: bytes, mesh_id: str, topic_id: str, epoch: int) -> bytes:
    """secretbox key of one topic epoch, derived from the workspace root key."""
    info = f"claudemesh/topic/{topic_id}/{epoch}".encode()
    return hkdf_sha256(workspace_root_key, salt=mesh_id.encode(), info=info)


def invite_claim_seed(invite_secret: bytes, invite_id: str) -> bytes:
    """ed25519 seed of the key that proves possession of an invite link."""
    info = f"claudemesh/invite/{invite_id}/claim".encode()
    return hkdf_sha256(invite_secret, salt=HKDF_SALT, info=info)


def invite_payload_key(invite_secret: bytes, invite_id: str) -> bytes:
    """secretbox key of an invite's sealed join payload."""
    info = f"claudemesh/invite/{invite_id}/payload".encode()
    return hkdf_sha256(invite_secret, salt=HKDF_SALT, info=info)


# -------------------------------------------------------------- encodings


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str, *, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CryptoError(errors.INVALID_FIELD, f"{what} is not valid base64") from None


def hex_to_bytes(text: str, *, length: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise CryptoError(errors.INVALID_FIELD, f"{what} is not hex") from None
    if len(raw) != length:
        raise CryptoError(errors.INVALID_FIELD, f"{what} must be {length} bytes, got {len(raw)}")
    return raw


# ---------------------------------------------------------------- signing


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An ed25519 key pair from a 32-byte seed, with its x25519 twins."""

    seed: bytes = field(repr=False)
    _sk: nacl.signing.SigningKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise CryptoError(errors.INVALID_FIELD, "an ed25519 seed is 32 bytes")
        object.__setattr__(self, "_sk", nacl.signing.SigningKey(self.seed))

    @property
    def public(self) -> bytes:
        return bytes(self._sk.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def sign(self, message: bytes | str) -> str:
        """Detached signature as 128 lowercase hex characters."""
        if isinstance(message, str):
            message = message.encode()
        return self._sk.sign(message).signature.hex()

    @property
    def x25519_secret(self) -> bytes:
        return bytes(self._sk.to_curve25519_private_key())

    @property
    def x25519_public(self) -> bytes:
        return bytes(self._sk.verify_key.to_curve25519_public_key())


def verify(pubkey_hex: str, message: bytes | str, signature_hex: str) -> bool:
    """Check a detached ed25519 signature; malformed inputs simply fail."""
    if isinstance(message, str):
        message = message.encode()
    try:
        pk = bytes.fromhex(pubkey_hex)
        sig = bytes.fromhex(signature_hex)
        if len(pk) != 32 or len(sig) != 64:
            return False
        nacl.signing.VerifyKey(pk).verify(message, sig)
    except (ValueError, TypeError, nacl.exceptions.CryptoError):
        return False
    return True


def ed25519_pk_to_x25519(pubkey: bytes) -> bytes:
    """libsodium's conversion; refuses keys that are not valid points."""
    try:
        return bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(pubkey))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CryptoError(errors.INVALID_FIELD, "not a valid ed25519 public key") from None


# ----------------------------------------------------------------- boxes


@functools.lru_cache(maxsize=1024)
def _box(own_seed: bytes, peer_ed25519_pk: bytes) -> nacl.public.Box:
    """The precomputed crypto_box for one key pair and one peer.

    Converting both keys and the X25519 agreement cost ~0.4 ms; a daemon
    talks to the same few peers over and over, so it is done once per pair.
    An invalid peer key raises and is not cached.
    """
    sk = nacl.signing.SigningKey(own_seed).to_curve25519_private_key()
    return nacl.public.Box(sk, nacl.public.PublicKey(ed25519_pk_to_x25519(peer_ed25519_pk)))


def box_encrypt(
    plaintext: bytes, *, sender: KeyPair, recipient_pubkey_hex: str, nonce: bytes | None = None
) -> tuple[str, str]:
    """Direct-message body: ``(nonce_b64, ciphertext_b64)`` as on the wire."""
    rpk = hex_to_bytes(recipient_pubkey_hex, length=32, what="recipient public key")
    box = _box(sender.seed, rpk)
    nonce = nonce if nonce is not None else nacl.utils.random(NONCE_BYTES)
    ct = box.encrypt(plaintext, nonce).ciphertext
    return b64e(nonce), b64e(ct)


def box_decrypt(
    nonce_b64: str, ciphertext_b64: str, *, recipient: KeyPair, sender_pubkey_hex: str
) -> bytes:
    """Open a direct message; raises ``CryptoError(bad_signature)`` if forged."""
    nonce = b64d(nonce_b64, what="nonce")
    ct = b64d(ciphertext_b64, what="ciphertext")
    if len(nonce) != NONCE_BYTES:
        raise CryptoError(errors.INVALID_FIELD, "nonce must be 24 bytes")
    spk = hex_to_bytes(sender_pubkey_hex, length=32, what="sender public key")
    box = _box(recipient.seed, spk)
    try:
        return bytes(box.decrypt(ct, nonce))
    except nacl.exceptions.CryptoError:
        raise CryptoError(errors.BAD_SIGNATURE, "message failed authentication") from None


def secretbox_encrypt(
    key: bytes, plaintext: bytes, *, nonce: bytes | None = None
) -> tuple[str, str]:
    """Topic body: ``(nonce_b64, secretbox_b64)``."""
    nonce = nonce if nonce is not None else nacl.utils.random(NONCE_BYTES)
    ct = nacl.secret.SecretBox(key).encrypt(plaintext, nonce).ciphertext
    return b64e(nonce), b64e(ct)


def secretbox_decrypt(key: bytes, nonce_b64: str, ciphertext_b64: str) -> bytes:
    nonce = b64d(nonce_b64, what="nonce")
    ct = b64d(ciphertext_b64, what="ciphertext")
    if len(nonce) != NONCE_BYTES:
        raise CryptoError(errors.INVALID_FIELD, "nonce must be 24 bytes")
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(ct, nonce))
    except nacl.exceptions.CryptoError:
        raise CryptoError(errors.BAD_SIGNATURE, "secretbox failed authentication") from None


def seal(plaintext: bytes, recipient_x25519_public: bytes) -> str:
    """Anonymous sealed box to an x25519 key, base64."""
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient_x25519_public))
    return b64e(box.encrypt(plaintext))


def seal_open(sealed_b64: str, recipient: KeyPair) -> bytes:
    box = nacl.public.SealedBox(nacl.public.PrivateKey(recipient.x25519_secret))
    try:
        return bytes(box.decrypt(b64d(sealed_b64, what="sealed box")))
    except nacl.exceptions.CryptoError:
        raise CryptoError(errors.BAD_SIGNATURE, "sealed box failed to open") from None


# ------------------------------------------------------- numbers and hashes


def safety_number(pubkey_a_hex: str, pubkey_b_hex: str) -> str:
    """Six five-digit groups both members compute alike over their member keys."""
    a = hex_to_bytes(pubkey_a_hex, length=32, what="public key")
    b = hex_to_bytes(pubkey_b_hex, length=32, what="public key")
    digest = hashlib.sha256(min(a, b) + max(a, b)).digest()
    bits = int.from_bytes(digest[:15], "big")  # 120 bits
    groups = [(bits >> (100 - 20 * i)) & 0xFFFFF for i in range(6)]
    return " ".join(f"{g % 100000:05d}" for g in groups)


def canonical_meta(meta: Mapping[str, str] | None) -> str:
    if not meta:
        return ""
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_fingerprint(
    *,
    kind: str,
    ref: str,
    reply_to: str | None,
    priority: str,
    meta: Mapping[str, str] | None,
    body: bytes | str,
) -> str:
    """SHA-256 of the canonical send request (architecture.md section 4)."""
    if isinstance(body, str):
        body = body.encode()
    fields = [
        FINGERPRINT_VERSION,
        kind,
        ref,
        reply_to or "",
        priority,
        canonical_meta(meta),
        hashlib.sha256(body).hexdigest(),
    ]
    return hashlib.sha256(b"\x00".join(f.encode() for f in fields)).hexdigest()
