"""Routing, offline delivery, dedupe, receipts and ordering over real WebSockets."""

from __future__ import annotations

from pathlib import Path

import trio

from claudemesh.shared.protocol import crypto, errors, wire
from cmtest.broker import open_inproc_broker, open_peer


async def test_direct_message_online(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            assert a.hello_ack is not None
            assert a.hello_ack.member_id == alice.member_id
            assert a.hello_ack.mesh_id == mesh
            ack = await a.dm(bob.pubkey, b"hello bob", cmid="m1")
            assert ack.queued
            assert ack.recipients == 1
            assert ack.client_message_id == "m1"
            push = await bb.message()
            assert push.message_id == ack.message_id
            assert push.sender_pubkey == alice.pubkey
            assert push.sender_member_pubkey == alice.pubkey
            assert push.sender_name == "alice"
            assert push.target_pubkey == bob.pubkey
            assert push.client_message_id == "m1"
            text = crypto.box_decrypt(
                push.nonce, push.ciphertext, recipient=bob.key, sender_pubkey_hex=alice.pubkey
            )
            assert text == b"hello bob"
            await bb.send(wire.ClientAck(broker_message_id=push.message_id))
            r = await a.expect(wire.Receipt)
            assert r.state == "delivered"
            assert r.message_id == ack.message_id
            assert r.recipient_pubkey == bob.pubkey
            assert r.client_message_id == "m1"
            await a.send(wire.ClientAck(receipt_id=r.receipt_id))
            await bb.send(wire.Receipt(message_id=push.message_id, state="surfaced"))
            r2 = await a.expect(wire.Receipt)
            assert r2.state == "surfaced"
