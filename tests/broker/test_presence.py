"""Presence, peers_list, system events, grace, devices and per-session presence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from cmtest.broker import (
    Peer,
    new_key,
    open_inproc_broker,
    open_peer,
    session_hello,
)

from claudemesh.shared.protocol import crypto, errors, wire


def system(event: str, pubkey: str) -> Any:
    return lambda p: (
        p.subtype == "system" and p.event == event and (p.event_data or {}).get("pubkey") == pubkey
    )


async def peers(p: Peer) -> list[wire.PeerInfo]:
    reply = await p.request(wire.ListPeers(id=p.next_id()))
    assert isinstance(reply, wire.PeersList)
    return reply.peers


async def test_peers_list_online_offline_and_status(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob, carol = (b.member(mesh, n) for n in ("alice", "bob", "carol"))
        async with open_peer(b.url, alice, hostname="box1") as a, open_peer(b.url, bob) as bb:
            await bb.send(wire.SetStatus(status="working"))
            await bb.send(wire.SetSummary(summary="fixing tests"))
            await bb.send(wire.JoinGroup(name="ops", role="lead"))
            await peers(bb)  # bob's frames are processed in order before this reply
            listed = {p.display_name: p for p in await peers(a)}
            assert set(listed) == {"alice", "bob", "carol"}
            assert listed["alice"].online
            assert listed["alice"].hostname == "box1"
            assert listed["bob"].status == "working"
            assert listed["bob"].summary == "fixing tests"
            assert [g.name for g in listed["bob"].groups] == ["ops"]
            assert listed["bob"].connected_at
            assert not listed["carol"].online
            assert listed["carol"].last_seen_at is None
            assert listed["carol"].pubkey == carol.pubkey
            await bb.send(wire.SetStatus(status="idle", session_pubkey="ab" * 32))
            err = await bb.expect(wire.Error)
            assert err.code == errors.INVALID_FIELD


async def test_join_leave_events_and_grace(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, grace=0.5) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            async with open_peer(b.url, bob):
                joined = await a.expect(wire.Push, where=system("peer_joined", bob.pubkey))
                assert joined.event_data is not None
                assert joined.event_data["name"] == "bob"
                assert joined.nonce == ""
                assert joined.ciphertext == ""
            # a quick reconnect within the grace: no leave/join noise
            async with open_peer(b.url, bob):
                await a.expect_none(wire.Push, 0.3, where=lambda p: p.subtype == "system")
                listed = {p.display_name: p for p in await peers(a)}
                assert listed["bob"].online
            # gone for longer than the grace: peer_left, then peer_returned
            await a.expect(wire.Push, 3, where=system("peer_left", bob.pubkey))
            listed = {p.display_name: p for p in await peers(a)}
            assert not listed["bob"].online
            assert listed["bob"].last_seen_at
            async with open_peer(b.url, bob):
                await a.expect(wire.Push, where=system("peer_returned", bob.pubkey))


async def test_two_devices_each_get_a_row_and_ack(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with (
            open_peer(b.url, bob, device_id="laptop"),
            open_peer(b.url, bob, device_id="desk"),
        ):
            pass
        async with open_peer(b.url, alice) as a:
            ack = await a.dm(bob.pubkey, b"both")
            assert ack.recipients == 2
            async with (
                open_peer(b.url, bob, device_id="laptop") as l1,
                open_peer(b.url, bob, device_id="desk") as d1,
            ):
                listed = [p for p in await peers(a) if p.display_name == "bob"]
                assert sorted(p.device_id or "" for p in listed) == ["desk", "laptop"]
                p1, p2 = await l1.message(), await d1.message()
                assert p1.message_id == p2.message_id == ack.message_id
                await l1.send(wire.ClientAck(broker_message_id=ack.message_id))
                await a.expect(wire.Receipt)
            # the desk copy was never acked: it comes again, the laptop's does not
            async with open_peer(b.url, bob, device_id="desk") as d2:
                assert (await d2.message()).message_id == ack.message_id
            async with open_peer(b.url, bob, device_id="laptop") as l2:
                await l2.expect_none(wire.Push, 0.3, where=lambda p: p.subtype is None)


async def test_first_device_takes_rows_of_a_never_seen_member(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            ack = await a.dm(bob.pubkey, b"early")
            assert ack.recipients == 1
        async with open_peer(b.url, bob, device_id="first") as f:
            await f.message()
        async with open_peer(b.url, bob, device_id="second") as s:
            await s.expect_none(wire.Push, 0.3, where=lambda p: p.subtype is None)


async def test_session_presence_and_routing(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, grace=0.3) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        skey = new_key()
        async with open_peer(b.url, alice) as a:
            async with open_peer(b.url, bob) as bb:
                ok = await bb.request(session_hello(bob, skey, id="sh1", display_name="bob:tests"))
                assert isinstance(ok, wire.Ok)
                ev = await a.expect(wire.Push, where=system("peer_joined", skey.public_hex))
                assert ev.event_data is not None
                assert ev.event_data["isSession"] is True
                assert ev.event_data["memberPubkey"] == bob.pubkey
                s = [p for p in await peers(a) if p.pubkey == skey.public_hex]
                assert len(s) == 1
                assert s[0].is_session
                assert s[0].member_pubkey == bob.pubkey
                ack = await a.dm(skey.public_hex, b"to the session")
                assert ack.recipients == 1
                push = await bb.message()
                assert push.target_pubkey == skey.public_hex
                text = crypto.box_decrypt(
                    push.nonce, push.ciphertext, recipient=skey, sender_pubkey_hex=alice.pubkey
                )
                assert text == b"to the session"
                await bb.send(wire.ClientAck(broker_message_id=push.message_id))
                await a.expect(wire.Receipt, where=lambda r: r.recipient_pubkey == skey.public_hex)
                # speaking as the session
                back = await bb.dm(alice.pubkey, b"hi", from_session=skey.public_hex)
                assert back.queued
                p = await a.message()
                assert p.sender_pubkey == skey.public_hex
                assert p.sender_member_pubkey == bob.pubkey
                # offline session rows wait for the session to come back
                await bb.send(wire.SessionBye(session_pubkey=skey.public_hex))
                await a.expect(wire.Push, where=system("peer_left", skey.public_hex))
                later = await a.dm(skey.public_hex, b"later")
                await bb.expect_none(wire.Push, 0.2, where=lambda p: p.subtype is None)
                await bb.request(session_hello(bob, skey, id="sh2"))
                assert (await bb.message()).message_id == later.message_id
            # the connection dropped: the session lingers, then leaves
            await a.expect(wire.Push, 3, where=system("peer_left", skey.public_hex))


async def test_session_hello_refusals(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        skey = new_key()
        async with open_peer(b.url, alice) as a:
            # bob's attestation presented by alice: parent mismatch
            forged = session_hello(bob, skey, id="x1")
            reply = await a.request(forged)
            assert isinstance(reply, wire.Error)
            assert reply.code == errors.INVALID_FIELD
            good = session_hello(alice, skey, id="x2")
            bad_sig = wire.SessionHello(
                **{**{f: getattr(good, f) for f in good.__struct_fields__}, "signature": "00" * 64}
            )
            reply = await a.request(bad_sig)
            assert isinstance(reply, wire.Error)
            assert reply.code == errors.BAD_SIGNATURE
            # fromSession of a key this connection did not present
            ack = await a.dm(bob.pubkey, b"x", from_session=skey.public_hex)
            assert ack.error is not None
            assert ack.error.code == errors.FORBIDDEN
            # a session key must not be a member key
            reply = await a.request(session_hello(alice, bob.key, id="x3"))
            assert isinstance(reply, wire.Error)
            assert reply.code in (errors.FORBIDDEN, errors.BAD_SIGNATURE)
        await trio.lowlevel.checkpoint()
