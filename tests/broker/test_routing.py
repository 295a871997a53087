"""Routing, offline delivery, dedupe, receipts and ordering over real WebSockets."""

from __future__ import annotations

from pathlib import Path

import trio
from cmtest.broker import open_inproc_broker, open_peer, wait_until

from claudemesh.shared.protocol import crypto, errors, wire


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


async def test_offline_recipient_gets_rows_on_connect_in_order(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            ids = [(await a.dm(bob.pubkey, f"m{i}".encode())).message_id for i in range(20)]
            async with open_peer(b.url, bob) as bb:
                got = [(await bb.message()).message_id for _ in range(20)]
                assert got == ids


async def test_unacked_row_redelivered_after_reconnect(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            async with open_peer(b.url, bob) as bb:
                ack = await a.dm(bob.pubkey, b"x")
                assert (await bb.message()).message_id == ack.message_id
                # dropped before client_ack
            async with open_peer(b.url, bob) as bb:
                push = await bb.message()
                assert push.message_id == ack.message_id
                await bb.send(wire.ClientAck(broker_message_id=push.message_id))
                await a.expect(wire.Receipt, where=lambda r: r.state == "delivered")
            async with open_peer(b.url, bob) as bb:
                await bb.expect_none(wire.Push, 0.3, where=lambda p: p.subtype is None)


async def test_lease_redelivers_unacked_push(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, lease=0.3) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            ack = await a.dm(bob.pubkey, b"x")
            first = await bb.message()
            again = await bb.message(within=3)
            assert first.message_id == again.message_id == ack.message_id
            await bb.send(wire.ClientAck(broker_message_id=ack.message_id))
            await a.expect(wire.Receipt)
            bb.backlog.clear()
            await bb.expect_none(wire.Push, 0.8, where=lambda p: p.subtype is None)


async def test_duplicate_send_returns_same_id_and_stores_nothing(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            first = await a.dm(bob.pubkey, b"x", cmid="same", request_fingerprint="f1")
            again = await a.dm(bob.pubkey, b"x", cmid="same", request_fingerprint="f1")
            assert again.queued
            assert again.duplicate
            assert again.message_id == first.message_id
            assert b.store.db.counts()["pending"] == 1
            clash = await a.dm(bob.pubkey, b"y", cmid="same", request_fingerprint="f2")
            assert not clash.queued
            assert clash.error is not None
            assert clash.error.code == errors.IDEMPOTENCY_CONFLICT
        async with open_peer(b.url, bob) as bb:
            await bb.message()
            await bb.expect_none(wire.Push, 0.3, where=lambda p: p.subtype is None)


async def test_duplicate_survives_reconnect_of_sender(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            first = await a.dm(bob.pubkey, b"x", cmid="k")
        async with open_peer(b.url, alice) as a:
            again = await a.dm(bob.pubkey, b"x", cmid="k")
        assert again.duplicate
        assert again.message_id == first.message_id


async def test_unknown_target_and_bad_specs(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        stranger = crypto.KeyPair(crypto.new_root_secret())
        async with open_peer(b.url, alice) as a:
            ack = await a.dm(stranger.public_hex, b"x")
            assert not ack.queued
            assert ack.error is not None
            assert ack.error.code == errors.UNKNOWN_TARGET
            for spec in ("bob", "@", "ab" * 31):
                await a.send(
                    wire.Send(id="s", target_spec=spec, priority="now", nonce="", ciphertext="")
                )
                bad = await a.expect(wire.Ack)
                assert bad.error is not None
                assert bad.error.code == errors.INVALID_FIELD


async def test_group_and_broadcast_routing(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob, carol, dave = (b.member(mesh, n) for n in ("alice", "bob", "carol", "dave"))
        async with (
            open_peer(b.url, alice) as a,
            open_peer(b.url, bob, groups=[wire.GroupRef(name="ops/db")]) as bb,
            open_peer(b.url, carol, groups=[wire.GroupRef(name="ops")]) as c,
        ):
            await c.send(wire.JoinGroup(name="design"))
            await c.request(wire.ListPeers(id="sync"))  # join_group applied
            nonce, ct = crypto.secretbox_encrypt(b"k" * 32, b"topic body")
            for spec, expected in (
                ("@ops", 2),
                ("@ops/db", 1),
                ("@design", 1),
                ("*", 3),
                ("@all", 3),
                ("#general", 3),
                ("@nobody", 0),
            ):
                await a.send(
                    wire.Send(
                        id=spec,
                        target_spec=spec,
                        priority="next",
                        nonce=nonce,
                        ciphertext=ct,
                        client_message_id="c" + spec,
                        topic="general",
                        epoch=1,
                    )
                )
                got = await a.expect(wire.Ack, where=lambda x, s=spec: x.id == s)
                assert got.queued, got
                assert got.recipients == expected, (spec, got)
            bob_specs = {(await bb.message()).target_spec for _ in range(5)}
            assert bob_specs == {"@ops", "@ops/db", "*", "@all", "#general"}
            carol_specs = {(await c.message()).target_spec for _ in range(5)}
            assert carol_specs == {"@ops", "@design", "*", "@all", "#general"}
            await bb.expect_none(wire.Push, 0.2, where=lambda p: p.subtype is None)
        async with open_peer(b.url, dave) as d:
            pushes = [await d.message() for _ in range(3)]
            assert [p.target_spec for p in pushes] == ["*", "@all", "#general"]
            assert pushes[2].topic == "general"
            assert pushes[2].epoch == 1
            assert pushes[2].target_pubkey == dave.pubkey
            await d.expect_none(wire.Push, 0.2, where=lambda p: p.subtype is None)


async def test_expired_row_gives_expired_receipt_to_offline_sender(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, ttl_ms=300, sweep_interval=0.1) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            ack = await a.dm(bob.pubkey, b"too late", cmid="late")
        await wait_until(lambda: not b.store.db.counts()["pending"])
        async with open_peer(b.url, alice) as a:
            r = await a.expect(wire.Receipt)
            assert r.state == "expired"
            assert r.message_id == ack.message_id
            assert r.client_message_id == "late"
            assert r.recipient_pubkey == bob.pubkey
            await a.send(wire.ClientAck(receipt_id=r.receipt_id))
            await a.request(wire.ListPeers(id="sync"))
        async with open_peer(b.url, bob) as bb:
            await bb.expect_none(wire.Push, 0.3, where=lambda p: p.subtype is None)
        await wait_until(lambda: not b.store.db.counts()["receipts_pending"])
        async with open_peer(b.url, alice) as a:
            await a.expect_none(wire.Receipt, 0.3)


async def test_receipts_wait_for_an_offline_sender(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice, device_id="a1") as a:
            ack = await a.dm(bob.pubkey, b"x")
        async with open_peer(b.url, bob) as bb:
            p = await bb.message()
            await bb.send(wire.ClientAck(broker_message_id=p.message_id))
            await bb.send(wire.Receipt(message_id=p.message_id, state="surfaced"))
            await bb.request(wire.ListPeers(id="sync"))
        async with open_peer(b.url, alice, device_id="a1") as a:
            states = {(await a.expect(wire.Receipt)).state for _ in range(2)}
            assert states == {"delivered", "surfaced"}
        # never acked: they come again
        async with open_peer(b.url, alice, device_id="a1") as a:
            r1, r2 = await a.expect(wire.Receipt), await a.expect(wire.Receipt)
            assert {r1.message_id, r2.message_id} == {ack.message_id}
            await a.send(wire.ClientAck(receipt_id=r1.receipt_id))
            await a.send(wire.ClientAck(receipt_id=r2.receipt_id))
            await a.request(wire.ListPeers(id="sync"))
        await wait_until(lambda: not b.store.db.counts()["receipts_pending"])


async def test_order_per_pair_with_concurrent_senders_and_reconnects(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        bob = b.member(mesh, "bob")
        senders = [b.member(mesh, f"s{i}") for i in range(3)]
        sent: dict[str, list[str]] = {}

        async def blast(ident: object) -> None:
            async with open_peer(b.url, ident) as p:  # type: ignore[arg-type]
                out = sent.setdefault(p.ident.pubkey, [])  # type: ignore[union-attr]
                for i in range(40):
                    nonce, ct = crypto.box_encrypt(
                        b"n",
                        sender=p.ident.key,
                        recipient_pubkey_hex=bob.pubkey,  # type: ignore[union-attr]
                    )
                    await p.send(
                        wire.Send(
                            id=str(i),
                            target_spec=bob.pubkey,
                            priority="now",
                            nonce=nonce,
                            ciphertext=ct,
                            client_message_id=f"{i}",
                        )
                    )
                for _ in range(40):
                    out.append((await p.expect(wire.Ack)).message_id)

        got: dict[str, list[str]] = {}
        async with trio.open_nursery() as n:
            async with open_peer(b.url, bob) as bb:
                for s in senders:
                    n.start_soon(blast, s)
                # read some, drop without acking, reconnect mid-stream
                for _ in range(30):
                    p = await bb.message()
                    await bb.send(wire.ClientAck(broker_message_id=p.message_id))
                    got.setdefault(p.sender_pubkey, []).append(p.message_id)
        async with open_peer(b.url, bob) as bb:
            while sum(len(v) for v in got.values()) < 120:
                p = await bb.message()
                await bb.send(wire.ClientAck(broker_message_id=p.message_id))
                seen = got.setdefault(p.sender_pubkey, [])
                if p.message_id not in seen:
                    seen.append(p.message_id)
        for s in senders:
            assert got[s.pubkey] == sent[s.pubkey]


async def test_leave_group_and_v01_client_ack_by_client_message_id(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            await bb.send(wire.JoinGroup(name="@ops"))
            await bb.request(wire.ListPeers(id="sync1"))
            nonce, ct = crypto.secretbox_encrypt(b"k" * 32, b"x")
            send = wire.Send(
                id="g1",
                target_spec="@ops",
                priority="now",
                nonce=nonce,
                ciphertext=ct,
                client_message_id="g1",
            )
            await a.send(send)
            assert (await a.expect(wire.Ack)).recipients == 1
            push = await bb.message()
            # a v0.1 peer acks by client message id
            await bb.send(wire.ClientAck(client_message_id="g1"))
            r = await a.expect(wire.Receipt)
            assert r.message_id == push.message_id
            await bb.send(wire.LeaveGroup(name="ops"))
            await bb.request(wire.ListPeers(id="sync2"))
            send.id, send.client_message_id = "g2", "g2"
            await a.send(send)
            assert (await a.expect(wire.Ack)).recipients == 0


async def test_backlog_larger_than_the_outgoing_buffer_drains_in_order(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, outgoing_buffer=40) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            sent = [(await a.dm(bob.pubkey, b"x")).message_id for _ in range(300)]
        async with open_peer(b.url, bob) as bb:
            got = []
            for _ in range(300):
                p = await bb.message()
                got.append(p.message_id)
                await bb.send(wire.ClientAck(broker_message_id=p.message_id))
            assert got == sent
