"""Reproduce every known answer in tests/data/crypto-v1.json (copied unchanged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from claudemesh.shared.protocol import crypto, wire

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "data" / "crypto-v1.json").read_text()
)


def test_hkdf_salt_matches_vectors() -> None:
    assert VECTORS["hkdf"]["salt_identity"].encode() == crypto.HKDF_SALT


@pytest.mark.parametrize("v", VECTORS["member_key"])
def test_member_key(v: dict[str, str]) -> None:
    seed = crypto.member_seed(bytes.fromhex(v["root_secret_hex"]), v["mesh_id"])
    assert seed.hex() == v["seed_hex"]
    assert crypto.KeyPair(seed).public_hex == v["pubkey_hex"]


def test_session_key() -> None:
    v = VECTORS["session_key"]
    seed = crypto.session_seed(bytes.fromhex(v["root_secret_hex"]), v["mesh_id"], v["session_id"])
    assert seed.hex() == v["seed_hex"]
    assert crypto.KeyPair(seed).public_hex == v["pubkey_hex"]


def test_hello_signature() -> None:
    v = VECTORS["hello_signature"]
    canonical = wire.hello_canonical(
        v["mesh_id"], v["member_id"], v["pubkey_hex"], v["timestamp_ms"]
    )
    assert canonical == v["canonical"]
    kp = crypto.KeyPair(bytes.fromhex(v["signer_seed_hex"]))
    assert kp.public_hex == v["pubkey_hex"]
    assert kp.sign(canonical) == v["signature_hex"]
    assert crypto.verify(v["pubkey_hex"], canonical, v["signature_hex"])
    assert not crypto.verify(v["pubkey_hex"], canonical + "0", v["signature_hex"])


def test_direct_message() -> None:
    v = VECTORS["direct_message"]
    sender = crypto.KeyPair(bytes.fromhex(v["sender_seed_hex"]))
    recipient = crypto.KeyPair(bytes.fromhex(v["recipient_seed_hex"]))
    assert recipient.public_hex == v["recipient_pubkey_hex"]
    nonce_b64, ct_b64 = crypto.box_encrypt(
        v["plaintext_utf8"].encode(),
        sender=sender,
        recipient_pubkey_hex=v["recipient_pubkey_hex"],
        nonce=crypto.b64d(v["nonce_b64"]),
    )
    assert (nonce_b64, ct_b64) == (v["nonce_b64"], v["ciphertext_b64"])
    opened = crypto.box_decrypt(
        v["nonce_b64"],
        v["ciphertext_b64"],
        recipient=recipient,
        sender_pubkey_hex=sender.public_hex,
    )
    assert opened.decode() == v["plaintext_utf8"]


def test_topic_key_and_secretbox() -> None:
    v = VECTORS["topic_key"]
    key = crypto.topic_key(
        bytes.fromhex(v["workspace_root_key_hex"]), v["mesh_id"], v["topic_id"], v["epoch"]
    )
    assert key.hex() == v["topic_key_hex"]
    nonce_b64, box_b64 = crypto.secretbox_encrypt(
        key, v["plaintext_utf8"].encode(), nonce=crypto.b64d(v["nonce_b64"])
    )
    assert (nonce_b64, box_b64) == (v["nonce_b64"], v["secretbox_b64"])
    assert crypto.secretbox_decrypt(key, nonce_b64, box_b64).decode() == v["plaintext_utf8"]


def test_safety_number_both_orders() -> None:
    v = VECTORS["safety_number"]
    assert crypto.safety_number(v["pubkey_a_hex"], v["pubkey_b_hex"]) == v["number"]
    assert crypto.safety_number(v["pubkey_b_hex"], v["pubkey_a_hex"]) == v["number"]


@pytest.mark.parametrize("v", VECTORS["request_fingerprint"])
def test_request_fingerprint(v: dict[str, Any]) -> None:
    got = crypto.request_fingerprint(
        kind=v["kind"],
        ref=v["ref"],
        reply_to=v["reply_to"],
        priority=v["priority"],
        meta=v["meta"],
        body=v["body"],
    )
    assert got == v["fingerprint_hex"]
