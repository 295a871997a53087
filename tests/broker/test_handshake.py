"""Handshake refusals, bad input, and limits: errors with stable codes, never a crash."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest
import trio
from cmtest.broker import new_key, now_ms, open_inproc_broker, open_peer, signed_hello
from trio_websocket import ConnectionClosed

from claudemesh.shared.protocol import errors, wire


async def refused(url: str, hello: wire.Hello) -> tuple[str, int | None]:
    async with open_peer(url) as p:
        await p.send(hello)
        err = await p.expect(wire.Error)
        return err.code, await p.closed()


async def test_hello_refusals(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        bob = b.member(mesh, "bob")
        old = signed_hello(alice, timestamp=now_ms() - 61_000)
        assert await refused(b.url, old) == (errors.TIMESTAMP_SKEW, 1008)
        future = signed_hello(alice, timestamp=now_ms() + 61_000)
        assert await refused(b.url, future) == (errors.TIMESTAMP_SKEW, 1008)
        good = signed_hello(alice)
        tampered = wire.Hello(
            **{**{f: getattr(good, f) for f in good.__struct_fields__}, "member_id": bob.member_id}
        )
        assert await refused(b.url, tampered) == (errors.BAD_SIGNATURE, 1008)
        # a member cannot claim another member's id with its own valid signature
        impostor = signed_hello(
            type(alice)(mesh_id=mesh, member_id=bob.member_id, key=alice.key, name="x")
        )
        assert await refused(b.url, impostor) == (errors.UNAUTHORIZED, 1008)
        stranger = type(alice)(mesh_id=mesh, member_id=alice.member_id, key=new_key(), name="s")
        assert await refused(b.url, signed_hello(stranger)) == (errors.UNAUTHORIZED, 1008)
        # replay of an accepted hello inside the skew window
        async with open_peer(b.url) as p:
            await p.send(good)
            await p.expect(wire.HelloAck)
        assert await refused(b.url, good) == (errors.BAD_SIGNATURE, 1008)
        b.store.db.revoke_member(mesh, bob.member_id, now_ms())
        assert await refused(b.url, signed_hello(bob)) == (errors.REVOKED, 4002)


async def test_before_hello_only_hello_and_prehello_frames(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url) as p:
            await p.send(wire.ListPeers(id="l1"))
            err = await p.expect(wire.Error)
            assert err.code == errors.NO_HELLO
            assert err.id == "l1"
            await p.send_raw("not json")
            assert (await p.expect(wire.Error)).code == errors.MALFORMED
            await p.send(signed_hello(alice))
            await p.expect(wire.HelloAck)


async def test_hello_timeout_closes(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, hello_timeout=0.3) as b, open_peer(b.url) as p:
        assert await p.closed() == 1008
        assert p.backlog
        err = p.backlog[-1]
        assert isinstance(err, wire.Error)
        assert err.code == errors.NO_HELLO


BAD_INPUTS: list[tuple[str | bytes, str]] = [
    ("", errors.MALFORMED),
    ("{", errors.MALFORMED),
    ("[1,2]", errors.MALFORMED),
    ('"str"', errors.MALFORMED),
    ("{}", errors.MALFORMED),
    ('{"type": 7}', errors.MALFORMED),
    ('{"type": "nope"}', errors.UNKNOWN_TYPE),
    ('{"type": "send"}', errors.INVALID_FIELD),
    (
        '{"type": "send", "id": 1, "targetSpec": "*", "priority": "now", "nonce": "",'
        ' "ciphertext": ""}',
        errors.INVALID_FIELD,
    ),
    ('{"type": "set_status", "status": "asleep"}', errors.INVALID_FIELD),
    (b"\xff\xfe\x00garbage", errors.MALFORMED),
    ("[" * 100_000, errors.MALFORMED),
    ('{"type": "hello_ack", "presenceId": "p", "memberDisplayName": "x"}', errors.UNKNOWN_TYPE),
]


async def test_bad_input_gets_errors_and_connection_carries_on(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            for data, code in BAD_INPUTS:
                await a.send_raw(data)
                err = await a.expect(wire.Error)
                assert err.code == code, (data[:40], err)
            # still alive, and so is everyone else
            ack = await a.dm(bob.pubkey, b"still here")
            assert ack.queued
            await bb.message()


async def test_payload_too_large_keeps_connection(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, max_ciphertext=1024) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            big = base64.b64encode(b"x" * 1025).decode()
            await a.send(
                wire.Send(
                    id="big", target_spec=bob.pubkey, priority="now", nonce="", ciphertext=big
                )
            )
            ack = await a.expect(wire.Ack)
            assert not ack.queued
            assert ack.error is not None
            assert ack.error.code == errors.PAYLOAD_TOO_LARGE
            assert (await a.dm(bob.pubkey, b"small")).queued
            assert b.store.db.counts()["pending"] == 1
            # a message over the frame cap closes with 1009
            await a.send_raw("x" * (wire.max_frame_bytes(1024) + 10))
            assert await a.closed() == 1009


async def test_rate_limit_answers_with_retry_hint(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, rate_per_second=1.0, rate_burst=3) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            acks = [await a.dm(bob.pubkey, b"x") for _ in range(4)]
            assert [x.queued for x in acks] == [True, True, True, False]
            err = acks[3].error
            assert err is not None
            assert err.code == errors.RATE_LIMITED
            assert err.retry_after_ms is not None
            assert 0 < err.retry_after_ms <= 1000
            await a.send(wire.ListPeers(id="lp"))
            e2 = await a.expect(wire.Error)
            assert e2.code == errors.RATE_LIMITED
            assert e2.id == "lp"
            assert e2.retry_after_ms
            await trio.sleep(e2.retry_after_ms / 1000 + 0.05)
            assert (await a.dm(bob.pubkey, b"x")).queued


@pytest.mark.parametrize("cap", ["max_conns_per_mesh", "max_conns_total"])
async def test_connection_caps(tmp_path: Path, cap: str) -> None:
    async with open_inproc_broker(tmp_path, **{cap: 1}) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice):
            assert await refused(b.url, signed_hello(bob)) == (errors.TOO_MANY_CONNECTIONS, 1013)
        # the slot is free again once the first one leaves
        async with open_peer(b.url, bob) as p:
            assert p.hello_ack is not None


async def test_member_cannot_send_as_another(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob, carol = (b.member(mesh, n) for n in ("alice", "bob", "carol"))
        async with open_peer(b.url, alice) as a, open_peer(b.url, carol) as c:
            # even naming bob's key as fromSession, the push says alice
            ack = await a.dm(carol.pubkey, b"x", from_session=bob.pubkey)
            assert ack.error is not None
            assert ack.error.code == errors.FORBIDDEN
            await a.dm(carol.pubkey, b"y")
            push = await c.message()
            assert push.sender_pubkey == alice.pubkey
            assert push.sender_member_pubkey == alice.pubkey
            # acking someone else's message does nothing
            await a.send(wire.ClientAck(broker_message_id=push.message_id))
            async with open_peer(b.url, carol) as c2:
                assert (await c2.message()).message_id == push.message_id


async def test_revoked_while_connected_cannot_send(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            b.store.db.revoke_member(mesh, alice.member_id, now_ms())
            ack = await a.dm(bob.pubkey, b"x")
            assert ack.error is not None
            assert ack.error.code == errors.REVOKED
            assert await a.closed() == 4002


async def test_revoked_while_connected_and_idle_is_closed(tmp_path: Path) -> None:
    """A revocation written by the admin CLI reaches an idle live connection."""
    async with open_inproc_broker(tmp_path, revocation_interval=0.05) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url, alice) as a:
            b.store.db.revoke_member(mesh, alice.member_id, now_ms())
            err = await a.expect(wire.Error, where=lambda f: f.code == errors.REVOKED)
            assert err.message
            assert await a.closed() == 4002


async def test_concurrent_hellos_cannot_overshoot_the_cap(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, max_conns_per_mesh=3) as b:
        mesh = b.mesh()
        members = [b.member(mesh, f"m{i}") for i in range(8)]
        outcomes: list[str] = []
        done = trio.Event()
        release = trio.Event()

        async def one(ident: object) -> None:
            async with open_peer(b.url) as p:
                await p.send(signed_hello(ident))  # type: ignore[arg-type]
                f = await p.expect((wire.HelloAck, wire.Error))  # type: ignore[arg-type]
                outcomes.append("ok" if isinstance(f, wire.HelloAck) else f.code)
                if len(outcomes) == len(members):
                    done.set()
                await release.wait()

        async with trio.open_nursery() as n:
            for m in members:
                n.start_soon(one, m)
            with trio.fail_after(10):
                await done.wait()
            release.set()
        assert outcomes.count("ok") == 3
        assert outcomes.count(errors.TOO_MANY_CONNECTIONS) == 5


async def test_too_many_frames_before_hello_closes(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b, open_peer(b.url) as p:
        with contextlib.suppress(ConnectionClosed):  # the broker may close mid-way
            for _ in range(40):
                await p.send_raw("{}")
        assert await p.closed() == 1008
        codes = [f.code for f in p.backlog if isinstance(f, wire.Error)]
        assert codes.count(errors.MALFORMED) == 32
        assert codes[-1] == errors.RATE_LIMITED, p.backlog[-3:]
