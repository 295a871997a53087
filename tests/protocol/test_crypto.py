"""Crypto round-trips and failure modes beyond the known answers."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudemesh.shared.protocol import crypto, errors
from claudemesh.shared.protocol.errors import CryptoError

ALICE = crypto.KeyPair(crypto.member_seed(b"\x01" * 32, "mesh-x"))
BOB = crypto.KeyPair(crypto.member_seed(b"\x02" * 32, "mesh-x"))


def test_root_secret_format() -> None:
    secret = crypto.new_root_secret()
    assert len(secret) == 32
    assert crypto.parse_root_secret(secret) == secret
    with pytest.raises(CryptoError) as exc:
        crypto.parse_root_secret(b"short")
    assert exc.value.code == errors.INVALID_FIELD


def test_same_root_same_identity_different_mesh_different_key() -> None:
    root = os.urandom(32)
    assert crypto.member_seed(root, "a") == crypto.member_seed(root, "a")
    assert crypto.member_seed(root, "a") != crypto.member_seed(root, "b")
    assert crypto.session_seed(root, "a", "s1") != crypto.member_seed(root, "a")


@given(st.binary(max_size=4096))
def test_box_round_trip(plaintext: bytes) -> None:
    n, ct = crypto.box_encrypt(plaintext, sender=ALICE, recipient_pubkey_hex=BOB.public_hex)
    assert crypto.box_decrypt(n, ct, recipient=BOB, sender_pubkey_hex=ALICE.public_hex) == plaintext


def test_box_refuses_wrong_sender_and_tampering() -> None:
    n, ct = crypto.box_encrypt(b"hi", sender=ALICE, recipient_pubkey_hex=BOB.public_hex)
    with pytest.raises(CryptoError) as exc:
        crypto.box_decrypt(n, ct, recipient=BOB, sender_pubkey_hex=BOB.public_hex)
    assert exc.value.code == errors.BAD_SIGNATURE
    raw = bytearray(crypto.b64d(ct))
    raw[0] ^= 1
    with pytest.raises(CryptoError):
        crypto.box_decrypt(
            n, crypto.b64e(bytes(raw)), recipient=BOB, sender_pubkey_hex=ALICE.public_hex
        )
    for bad_nonce in ("!!!", crypto.b64e(b"short")):
        with pytest.raises(CryptoError) as exc:
            crypto.box_decrypt(bad_nonce, ct, recipient=BOB, sender_pubkey_hex=ALICE.public_hex)
        assert exc.value.code == errors.INVALID_FIELD


def test_box_refuses_bad_recipient_key() -> None:
    with pytest.raises(CryptoError):
        crypto.box_encrypt(b"x", sender=ALICE, recipient_pubkey_hex="zz")
    with pytest.raises(CryptoError):
        crypto.box_encrypt(b"x", sender=ALICE, recipient_pubkey_hex="00" * 31)


def test_sealed_box_round_trip() -> None:
    sealed = crypto.seal(b"workspace root key", BOB.x25519_public)
    assert crypto.seal_open(sealed, BOB) == b"workspace root key"
    with pytest.raises(CryptoError):
        crypto.seal_open(sealed, ALICE)


def test_secretbox_wrong_key() -> None:
    n, ct = crypto.secretbox_encrypt(b"k" * 32, b"body")
    with pytest.raises(CryptoError):
        crypto.secretbox_decrypt(b"j" * 32, n, ct)


@given(st.text(max_size=200), st.text(max_size=200), st.text(max_size=200))
def test_verify_never_raises(pk: str, msg: str, sig: str) -> None:
    assert crypto.verify(pk, msg, sig) in (True, False)


def test_invite_keys_are_distinct_and_deterministic() -> None:
    secret = os.urandom(32)
    claim = crypto.invite_claim_seed(secret, "inv1")
    key = crypto.invite_payload_key(secret, "inv1")
    assert claim != key
    assert claim == crypto.invite_claim_seed(secret, "inv1")
    assert claim != crypto.invite_claim_seed(secret, "inv2")


def test_fingerprint_changes_with_every_field() -> None:
    base = {
        "kind": "dm",
        "ref": "r",
        "reply_to": None,
        "priority": "next",
        "meta": None,
        "body": "b",
    }
    ref = crypto.request_fingerprint(**base)  # type: ignore[arg-type]
    for key, value in [
        ("kind", "topic"),
        ("ref", "s"),
        ("reply_to", "x"),
        ("priority", "now"),
        ("meta", {"a": "1"}),
        ("body", "c"),
    ]:
        assert crypto.request_fingerprint(**{**base, key: value}) != ref  # type: ignore[arg-type]
    assert crypto.request_fingerprint(**{**base, "meta": {}}) == ref  # type: ignore[arg-type]
