"""A recipient's ``failed`` receipt (a push it could not read) reaches the sender."""

from __future__ import annotations

from pathlib import Path

from cmtest.broker import open_inproc_broker, open_peer, wait_until

from claudemesh.shared.protocol import errors, wire


async def test_failed_receipt_reaches_online_sender_with_reason(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob, carol = b.member(mesh, "alice"), b.member(mesh, "bob"), b.member(mesh, "carol")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            ack = await a.dm(bob.pubkey, b"garbage for bob", cmid="f1")
            p = await bb.message()
            await bb.send(wire.ClientAck(broker_message_id=p.message_id))
            await bb.send(
                wire.Receipt(message_id=p.message_id, state="failed", reason="undecryptable")
            )
            r = await a.expect(wire.Receipt, where=lambda r: r.state == "failed")
            assert r.message_id == ack.message_id
            assert r.client_message_id == "f1"
            assert r.recipient_pubkey == bob.pubkey
            assert r.reason == "undecryptable"
            assert r.receipt_id
            await a.send(wire.ClientAck(receipt_id=r.receipt_id))
            # Once per row: a repeat makes no second receipt.
            await bb.send(wire.Receipt(message_id=p.message_id, state="failed", reason="again"))
            await bb.request(wire.ListPeers(id="sync"))
            await a.expect_none(wire.Receipt, 0.3, where=lambda r: r.state == "failed")
            # Only the row's own recipient may fail it: carol's receipt does nothing.
            async with open_peer(b.url, carol) as c:
                await c.send(wire.Receipt(message_id=ack.message_id, state="failed", reason="x"))
                await c.request(wire.ListPeers(id="sync"))
            await a.expect_none(wire.Receipt, 0.3, where=lambda r: r.state == "failed")


async def test_failed_receipt_waits_for_an_offline_sender(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice, device_id="a1") as a:
            ack = await a.dm(bob.pubkey, b"x", cmid="f2")
        async with open_peer(b.url, bob) as bb:
            p = await bb.message()
            await bb.send(wire.ClientAck(broker_message_id=p.message_id))
            await bb.send(
                wire.Receipt(message_id=p.message_id, state="failed", reason="bad_signature")
            )
            await bb.request(wire.ListPeers(id="sync"))
        async with open_peer(b.url, alice, device_id="a1") as a:
            got = {}
            for _ in range(2):
                r = await a.expect(wire.Receipt)
                got[r.state] = r
            assert set(got) == {"delivered", "failed"}
            f = got["failed"]
            assert (f.message_id, f.client_message_id, f.reason) == (
                ack.message_id,
                "f2",
                "bad_signature",
            )
            assert f.recipient_pubkey == bob.pubkey
            for r in got.values():
                await a.send(wire.ClientAck(receipt_id=r.receipt_id))
            await a.request(wire.ListPeers(id="sync"))
        await wait_until(lambda: not b.store.db.counts()["receipts_pending"])
        async with open_peer(b.url, alice, device_id="a1") as a:
            await a.expect_none(wire.Receipt, 0.3)


async def test_failed_receipt_needs_a_bounded_reason(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            await a.dm(bob.pubkey, b"x")
            p = await bb.message()
            for reason in (None, "", "r" * 201):
                await bb.send(wire.Receipt(message_id=p.message_id, state="failed", reason=reason))
                e = await bb.expect(wire.Error)
                assert e.code == errors.INVALID_FIELD
                assert "reason" in e.message
            await bb.send(wire.Receipt(message_id=p.message_id, state="delivered"))
            assert (await bb.expect(wire.Error)).code == errors.INVALID_FIELD
            await a.expect_none(wire.Receipt, 0.3, where=lambda r: r.state == "failed")
